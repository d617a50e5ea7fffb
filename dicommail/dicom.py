"""Reading just enough of DICOM Part 10 files to route, pack and verify them.

Objects come from peers and from the open network, so reading is bounded:
a structural scan (:func:`_scan`) walks the whole file with an explicit
stack, checks every declared length against the bytes that remain, limits
sequence nesting and inflates deflated objects in chunks up to a limit.  Only
the file meta information and the few identifying top-level elements it
collects are then decoded by pydicom, from a small copy in memory.

The scan also refuses native pixel data shorter than the image it
declares (rows x columns x samples x frames x bits allocated): a file cut
short by a full disk or an interrupted copy, whose lengths were fixed up,
would otherwise be sent and stored as a broken image.  pydicom's warnings
about odd values never reach the terminal: they are logged at DEBUG only,
their quoted values left out (:func:`quiet_pydicom`).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import stat
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.datadict import dictionary_VR
from pydicom.multival import MultiValue

from dicommail.errors import InputError, NotDicomError
from dicommail.wire.headers import is_uid

log = logging.getLogger("dicommail.dicom")

#: Media Storage Directory (DICOMDIR): an index of a medium, not an image.
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"]

#: Deepest sequence nesting accepted; real objects nest a handful of levels.
MAX_SEQUENCE_DEPTH = 64
#: Most element and item headers in one object: bounds the time a scan can take.
MAX_ELEMENTS = 2_000_000
#: Default limit of what a Deflated Explicit VR Little Endian object may inflate to
#: (the default of ``unpacking.max_decrypted_size``).
MAX_INFLATED = 1024**3
#: Longest file meta information group; a real one is a few hundred bytes.
MAX_META = 64 * 1024
#: Longest value of an element that is decoded (UIDs are 64 bytes, an IS 12).
MAX_VALUE = 1024

DEFLATED = "1.2.840.10008.1.2.1.99"
_IMPLICIT_LE = "1.2.840.10008.1.2"
_EXPLICIT_BE = "1.2.840.10008.1.2.2"
#: Specific Character Set and the identifying elements: all that is copied for pydicom.
_WANTED = frozenset({0x00080005, 0x00080016, 0x00080018, 0x0020000D, 0x0020000E, 0x00200013})
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
_PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Top-level elements that say how long native pixel data must be.
_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS = 0x00280002, 0x00280004, 0x00280008, 0x00280010, \
    0x00280011, 0x00280100
_IMAGE_TAGS = frozenset({_SAMPLES, _PHOTOMETRIC, _FRAMES, _ROWS, _COLUMNS, _BITS})
#: Transfer syntaxes whose pixel data is native (not encapsulated); "" is a file without one.
_NATIVE = frozenset({"", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"})
_VR_LENGTH_32 = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_KNOWN_VR = _VR_LENGTH_32 | frozenset(b"AE AS AT CS DA DS DT FD FL IS LO LT PN SH SL SS ST TM UI UL US".split())
_INPUT_CHUNK = 64 * 1024
_OUTPUT_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class DicomFile:
    path: Path
    size: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int


def instance_number(value: object) -> int:
    """An Instance Number, for ordering only: its first value if that is numeric, else 0 (never an error)."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None:
        return 0
    text = str(value).split("\\", 1)[0].strip()
    try:
        return int(text)
    except ValueError:
        try:
            return int(float(text))
        except (ValueError, OverflowError):
            return 0


# --- bounded structural scan -------------------------------------------------


