"""What a constancy check compares, and the mark a test transfer carries.

DIN 6868-159 asks, for the monthly check and the acceptance test, that all
images arrive, that selected header entries are unchanged and that image
quality is preserved.  The sender records, per instance, the text of each
selected header entry and the SHA-256 of its pixel data as stored
(:func:`expected_values`); the receiver reads the instance it got and
compares (:func:`compare`): header entries equal, pixel data bit-identical by
hash and decodable by pydicom.

The expectations travel in a :class:`ConstancyMark` inside the encryption of
every mail of a test set (``docs/wire-format.md``, section 10).  The mark
comes from a certified peer, but it is parsed as strictly as the manifest: a
malformed one is a :class:`~dicommail.errors.WireFormatError`, never a crash.

Results name header entries by their DICOM keyword only, never by value: a
configured entry may hold patient data, and results go into logs and mails.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence

from dicommail.dicom import read_dicom_info
from dicommail.errors import InputError, WireFormatError
from dicommail.wire.headers import is_uid

#: DICOM keywords compared by default: identity, geometry and display of the image; nothing that names a patient.
DEFAULT_HEADER_ENTRIES: tuple[str, ...] = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "PhotometricInterpretation",
    "InstanceNumber",
    "ImagePositionPatient",
    "PixelSpacing",
    "SliceThickness",
    "WindowCenter",
    "WindowWidth",
    "RescaleSlope",
    "RescaleIntercept",
)

#: The kinds of check DIN 6868-159 knows.
KINDS = ("daily", "monthly", "acceptance")

FORMAT = "dicommail-constancy"
VERSION = 1
#: Media type and file name of the mark's MIME part inside the encrypted entity.
MEDIA_TYPE = "application/x-dicommail-constancy+json"
FILE_NAME = "dicommail-constancy.json"
#: Inner header of every mail of a test set: ``<check id>; kind=<kind>``.
HEADER = "X-DICOMMAIL-CONSTANCY"

#: Bounds of a mark from a peer: its size, header entries, instances per mail, nesting.
MAX_MARK_SIZE = 16 * 1024 * 1024
MAX_ENTRIES = 128
MAX_INSTANCES = 10_000
MAX_DEPTH = 4  # document, instance list, instance, headers
#: A header entry's text longer than this travels as ``sha256:<hex>`` of the text (keeps the JSON lines short).
MAX_VALUE_TEXT = 256
#: Sequence nesting followed when a header entry is a sequence (the DICOM scan allows as deep).
MAX_SEQUENCE_DEPTH = 64

_CHECK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")
_KEYWORD = re.compile(r"[A-Za-z][A-Za-z0-9]{0,63}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class InstanceExpectation:
    """What the sender recorded of one instance: header entry texts ("" if absent) and the pixel data hash."""

    sop_instance_uid: str
    headers: dict[str, str] = field(default_factory=dict)
    pixel_sha256: str = ""  # "" when the instance has no pixel data

    def to_dict(self) -> dict[str, Any]:
        return {"sop_instance_uid": self.sop_instance_uid, "headers": dict(self.headers),
                "pixel_sha256": self.pixel_sha256}


@dataclass(frozen=True)
class InstanceCheck:
    """What the receiver found for one instance.  ``mismatched`` names DICOM keywords only, never values."""

    sop_instance_uid: str
    headers_ok: bool
    mismatched: tuple[str, ...]
    quality_ok: bool
    reason: str = ""


def is_check_id(value: object) -> bool:
    """Whether ``value`` is a check ID as the wire carries it: a short token of letters, digits and ``_.:-``."""
    return isinstance(value, str) and bool(_CHECK_ID.fullmatch(value))


def check_entries(entries: Sequence[str]) -> tuple[str, ...]:
    """``entries`` as a tuple of known DICOM keywords; :class:`InputError` naming the first that is not one."""
    result = tuple(entries)
    if len(result) > MAX_ENTRIES:
        raise InputError(f"at most {MAX_ENTRIES} header entries can be compared, not {len(result)}")
    for keyword in result:
        if not isinstance(keyword, str) or not _KEYWORD.fullmatch(keyword) or tag_for_keyword(keyword) is None:
            raise InputError(f"{str(keyword)[:64]!r} is not a DICOM keyword",
                             "name header entries by their DICOM keyword, e.g. SliceThickness")
    if len(set(result)) != len(result):
        raise InputError("a header entry is listed twice")
    return result


def _digest_text(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _element_text(element: DataElement, depth: int = 0) -> str:
    """A canonical text of an element's value: the same bytes give the same text on both sides."""
    value = element.value
    if value is None or value == "":
        return ""
    if isinstance(value, DicomSequence):
        if depth >= MAX_SEQUENCE_DEPTH:
            raise ValueError("sequences nested too deeply")
        items = ["{" + ";".join(f"{e.tag:08X}={_element_text(e, depth + 1)}" for e in item) + "}" for item in value]
        return _digest_text("[" + ",".join(items) + "]")
    if isinstance(value, bytes | bytearray):
        return "sha256:" + hashlib.sha256(value).hexdigest()
    # Several values as DICOM writes them, separated by backslashes.
    text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue | list | tuple) else str(value)
    return text if len(text) <= MAX_VALUE_TEXT else _digest_text(text)


