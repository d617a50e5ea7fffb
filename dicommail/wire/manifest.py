"""The manifest: what a set part carries, so the receiver can prove a set complete and intact.

Every mail of a set carries one manifest (inside the encryption) listing the
files in *that* mail with size and SHA-256, plus the file count and byte
total of the whole set.  The receiver checks each file against its entry and
the union of all parts against the set totals.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from dicommail.errors import WireFormatError
from dicommail.wire.headers import is_set_id, is_uid

FORMAT = "dicommail-manifest"
VERSION = 1
#: A manifest is metadata; anything larger is not one of ours.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024
#: Deepest bracket nesting accepted; a manifest needs three (document, file list, entry).
MAX_JSON_DEPTH = 8
#: Most files one manifest may list (one mail cannot carry more MIME parts, see ``mime.MAX_PARTS``).
MAX_ENTRIES = 10_000
#: Most parts a set may have (as ``unpack.MAX_SET_TOTAL``).
MAX_SET_TOTAL = 100_000
#: Bounds of the numbers: a file count and byte totals far beyond any study, still exact in JSON.
MAX_COUNT = 10_000_000
MAX_BYTES = 2**53
#: Longest free-text strings (file names, content IDs, media types, timestamps).
MAX_TEXT = 1024
_SHA256 = re.compile(r"[0-9a-f]{64}")
# A JSON string, escapes included: removed before brackets are counted.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(rb"[\[\]{}]+")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class ManifestEntry:
    content_id: str
    name: str
    kind: str  # "dicom" or "attachment"
    size: int
    sha256: str
    media_type: str = "application/dicom"
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    transfer_syntax_uid: str = ""


@dataclass(frozen=True)
class Manifest:
    set_id: str
    study_instance_uid: str
    set_part: int
    set_total: int
    set_files: int
    set_bytes: int
    files: list[ManifestEntry] = field(default_factory=list)
    created: str = ""
    generator: str = ""

    def to_json(self) -> bytes:
        document: dict[str, Any] = {"format": FORMAT, "version": VERSION, **asdict(self)}
        # ASCII-only JSON travels as 7bit without any transfer encoding.
        return json.dumps(document, indent=1, ensure_ascii=True).encode("ascii").replace(b"\n", b"\r\n") + b"\r\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Parse and check a manifest; every deviation is a :class:`WireFormatError`.

        The manifest comes from a peer: field types are checked strictly
        (``"size": "12"`` or ``true`` are not numbers), lengths and counts are
        bounded and nesting is refused before the JSON parser could recurse.
        """
        if len(data) > MAX_MANIFEST_SIZE:
            raise WireFormatError(f"the manifest is larger than {MAX_MANIFEST_SIZE} bytes")
        _check_nesting(data)
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WireFormatError(f"the manifest is not valid JSON: {exc}") from exc
        except (RecursionError, ValueError) as exc:  # nesting the scan missed, or huge numbers
            raise WireFormatError(f"the manifest is not acceptable JSON ({type(exc).__name__})") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise WireFormatError("the manifest part is not a dicommail manifest")
        version = document.get("version")
        if type(version) is not int or version != VERSION:
            shown = version if type(version) is int else type(version).__name__
            raise WireFormatError(f"manifest version {shown} is not supported", "upgrade dicommail on this side")
        entries = document.get("files")
        if not isinstance(entries, list):
            raise WireFormatError("the manifest's file list is missing or not a list")
        if len(entries) > MAX_ENTRIES:
            raise WireFormatError(f"the manifest lists more than {MAX_ENTRIES} files")
        manifest = cls(
            set_id=_text(document, "set_id", 128),
            study_instance_uid=_text(document, "study_instance_uid", 64),
            set_part=_number(document, "set_part", MAX_SET_TOTAL),
            set_total=_number(document, "set_total", MAX_SET_TOTAL),
            set_files=_number(document, "set_files", MAX_COUNT),
            set_bytes=_number(document, "set_bytes", MAX_BYTES),
            files=[_entry(entry, number) for number, entry in enumerate(entries, 1)],
            created=_text(document, "created", 64, default=""),
            generator=_text(document, "generator", MAX_TEXT, default=""),
        )
        manifest.validate()
        return manifest

    def validate(self) -> None:
        if not is_set_id(self.set_id) or not is_uid(self.study_instance_uid):
            raise WireFormatError("the manifest's set ID or study UID is malformed")
        if not 1 <= self.set_part <= self.set_total or self.set_files < 0 or self.set_bytes < 0:
            raise WireFormatError("the manifest's part numbers or totals are inconsistent")
        seen: set[str] = set()
        # Entries are named by position: their content IDs and names come from the peer.
        for number, entry in enumerate(self.files, 1):
            if entry.kind not in ("dicom", "attachment") or entry.size < 0 or not _SHA256.fullmatch(entry.sha256):
                raise WireFormatError(f"manifest entry {number} is malformed")
            if entry.kind == "dicom" and not is_uid(entry.sop_instance_uid):
                raise WireFormatError(f"manifest entry {number} has no valid SOP Instance UID")
            if entry.content_id in seen:
                raise WireFormatError(f"manifest entry {number} repeats the content ID of an earlier entry")
            seen.add(entry.content_id)