class _Malformed(Exception):
    """The scan found a structural fault; ``reason`` names it without quoting content."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _NotPart10(Exception):
    """No 128-byte preamble followed by ``DICM``."""


class _FileStream:
    """A seekable file read forward, with its size known."""

    def __init__(self, handle: BinaryIO, start: int, size: int) -> None:
        self._handle = handle
        self.pos = start
        self.size: int | None = size
        handle.seek(start)

    def available(self) -> int:
        assert self.size is not None
        return self.size - self.pos

    def read(self, count: int) -> bytes:
        data = self._handle.read(count)
        if len(data) != count:
            raise _Malformed("the file is truncated")
        self.pos += count
        return data

    def peek(self, count: int) -> bytes:
        data = self._handle.read(count)
        self._handle.seek(self.pos)
        return data

    def overrun(self, what: str) -> _Malformed:
        return _Malformed(f"{what} is longer than what remains of the file")

    def skip(self, count: int) -> None:
        if count > self.available():
            raise _Malformed("the file is truncated")
        self.pos += count
        self._handle.seek(self.pos)


class _InflatedStream:
    """The inflated data set of a deflated object, produced in chunks as it is read.

    Never holds more than about one output chunk; refuses to produce more
    than ``limit`` bytes in total, however well the input compresses.
    """

    def __init__(self, handle: BinaryIO, limit: int) -> None:
        self._handle = handle
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buffer = b""
        self._offset = 0
        self._produced = 0
        self._done = False
        self._limit = limit
        self.pos = 0
        self.size: int | None = None

    def available(self) -> int:
        # Unknown until the end; nothing may claim more than the limit allows.
        return self._limit - self.pos

    def overrun(self, what: str) -> _Malformed:
        return _Malformed(f"{what} would make its deflated data set inflate to more than {self._limit} bytes")

    def _fill(self, count: int) -> None:
        """Inflate until ``count`` bytes are buffered or the stream ends."""
        while len(self._buffer) - self._offset < count and not self._done:
            data = self._inflater.unconsumed_tail or self._handle.read(_INPUT_CHUNK)
            try:
                out = self._inflater.decompress(data, _OUTPUT_CHUNK)
            except zlib.error as exc:
                raise _Malformed("its deflated data set is corrupt") from exc
            if not data and not out:
                if not self._inflater.eof:
                    raise _Malformed("its deflated data set is truncated")
                self._done = True
            if self._inflater.eof:
                self._done = True
            self._produced += len(out)
            if self._produced > self._limit:
                raise _Malformed(f"its deflated data set inflates to more than {self._limit} bytes")
            self._buffer = self._buffer[self._offset :] + out
            self._offset = 0

    def read(self, count: int) -> bytes:
        self._fill(count)
        data = self._buffer[self._offset : self._offset + count]
        if len(data) != count:
            raise _Malformed("its deflated data set is truncated")
        self._offset += count
        self.pos += count
        return data

    def peek(self, count: int) -> bytes:
        self._fill(count)
        return self._buffer[self._offset : self._offset + count]

    def skip(self, count: int) -> None:
        while count > 0:
            step = min(count, _OUTPUT_CHUNK)
            self.read(step)
            count -= step


_Stream = _FileStream | _InflatedStream


@dataclass
class _Frame:
    """An open container: the items of a sequence (or of encapsulated pixel data), or an item's data set."""

    items: bool  # True: expects item tags; False: expects data elements
    end: int | None  # where a defined length ends it
    limit: int | None  # the nearest defined end of it or an enclosing container
    fragments: bool = False  # items of encapsulated pixel data: opaque bytes


@dataclass
class _Found:
    """What the walk of a data set collects at its top level."""

    elements: list[bytes] = field(default_factory=list)  # the wanted elements, as encoded in the file
    image: dict[int, bytes] = field(default_factory=dict)  # values of the image size elements
    pixel_length: int | None = None  # the declared length of native (defined-length) pixel data
    encapsulated: bool = False  # pixel data of undefined length (fragments)
    little: bool = True


@dataclass
class _Scan:
    meta: bytes
    syntax: str
    elements: list[bytes]  # the wanted top-level elements, as encoded in the file


def _element_header(stream: _Stream, little: bool, implicit: bool) -> tuple[int, bytes | None, int, bytes]:
    """(tag, VR or None, length, raw header bytes), decoding as pydicom does (implicit-VR switch included)."""
    head = stream.read(8)
    group, element = struct.unpack("<HH" if little else ">HH", head[:4])
    tag = group << 16 | element
    if implicit or group == 0xFFFE:
        return tag, None, struct.unpack("<L" if little else ">L", head[4:])[0], head
    vr = head[4:6]
    if vr in _VR_LENGTH_32:
        extra = stream.read(4)
        return tag, vr, struct.unpack("<L" if little else ">L", extra)[0], head + extra
    if not b"AA" <= vr <= b"ZZ":
        # Some writers switch to implicit VR inside a data set; pydicom follows them.
        return tag, None, struct.unpack("<L" if little else ">L", head[4:])[0], head
    return tag, vr, struct.unpack("<H" if little else ">H", head[6:])[0], head