def _header_texts(ds: Dataset, entries: Sequence[str]) -> dict[str, str]:
    texts = {}
    for keyword in entries:
        tag = tag_for_keyword(keyword)
        element = ds.get(tag) if tag is not None else None
        texts[keyword] = _element_text(element) if isinstance(element, DataElement) else ""
    return texts


def _pixel_sha256(ds: Dataset) -> str:
    for keyword in _PIXEL_KEYWORDS:
        tag = tag_for_keyword(keyword)
        element = ds.get(tag) if tag is not None else None
        if isinstance(element, DataElement) and isinstance(element.value, bytes | bytearray):
            return hashlib.sha256(element.value).hexdigest()
    return ""


#: A test image is read whole and its pixels decoded, so it is bounded (mails come from peers):
#: its file, its data set once inflated (a deflated transfer syntax) and its decoded pixels.
MAX_TEST_IMAGE = 256 * 1024**2


class TooLargeError(InputError):
    """A test image over :data:`MAX_TEST_IMAGE`: not read into memory."""


def _read(path: Path) -> Dataset:
    if path.stat().st_size > MAX_TEST_IMAGE:
        raise TooLargeError("the test image is larger than 256 MiB")
    # The bounded reader first: pydicom inflates a deflated data set whole, in memory.
    read_dicom_info(path, "the test image", max_inflated=MAX_TEST_IMAGE)
    return pydicom.dcmread(path, force=False)