# --- strict reading of peer-supplied JSON -------------------------------------


def _check_nesting(data: bytes) -> None:
    """Refuse JSON nested deeper than :data:`MAX_JSON_DEPTH`, counting brackets outside strings.

    Runs in regular-expression speed before ``json.loads``, whose C scanner
    recurses once per level.  Unbalanced or stray brackets only make an
    already invalid document fail here instead of in the parser.
    """
    runs = _BRACKETS.findall(_JSON_STRING.sub(b'""', data))
    # A manifest has two brackets per entry and four more: anything beyond is not one.
    if sum(map(len, runs)) > 2 * MAX_ENTRIES + 16:
        raise WireFormatError("the manifest holds more arrays or objects than a manifest can")
    depth = 0
    for run in runs:
        for byte in run:
            depth += 1 if byte in b"[{" else -1
            if depth > MAX_JSON_DEPTH:
                raise WireFormatError(f"the manifest is nested deeper than {MAX_JSON_DEPTH} levels")


_FIELD = "the manifest's field"


def _text(
    document: dict[str, Any], key: str, limit: int, default: str | None = None, where: str = _FIELD, plain: bool = True
) -> str:
    value = document.get(key, default)
    if not isinstance(value, str):
        raise WireFormatError(f"{where} {key} is missing or not a string")
    if len(value) > limit or (plain and _CONTROL.search(value)):
        raise WireFormatError(f"{where} {key} is too long or holds control characters")
    return value


def _number(document: dict[str, Any], key: str, limit: int, where: str = _FIELD) -> int:
    value = document.get(key)
    # bool is a subclass of int, and 1.0 or "1" are not integers here.
    if type(value) is not int:
        raise WireFormatError(f"{where} {key} is missing or not an integer")
    if not 0 <= value <= limit:
        raise WireFormatError(f"{where} {key} is out of range")
    return value


_ENTRY_KEYS = {
    "content_id", "name", "kind", "size", "sha256", "media_type", "sop_instance_uid", "sop_class_uid",
    "transfer_syntax_uid",
}
_ENTRY_REQUIRED = {"content_id", "name", "kind", "size", "sha256"}


def _entry(entry: object, number: int) -> ManifestEntry:
    if not isinstance(entry, dict):
        raise WireFormatError(f"manifest entry {number} is not an object")
    if set(entry) - _ENTRY_KEYS or _ENTRY_REQUIRED - set(entry):
        raise WireFormatError(f"manifest entry {number} lacks a required field or has unknown ones")
    where = f"manifest entry {number}, field"
    return ManifestEntry(
        content_id=_text(entry, "content_id", MAX_TEXT, where=where),
        # A file name is only ever shown sanitised (unpack.safe_file_name): any character may travel.
        name=_text(entry, "name", MAX_TEXT, where=where, plain=False),
        kind=_text(entry, "kind", 16, where=where),
        size=_number(entry, "size", MAX_BYTES, where=where),
        sha256=_text(entry, "sha256", 64, where=where),
        media_type=_text(entry, "media_type", 255, default="application/dicom", where=where),
        sop_instance_uid=_text(entry, "sop_instance_uid", 64, default="", where=where),
        sop_class_uid=_text(entry, "sop_class_uid", 64, default="", where=where),
        transfer_syntax_uid=_text(entry, "transfer_syntax_uid", 64, default="", where=where),
    )