def _dictionary_sequence(tag: int) -> bool | None:
    """Whether the data dictionary calls ``tag`` a sequence; ``None`` if it does not know the tag."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return None


def _read_meta(stream: _FileStream) -> tuple[bytes, str]:
    """The raw file meta group (0002,eeee) and its transfer syntax UID."""
    raw = bytearray()
    syntax = ""
    while stream.available() >= 8 and stream.peek(2) == b"\x02\x00":
        tag, _vr, length, head = _element_header(stream, little=True, implicit=False)
        if length > stream.available() or len(raw) + len(head) + length > MAX_META:
            raise _Malformed("its file meta information is oversized or truncated")
        value = stream.read(length)
        raw += head + value
        if tag == 0x00020010:
            syntax = value.decode("ascii", "replace").strip("\x00 ")
    return bytes(raw), syntax


def _encoding(syntax: str, stream: _Stream) -> tuple[bool, bool]:
    """(little endian, implicit VR) of the data set, guessed as pydicom does when the meta names no syntax."""
    if syntax == _IMPLICIT_LE:
        return True, True
    if syntax == _EXPLICIT_BE:
        return False, False
    if syntax:
        return True, False  # explicit VR little endian, deflated and all encapsulated syntaxes
    first = stream.peek(6)
    if len(first) < 6 or first[4:6] not in _KNOWN_VR:
        return True, True
    return struct.unpack("<H", first[:2])[0] < 1024, False


def _overrun(stream: _Stream, nested: bool) -> Callable[[str], _Malformed]:
    def reason(what: str) -> _Malformed:
        if nested:
            return _Malformed(f"{what} is longer than the sequence or item that holds it")
        return stream.overrun(what)

    return reason


def _walk_dataset(stream: _Stream, little: bool, implicit: bool) -> _Found:
    """Walk every element and item of the data set; return what it found at the top level."""
    found = _Found(little=little)
    wanted = found.elements
    stack: list[_Frame] = []
    depth = 0
    count = 0
    unpack_item = struct.Struct("<HHL" if little else ">HHL").unpack
    while True:
        frame = stack[-1] if stack else None
        limit = frame.limit if frame is not None else stream.size
        if frame is None:
            rest = stream.available() if stream.size is not None else len(stream.peek(8))
            if rest < 8:
                break  # pydicom, too, ignores a stub of fewer than 8 bytes at the end
        elif frame.end is not None and stream.pos >= frame.end:
            stack.pop()
            depth -= frame.items and not frame.fragments
            continue
        count += 1
        if count > MAX_ELEMENTS:
            raise _Malformed(f"it has more than {MAX_ELEMENTS} elements")
        room = (limit - stream.pos) if limit is not None else stream.available()
        overrun = _overrun(stream, nested=frame is not None and frame.limit is not None)
        if frame is not None and frame.fragments and len(stack) == 1:
            overrun = _pixels_cut(stream)  # the pixel data's own fragments run out
        if room < 8:
            raise overrun("an element header")
        if frame is not None and frame.items:
            group, element, length = unpack_item(stream.read(8))
            tag = group << 16 | element
            if tag == _SEQUENCE_END and frame.end is None:
                stack.pop()
                depth -= not frame.fragments
            elif tag != _ITEM:
                raise _Malformed("a sequence holds something other than items")
            elif length == _UNDEFINED:
                if frame.fragments:
                    raise _Malformed("a pixel data fragment has an undefined length")
                stack.append(_Frame(items=False, end=None, limit=limit))
            elif length > room - 8:
                raise overrun("an item")
            elif frame.fragments:
                stream.skip(length)
            else:
                stack.append(_Frame(items=False, end=stream.pos + length, limit=stream.pos + length))
            continue
        tag, vr, length, head = _element_header(stream, little, implicit)
        if tag == _ITEM_END and frame is not None and (frame.end is None or stream.pos == frame.end):
            # Some writers close even a defined-length item with a delimiter; pydicom accepts that too.
            stack.pop()
            continue
        if tag >> 16 == 0xFFFE:
            raise _Malformed("an item tag stands where a data element belongs")
        if vr == b"SQ" or (vr == b"UN" and length == _UNDEFINED):
            sequence = True
        elif vr is None:
            known = _dictionary_sequence(tag)
            # An unknown tag of undefined length is read as a sequence, as pydicom does.
            sequence = bool(known) or (known is None and length == _UNDEFINED and tag not in _PIXEL_TAGS)
        else:
            sequence = False
        if length == _UNDEFINED:
            if frame is None and tag in _WANTED:
                raise _Malformed("an identifying element has an undefined length")
            found.encapsulated |= frame is None and tag in _PIXEL_TAGS
            stack.append(_Frame(items=True, end=None, limit=limit, fragments=not sequence))
        elif length > room - len(head):
            if frame is None and tag in _PIXEL_TAGS:
                raise _pixels_cut(stream)("an element")
            raise overrun("an element")
        elif frame is None and tag in _WANTED:
            if length > MAX_VALUE:
                raise _Malformed("an identifying element is oversized")
            wanted.append(head + stream.read(length))
            continue
        elif frame is None and tag in _IMAGE_TAGS and length <= MAX_VALUE:
            found.image.setdefault(tag, stream.read(length))
            continue
        elif frame is None and tag in _PIXEL_TAGS and not sequence:
            if found.pixel_length is None:
                found.pixel_length = length
            stream.skip(length)
            continue
        elif sequence:
            stack.append(_Frame(items=True, end=stream.pos + length, limit=stream.pos + length))
        else:
            stream.skip(length)
            continue
        if sequence:
            depth += 1
            if depth > MAX_SEQUENCE_DEPTH:
                raise _Malformed(f"its sequences are nested deeper than {MAX_SEQUENCE_DEPTH} levels")
    return found


def _pixels_cut(stream: _Stream) -> Callable[[str], _Malformed]:
    """The reason for pixel data (or one of its fragments) that runs past the end: the file was cut short."""

    def reason(_what: str) -> _Malformed:
        if isinstance(stream, _InflatedStream):
            return stream.overrun("its pixel data")
        return _Malformed("its pixel data is longer than what remains of the file (the file is truncated)")

    return reason


def _unsigned(value: bytes, little: bool) -> int | None:
    """The first value of a US element, or None if there is none."""
    if len(value) < 2:
        return None
    return int(struct.unpack("<H" if little else ">H", value[:2])[0])


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").split("\\", 1)[0].strip("\x00 ")


def _check_pixel_length(found: _Found, syntax: str) -> None:
    """Refuse native pixel data shorter than the image its header declares.

    Only what is certain is refused: a value that is missing or odd (a
    frame count that is no number, a subsampled colour model whose size we
    do not compute) leaves the file to the PACS to judge.
    """
    if syntax not in _NATIVE or found.encapsulated:
        return
    rows, columns, bits = (_unsigned(found.image.get(tag, b""), found.little) for tag in (_ROWS, _COLUMNS, _BITS))
    samples = _unsigned(found.image.get(_SAMPLES, b""), found.little) if _SAMPLES in found.image else 1
    if not rows or not columns or not bits or not samples:
        return
    if found.pixel_length is None:
        # Header written, pixels not: what an interrupted writer leaves behind.
        raise _Malformed(f"it declares an image of {rows}x{columns} pixels but holds no pixel data "
                         "(the file is truncated)")
    frames = 1
    if _FRAMES in found.image:
        try:
            frames = int(_text(found.image[_FRAMES]) or "1")
        except ValueError:
            return
        if frames < 1:
            return
    photometric = _text(found.image.get(_PHOTOMETRIC, b""))
    needed_bits = rows * columns * samples * frames * bits
    if photometric.endswith("_422"):
        needed_bits = needed_bits * 2 // 3  # two chroma samples shared by two pixels
    elif photometric.endswith("_420"):
        return
    needed = (needed_bits + 7) // 8  # 1-bit images are packed across frames
    if found.pixel_length < needed:
        raise _Malformed(
            f"its pixel data is shorter than its image size declares ({found.pixel_length} of {needed} bytes; "
            "the file is truncated or damaged)"
        )


def _skip_command_set(stream: _FileStream) -> None:
    # pydicom reads stray command elements (group 0000, implicit VR) before the data set: pass over them.
    while stream.available() >= 8 and stream.peek(2) == b"\x00\x00":
        _tag, _vr, length, _head = _element_header(stream, little=True, implicit=True)
        if length > stream.available():
            raise stream.overrun("an element")
        stream.skip(length)


def _scan(handle: BinaryIO, max_inflated: int) -> _Scan:
    """Check the whole structure of a Part 10 file with bounded memory, time and nesting."""
    size = handle.seek(0, os.SEEK_END)
    handle.seek(0)
    if handle.read(132)[128:] != b"DICM":
        raise _NotPart10
    stream = _FileStream(handle, 132, size)
    meta, syntax = _read_meta(stream)
    if syntax == DEFLATED:
        found = _walk_dataset(_InflatedStream(handle, max_inflated), True, False)
    else:
        _skip_command_set(stream)
        little, implicit = _encoding(syntax, stream)
        found = _walk_dataset(stream, little, implicit)
    _check_pixel_length(found, syntax)
    return _Scan(meta, syntax, found.elements)


def _summary(scan: _Scan) -> bytes:
    """A small Part 10 object: the file meta and the wanted elements, encoded as in the original."""
    body = b"".join(scan.elements)
    if scan.syntax == DEFLATED:
        packer = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        body = packer.compress(body) + packer.flush()
    return bytes(128) + b"DICM" + scan.meta + body


# --- pydicom's warnings ------------------------------------------------------------

# warnings.catch_warnings changes process-wide state: the lock keeps our own
# uses (from the gateway's and receiver's threads) from undoing each other.
_quiet_lock = threading.RLock()
_quiet_state = threading.local()
# pydicom's warnings quote the values they complain about: a log line keeps the complaint only.
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


class _WhileQuiet(logging.Filter):
    """Drops pydicom's own log records (it logs each warning too) in a thread inside :func:`quiet_pydicom`."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(_quiet_state, "depth", 0)