def _decoded_size(ds: Dataset) -> int:
    """The bytes ``ds.pixel_array`` would take, from the image header."""
    frames = ds.get("NumberOfFrames", 1)
    try:
        frames = max(1, int(frames or 1))
    except (TypeError, ValueError):
        frames = 1
    values = [ds.get(keyword, 0) for keyword in ("Rows", "Columns", "SamplesPerPixel", "BitsAllocated")]
    try:
        rows, columns, samples, bits = (int(v or 0) for v in values)
    except (TypeError, ValueError):
        return 0
    return rows * columns * max(1, samples) * frames * ((bits + 7) // 8)


def expected_values(path: Path, entries: Sequence[str]) -> InstanceExpectation:
    """The sender's record of one instance: its selected header entries and its pixel data hash."""
    keywords = check_entries(entries)
    try:
        ds = _read(path)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except TooLargeError as exc:
        raise InputError(f"{path}: {exc.message}", "a constancy test data set needs smaller images") from exc
    except Exception as exc:  # pydicom raises many types for a damaged file
        raise InputError(f"{path} is not a DICOM file pydicom can read ({type(exc).__name__})",
                         "the test data set must be valid DICOM") from exc
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if not is_uid(uid):
        raise InputError(f"{path} has no valid SOP Instance UID", "the test data set must be valid DICOM")
    try:
        headers = _header_texts(ds, keywords)
    except (ValueError, TypeError) as exc:
        raise InputError(f"the header entries of {path} cannot be read ({type(exc).__name__})") from exc
    return InstanceExpectation(sop_instance_uid=uid, headers=headers, pixel_sha256=_pixel_sha256(ds))


def compare(path: Path, expected: InstanceExpectation, entries: Sequence[str]) -> InstanceCheck:
    """The receiver's check of one instance against the sender's record; never raises for a bad file.

    ``headers_ok``: every entry's text equals the sender's (``mismatched``
    lists the keywords that differ).  ``quality_ok``: the pixel data is
    bit-identical by SHA-256 and pydicom can decode it (``ds.pixel_array``).
    An instance without pixel data on both sides has nothing to decode and
    counts as quality ok.
    """
    uid = expected.sop_instance_uid
    try:
        keywords = check_entries(entries)
    except InputError:
        return InstanceCheck(uid, False, (), False, "the header entries to compare are not DICOM keywords")
    try:
        ds = _read(path)
        headers = _header_texts(ds, keywords)
    except TooLargeError as exc:
        return InstanceCheck(uid, False, (), False, f"the instance cannot be checked: {exc.message}")
    except Exception as exc:  # a damaged file must fail the check, not the receiver
        return InstanceCheck(uid, False, (), False, f"the instance cannot be read ({type(exc).__name__})")
    mismatched = tuple(k for k in keywords if headers.get(k, "") != expected.headers.get(k, ""))
    reasons = []
    if mismatched:
        reasons.append("header entries differ: " + ", ".join(mismatched))
    quality_ok = True
    actual = _pixel_sha256(ds)
    if actual != expected.pixel_sha256:
        quality_ok = False
        reasons.append("the pixel data differs from the sender's" if actual else "the pixel data is missing")
    elif actual and _decoded_size(ds) > MAX_TEST_IMAGE:
        quality_ok = False
        reasons.append("the pixel data is too large to decode for the check (over 256 MiB)")
    elif actual:
        try:
            ds.pixel_array  # noqa: B018 - decoding is the check
        except Exception as exc:
            quality_ok = False
            reasons.append(f"the pixel data cannot be decoded ({type(exc).__name__})")
    return InstanceCheck(uid, not mismatched, mismatched, quality_ok, "; ".join(reasons))


@dataclass(frozen=True)
class ConstancyMark:
    """The mark of a test transfer: check ID, kind, compared entries and the expectations of some instances."""

    check_id: str
    kind: str
    entries: tuple[str, ...]
    instances: dict[str, InstanceExpectation] = field(default_factory=dict)

    def header_value(self) -> str:
        """The value of the inner ``X-DICOMMAIL-CONSTANCY`` header."""
        return f"{self.check_id}; kind={self.kind}"

    def subset(self, uids: Sequence[str]) -> ConstancyMark:
        """The same mark with the expectations of ``uids`` only (one mail's instances)."""
        missing = [u for u in uids if u not in self.instances]
        if missing:
            raise InputError(f"the constancy mark has no expected values for {len(missing)} instance(s) of the set",
                             "compute the expectations from the same files that are sent")
        return ConstancyMark(self.check_id, self.kind, self.entries, {u: self.instances[u] for u in uids})

    def validate(self) -> None:
        if not isinstance(self.check_id, str) or not _CHECK_ID.fullmatch(self.check_id):
            raise WireFormatError("the constancy mark's check ID is malformed")
        if self.kind not in KINDS:
            raise WireFormatError("the constancy mark's kind is not daily, monthly or acceptance")
        try:
            check_entries(self.entries)
        except InputError as exc:
            raise WireFormatError("the constancy mark names a header entry that is not a DICOM keyword") from exc
        if len(self.instances) > MAX_INSTANCES:
            raise WireFormatError(f"the constancy mark lists more than {MAX_INSTANCES} instances")
        wanted = set(self.entries)
        for number, (uid, expectation) in enumerate(self.instances.items(), 1):
            if uid != expectation.sop_instance_uid or not is_uid(uid):
                raise WireFormatError(f"constancy mark instance {number} has no valid SOP Instance UID")
            if set(expectation.headers) != wanted:
                raise WireFormatError(f"constancy mark instance {number} does not list exactly the compared entries")
            for text in expectation.headers.values():
                if not isinstance(text, str) or len(text) > MAX_VALUE_TEXT or _CONTROL.search(text):
                    raise WireFormatError(f"constancy mark instance {number} holds a malformed header entry")
            if expectation.pixel_sha256 and not _SHA256.fullmatch(expectation.pixel_sha256):
                raise WireFormatError(f"constancy mark instance {number} has a malformed pixel data hash")

    def to_json(self) -> bytes:
        """ASCII JSON with CRLF line ends: the part travels as 7bit, like the manifest."""
        self.validate()
        document = {
            "format": FORMAT,
            "version": VERSION,
            "check_id": self.check_id,
            "kind": self.kind,
            "entries": list(self.entries),
            "instances": [e.to_dict() for e in self.instances.values()],
        }
        return json.dumps(document, indent=1, ensure_ascii=True).encode("ascii").replace(b"\n", b"\r\n") + b"\r\n"

    @classmethod
    def from_json(cls, data: bytes) -> ConstancyMark:
        """Parse and check a mark from a peer; every deviation is a :class:`WireFormatError`."""
        if len(data) > MAX_MARK_SIZE:
            raise WireFormatError(f"the constancy mark is larger than {MAX_MARK_SIZE} bytes")
        _refuse_deep(data)
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WireFormatError("the constancy mark is not valid JSON") from exc
        except (RecursionError, ValueError) as exc:
            raise WireFormatError(f"the constancy mark is not acceptable JSON ({type(exc).__name__})") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise WireFormatError("the constancy part is not a dicommail constancy mark")
        version = document.get("version")
        if type(version) is not int or version != VERSION:
            raise WireFormatError("the constancy mark's version is not supported", "upgrade dicommail on this side")
        entries = document.get("entries")
        instances = document.get("instances")
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise WireFormatError("the constancy mark's entries are not a list of keywords")
        if len(entries) > MAX_ENTRIES:
            raise WireFormatError(f"the constancy mark names more than {MAX_ENTRIES} header entries")
        if not isinstance(instances, list) or len(instances) > MAX_INSTANCES:
            raise WireFormatError("the constancy mark's instance list is missing, not a list or too long")
        expectations: dict[str, InstanceExpectation] = {}
        for number, item in enumerate(instances, 1):
            expectation = _expectation(item, number)
            if expectation.sop_instance_uid in expectations:
                raise WireFormatError(f"constancy mark instance {number} repeats an earlier instance")
            expectations[expectation.sop_instance_uid] = expectation
        check_id, kind = document.get("check_id"), document.get("kind")
        if not isinstance(check_id, str) or not isinstance(kind, str):
            raise WireFormatError("the constancy mark's check ID or kind is missing")
        mark = cls(check_id=check_id, kind=kind, entries=tuple(entries), instances=expectations)
        mark.validate()
        return mark


def parse_header(value: str) -> tuple[str, str]:
    """``<check id>; kind=<kind>`` -> (check id, kind); :class:`WireFormatError` if it is anything else."""
    check_id, sep, rest = " ".join(value.split()).partition(";")
    name, equals, kind = rest.strip().partition("=")
    check_id, kind = check_id.strip(), kind.strip().lower()
    if not sep or not equals or name.strip().lower() != "kind" or not _CHECK_ID.fullmatch(check_id) \
            or kind not in KINDS:
        raise WireFormatError(f"the {HEADER} header is malformed")
    return check_id, kind


def _expectation(item: object, number: int) -> InstanceExpectation:
    if not isinstance(item, dict) or set(item) != {"sop_instance_uid", "headers", "pixel_sha256"}:
        raise WireFormatError(f"constancy mark instance {number} is not an object with the expected fields")
    uid, headers, pixel = item["sop_instance_uid"], item["headers"], item["pixel_sha256"]
    if not isinstance(uid, str) or not isinstance(pixel, str) or not isinstance(headers, dict):
        raise WireFormatError(f"constancy mark instance {number} has fields of the wrong type")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
        raise WireFormatError(f"constancy mark instance {number} has header entries that are not text")
    return InstanceExpectation(sop_instance_uid=uid, headers=dict(headers), pixel_sha256=pixel)


def _refuse_deep(data: bytes) -> None:
    """Refuse nesting beyond :data:`MAX_DEPTH` before the JSON parser recurses into it."""
    depth = 0
    for match in _BRACKET.finditer(_STRING.sub(b"", data)):
        depth += 1 if match.group() in (b"[", b"{") else -1
        if depth > MAX_DEPTH:
            raise WireFormatError(f"the constancy mark is nested deeper than {MAX_DEPTH} levels")