logging.getLogger("pydicom").addFilter(_WhileQuiet())


@contextlib.contextmanager
def quiet_pydicom(label: str) -> Iterator[None]:
    """Run pydicom with its warnings caught, so that none reaches the terminal or the log at WARNING.

    pydicom warns about odd values (a UID with letters, an unknown character
    set) and may quote them; each warning is logged at DEBUG instead, for
    ``label`` (which may name a file, hence not higher), without the quoted
    values.  Refusing a file is for the checks, not for these warnings.
    """
    with _quiet_lock, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_state.depth = getattr(_quiet_state, "depth", 0) + 1
        try:
            yield
        finally:
            _quiet_state.depth -= 1
    for item in caught:
        text = _QUOTED.sub("'...'", str(item.message)).split(" Please see ", 1)[0]
        log.debug("%s: pydicom: %s: %s", label, item.category.__name__, text)


# --- reading ------------------------------------------------------------------


def _decoded(scan: _Scan) -> tuple[str, str, str, str, str, int]:
    """The identifiers of a scanned object, decoded by pydicom from its summary."""
    dataset = pydicom.dcmread(io.BytesIO(_summary(scan)), stop_before_pixels=True, specific_tags=_TAGS)
    meta = dataset.file_meta
    sop_instance = str(dataset.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", ""))
    sop_class = str(dataset.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
    study = str(dataset.get("StudyInstanceUID", ""))
    series = str(dataset.get("SeriesInstanceUID", ""))
    syntax = str(meta.get("TransferSyntaxUID", ""))
    try:
        number = instance_number(dataset.get("InstanceNumber", None))
    except (ValueError, TypeError):  # a value pydicom cannot even convert: it only orders files
        number = 0
    return study, series, sop_instance, sop_class, syntax, number


def _identifiers(source: Path | BinaryIO, label: str, max_inflated: int) -> tuple[str, str, str, str, str, int]:
    """(study, series, SOP instance, SOP class, transfer syntax, instance number); :class:`NotDicomError`."""
    try:
        if isinstance(source, Path):
            with source.open("rb") as handle:
                scan = _scan(handle, max_inflated)
        else:
            scan = _scan(source, max_inflated)
    except _NotPart10:
        raise NotDicomError(f"{label} is not a DICOM Part 10 file", "only DICOM files can be sent as images") from None
    except _Malformed as exc:
        raise NotDicomError(
            f"{label} is not a readable DICOM file: {exc.reason}", "the file is malformed; repair or re-export it"
        ) from None
    except OSError as exc:
        raise NotDicomError(f"{label} is not a readable DICOM file ({type(exc).__name__})") from exc
    try:
        with quiet_pydicom(label):
            identifiers = _decoded(scan)
    except Exception as exc:  # pydicom raises many kinds; its messages may quote the content
        raise NotDicomError(f"{label} is not a readable DICOM file ({type(exc).__name__})") from None
    study, series, sop_instance, sop_class, syntax, number = identifiers
    if sop_class == DICOMDIR_CLASS:
        raise NotDicomError(f"{label} is a DICOMDIR index, not an image", "it is skipped; the images it lists are sent")
    for name, uid in (("SOP Instance UID", sop_instance), ("Study Instance UID", study)):
        if not is_uid(uid):
            raise NotDicomError(f"{label} has no valid {name}", "the file is malformed; repair or re-export it")
    return study, series if is_uid(series) else "", sop_instance, sop_class, syntax, number


def read_dicom_info(path: Path, label: str | None = None, *, max_inflated: int = MAX_INFLATED) -> DicomFile:
    """Read the identifying UIDs of a Part 10 file; :class:`NotDicomError` if it is none.

    The whole file is checked structurally first, with bounded memory;
    a deflated object may inflate to at most ``max_inflated`` bytes.
    """
    study, series, sop_instance, sop_class, syntax, number = _identifiers(path, label or str(path), max_inflated)
    return DicomFile(
        path=path,
        size=path.stat().st_size,
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax_uid=syntax,
        instance_number=number,
    )


def check_dicom_data(data: bytes, label: str, *, max_inflated: int = MAX_INFLATED) -> tuple[str, str]:
    """(SOP Instance UID, Study Instance UID) of Part 10 bytes that :func:`read_dicom_info` will accept.

    The same checks as :func:`read_dicom_info`, so an object accepted now can be packed later;
    :class:`NotDicomError` otherwise.
    """
    study, _series, sop_instance, _class, _syntax, _number = _identifiers(io.BytesIO(data), label, max_inflated)
    return sop_instance, study


@dataclass
class ScanResult:
    files: list[DicomFile]
    skipped: list[tuple[Path, str]]

    def studies(self) -> dict[str, list[DicomFile]]:
        """Files grouped by study, each ordered by series, instance number and path."""
        grouped: dict[str, list[DicomFile]] = {}
        for item in self.files:
            grouped.setdefault(item.study_uid, []).append(item)
        for items in grouped.values():
            items.sort(key=lambda f: (f.series_uid, f.instance_number, str(f.path)))
        return grouped


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    if not name.startswith("."):
                        yield Path(root) / name
        elif path.exists():
            yield path
        else:
            raise InputError(f"{path} does not exist")


def _regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(path.stat().st_mode)
    except OSError:
        return False


def scan(paths: Iterable[Path]) -> ScanResult:
    """Find the DICOM files among ``paths`` (files or folder trees); list the rest as skipped."""
    files: list[DicomFile] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for path in _walk(paths):
        if not _regular(path):
            # A FIFO or device would block or never end; a dangling link has nothing to read.
            skipped.append((path, f"{path} is not a regular file"))
            continue
        try:
            info = read_dicom_info(path)
        except NotDicomError as exc:
            skipped.append((path, exc.message))
            continue
        if info.sop_instance_uid in seen:
            skipped.append((path, f"{path} repeats an instance already found (same SOP Instance UID)"))
            continue
        seen.add(info.sop_instance_uid)
        files.append(info)
    return ScanResult(files=files, skipped=skipped)
