"""Hostile input: deep MIME, garbled manifests and DICOM bombs end in a clean, bounded error.

Each case is tried directly on the parser and, where cheap, through
:func:`dicommail.wire.unpack.open_mail` on a mail signed and encrypted with
the demo keys, as a certified (but careless or hostile) peer would send it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import random
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import pytest

from dicommail import dicom
from dicommail.dicom import check_dicom_data, read_dicom_info
from dicommail.errors import DicommailError, NotDicomError, WireFormatError
from dicommail.samples import pydicom_sample
from dicommail.wire import headers as h
from dicommail.wire.manifest import MAX_JSON_DEPTH, Manifest, ManifestEntry
from dicommail.wire.mime import MAX_DEPTH, MAX_HEADER_LINES, MAX_PARTS, LineReader, read_headers, walk
from dicommail.wire.unpack import open_mail
from tests.wire.conftest import PRACTICE, Site
from tests.wire.forge import dicom_part, encrypted_mail, inner_entity

MAX = 1024**3
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"
DEFLATED = "1.2.840.10008.1.2.1.99"
STUDY, SERIES, INSTANCE = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", "1.2.826.0.1.3680043.8.498.3"


# --- crafting ------------------------------------------------------------------


def _even(value: bytes, pad: bytes = b"\x00") -> bytes:
    return value + pad if len(value) % 2 else value


def element(tag: int, vr: str, value: bytes, *, length: int | None = None, implicit: bool = False) -> bytes:
    """One data element, little endian; ``length`` overrides the declared length."""
    declared = len(value) if length is None else length
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if implicit:
        return head + struct.pack("<L", declared) + value
    if vr in ("OB", "OW", "SQ", "UN", "UT"):
        return head + vr.encode() + b"\x00\x00" + struct.pack("<L", declared) + value
    return head + vr.encode() + struct.pack("<H", declared) + value


def uid(tag: int, value: str, implicit: bool = False) -> bytes:
    return element(tag, "UI", _even(value.encode()), implicit=implicit)


def identifying(implicit: bool = False) -> bytes:
    """SOP class and instance, study and series UIDs, in tag order."""
    return (
        uid(0x00080016, CT, implicit)
        + uid(0x00080018, INSTANCE, implicit)
        + uid(0x0020000D, STUDY, implicit)
        + uid(0x0020000E, SERIES, implicit)
    )


def part10(dataset: bytes, syntax: str = EXPLICIT) -> bytes:
    """A Part 10 file: preamble, file meta information (explicit VR little endian) and ``dataset`` as given."""
    meta = (
        element(0x00020001, "OB", b"\x00\x01")
        + uid(0x00020002, CT)
        + uid(0x00020003, INSTANCE)
        + uid(0x00020010, syntax)
    )
    return bytes(128) + b"DICM" + element(0x00020000, "UL", struct.pack("<L", len(meta))) + meta + dataset


def deflate(data: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return packer.compress(data) + packer.flush()


def nested_sequences(depth: int, *, defined: bool = False, tag: int = 0x00081140) -> bytes:
    """``depth`` sequences, each the only element of the one item of the enclosing one."""
    if defined:
        # Each level is a sequence header (12 bytes) and an item header (8): lengths follow from the depth.
        return b"".join(
            element(tag, "SQ", b"", length=20 * level + 8) + struct.pack("<HHL", 0xFFFE, 0xE000, 20 * level)
            for level in reversed(range(depth))
        )
    opening = element(tag, "SQ", b"", length=0xFFFFFFFF) + struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF)
    closing = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def _write(tmp_path: Path, data: bytes, name: str = "x.dcm") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- DICOM -----------------------------------------------------------------------


def test_crafted_objects_are_readable_when_well_formed(tmp_path: Path) -> None:
    # The crafting helpers themselves make objects that are accepted: the refusals below are the faults'.
    number = element(0x00200013, "IS", b"7 ")
    for syntax, body in (
        (EXPLICIT, identifying() + number),
        (IMPLICIT, identifying(implicit=True) + element(0x00200013, "IS", b"7 ", implicit=True)),
        (DEFLATED, deflate(identifying() + number + element(0x00091001, "OB", bytes(4096)))),
        (EXPLICIT, identifying() + number + nested_sequences(dicom.MAX_SEQUENCE_DEPTH, tag=0x00400275)),
        (EXPLICIT, nested_sequences(dicom.MAX_SEQUENCE_DEPTH, defined=True) + identifying()),
    ):
        data = part10(body, syntax)
        info = read_dicom_info(_write(tmp_path, data))
        assert (info.study_uid, info.sop_instance_uid, info.transfer_syntax_uid) == (STUDY, INSTANCE, syntax)
        assert check_dicom_data(data, "x") == (INSTANCE, STUDY)


@pytest.mark.parametrize("defined", [False, True])
@pytest.mark.parametrize("tag", [0x00081140, 0x00400275])  # before and after the identifying elements
def test_sequences_nested_20000_deep(tmp_path: Path, defined: bool, tag: int) -> None:
    body = nested_sequences(20_000, defined=defined, tag=tag)
    data = part10(identifying() + body if tag > 0x00200013 else body + identifying())
    with pytest.raises(NotDicomError, match="nested deeper than 64"):
        read_dicom_info(_write(tmp_path, data), label="part 1, file 1")
    with pytest.raises(NotDicomError, match="nested deeper"):
        check_dicom_data(data, "instance")


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("tag", [0x00091001, 0x7FE00010])
def test_element_length_beyond_the_file(tmp_path: Path, implicit: bool, tag: int) -> None:
    body = identifying(implicit) + element(tag, "OB", bytes(16), length=0xFFFFFFF0, implicit=implicit)
    path = _write(tmp_path, part10(body, IMPLICIT if implicit else EXPLICIT))
    with pytest.raises(NotDicomError, match="longer than what remains") as caught:
        read_dicom_info(path, label="part 1, file 1")
    assert "x.dcm" not in caught.value.message and str(tmp_path) not in caught.value.message


def test_item_and_identifying_element_lengths_are_bounded(tmp_path: Path) -> None:
    item = struct.pack("<HHL", 0xFFFE, 0xE000, 0xFFFFFFF0)
    sequence = element(0x00081140, "SQ", item, length=0xFFFFFFFF)
    with pytest.raises(NotDicomError, match="item is longer"):
        read_dicom_info(_write(tmp_path, part10(sequence + identifying())))
    huge_uid = element(0x00080018, "UN", b"1" * 5000)
    with pytest.raises(NotDicomError, match="oversized"):
        read_dicom_info(_write(tmp_path, part10(uid(0x00080016, CT) + huge_uid)))
    not_items = element(0x00081140, "SQ", element(0x00100010, "PN", b"AB"))
    with pytest.raises(NotDicomError, match="other than items"):
        read_dicom_info(_write(tmp_path, part10(not_items + identifying())))


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the damaged UIDs
def test_truncated_and_garbage_objects(tmp_path: Path) -> None:
    good = part10(identifying() + element(0x7FE00010, "OW", bytes(1000)))
    with pytest.raises(NotDicomError, match="longer than what remains"):
        read_dicom_info(_write(tmp_path, good[:-100]))
    with pytest.raises(NotDicomError, match="not a DICOM Part 10 file"):
        read_dicom_info(_write(tmp_path, b"MZ" + bytes(300)))
    rng = random.Random(8)
    for _ in range(300):
        # Random damage anywhere after the preamble: only ever a NotDicomError (or a clean read).
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(132, len(data))] = rng.randrange(256)
        with contextlib.suppress(NotDicomError):
            check_dicom_data(bytes(data[: rng.randint(132, len(data))]), "x")


@functools.cache
def _bomb(megabytes: int, level: int = 9) -> bytes:
    """A deflated object, valid in structure, whose data set inflates to about ``megabytes`` MiB of zeros.

    Level 9 makes the smallest file (about 1 KiB per MiB), level 1 one that inflates fastest.
    """
    chunk = element(0x00091001, "OB", bytes(1024 * 1024))
    packer = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = packer.compress(identifying())
    for _ in range(megabytes):
        body += packer.compress(chunk)
    return part10(body + packer.flush(), DEFLATED)


def test_deflate_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    path = _write(tmp_path, _bomb(200))
    assert path.stat().st_size < 300 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(NotDicomError, match=r"inflates? to more than"):
            read_dicom_info(path, label="part 1, file 1", max_inflated=64 * 1024**2)
        _size, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * 1024**2
    # A length that no limit allows is refused before anything is inflated.
    claim = deflate(identifying() + element(0x00091001, "OB", bytes(64), length=0xFFFFFFF0))
    with pytest.raises(NotDicomError, match="would make its deflated data set inflate to more than"):
        read_dicom_info(_write(tmp_path, part10(claim, DEFLATED), "claim.dcm"))
    # Corrupt or cut deflate streams are refused too (pydicom's own inflate would raise zlib.error).
    with pytest.raises(NotDicomError, match="deflated data set"):
        read_dicom_info(_write(tmp_path, part10(b"\xff" * 64, DEFLATED), "corrupt.dcm"))
    cut = deflate(identifying() + element(0x00091001, "OB", bytes(64)))[:-3]
    with pytest.raises(NotDicomError, match="truncated"):
        read_dicom_info(_write(tmp_path, part10(cut, DEFLATED), "cut.dcm"))


def test_deflate_bomb_with_the_default_limit_keeps_rss_low(tmp_path: Path) -> None:
    # In a fresh interpreter, so that the maximum resident size is this read's alone.
    path = _write(tmp_path, _bomb(1100, level=1))
    script = textwrap.dedent(
        f"""
        import resource
        from pathlib import Path
        from dicommail.dicom import read_dicom_info
        from dicommail.errors import NotDicomError
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            read_dicom_info(Path({str(path)!r}))
        except NotDicomError as exc:
            print("refused", exc.message)
        print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                            cwd=Path(__file__).resolve().parents[2])
    refused, numbers = result.stdout.strip().splitlines()
    assert refused.startswith("refused") and "to more than 1073741824 bytes" in refused
    before, after = map(int, numbers.split())
    assert after - before < 64 * 1024  # ru_maxrss is in KiB on Linux


def test_valid_samples_still_read() -> None:
    for name in ("JPEG-lossy.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm", "image_dfl.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm", "rtplan.dcm", "waveform_ecg.dcm", "CT_small.dcm"):
        info = read_dicom_info(pydicom_sample(name))
        assert info.sop_instance_uid and info.study_uid


# --- MIME ------------------------------------------------------------------------


class _Collect:
    def __init__(self) -> None:
        self.leaves = 0

    def open_leaf(self, headers: object) -> None:
        self.leaves += 1


def _walk(raw: bytes) -> _Collect:
    reader = LineReader(io.BytesIO(raw))
    collect = _Collect()
    walk(reader, read_headers(reader), collect)
    return collect


def nested_multipart(levels: int, leaf: bytes = b"Content-Type: text/plain\r\n\r\nx\r\n") -> bytes:
    opening = b"".join(b"Content-Type: multipart/mixed; boundary=b%d\r\n\r\n--b%d\r\n" % (i, i) for i in range(levels))
    return opening + leaf + b"".join(b"--b%d--\r\n" % i for i in reversed(range(levels)))


def test_mime_nesting_is_bounded_without_recursion() -> None:
    assert _walk(nested_multipart(MAX_DEPTH)).leaves == 1
    with pytest.raises(WireFormatError, match=f"MIME nested deeper than {MAX_DEPTH} levels"):
        _walk(nested_multipart(MAX_DEPTH + 1))
    with pytest.raises(WireFormatError, match="nested deeper"):
        _walk(nested_multipart(3000))


def test_mime_parts_and_header_lines_are_bounded() -> None:
    head = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n"
    assert _walk(head + b"--b\r\n\r\nx\r\n" * (MAX_PARTS - 1) + b"--b--\r\n").leaves == MAX_PARTS - 1
    with pytest.raises(WireFormatError, match=f"more than {MAX_PARTS} parts"):
        _walk(head + b"--b\r\n\r\n" * (MAX_PARTS + 1) + b"--b--\r\n")
    with pytest.raises(WireFormatError, match=f"more than {MAX_HEADER_LINES} lines"):
        _walk(b"X-A: 1\r\n" * (MAX_HEADER_LINES + 1) + b"\r\n")
    with pytest.raises(WireFormatError, match="64 KiB"):
        _walk(b"X-A: " + b"a" * 70_000 + b"\r\n\r\n")


@pytest.mark.parametrize("content_type", [
    b"multipart/mixed; boundary*=''",
    b"multipart/mixed; boundary*0*=us-ascii'en'%ZZ; boundary*1=x",
    b"multipart/mixed; boundary*=utf-8''%ff%fe",
    b'multipart/mixed; boundary="',
    b"multipart/\xff\xfe; boundary=\xff",
    b"multipart/mixed;;;=;boundary==",
    b"multipart/mixed; boundary*0=a; boundary*2=b",
    b"multipart/mixed; boundary=" + b"x" * 300,
])
def test_malformed_content_type_is_a_format_error(content_type: bytes) -> None:
    with pytest.raises(WireFormatError):
        _walk(b"Content-Type: " + content_type + b"\r\n\r\n--a\r\n\r\nx\r\n")


def test_random_content_types_raise_only_format_errors() -> None:
    rng = random.Random(3156)
    alphabet = b"multipart/mixed; boundary*0*=\"'%\\ \t\r\n()<>@,:;=?\xff\x00ab"
    for _ in range(500):
        value = bytes(rng.choice(alphabet) for _ in range(rng.randint(1, 60)))
        # Accepted (a garbled type reads as text/plain) or refused, but never another exception.
        with contextlib.suppress(WireFormatError):
            _walk(b"Content-Type: " + value[:3] + b"multipart/" + value + b"\r\n\r\n--a\r\n\r\nx\r\n--a--\r\n")


# --- manifest --------------------------------------------------------------------


def _manifest(**changes: object) -> dict[str, object]:
    entry = ManifestEntry("f1.x@dicommail", "IM1.dcm", "dicom", 3, "a" * 64, sop_instance_uid="1.2.3")
    document: dict[str, object] = json.loads(Manifest("2.25.1", "1.2.3", 1, 2, 5, 10, [entry]).to_json())
    document.update(changes)
    return document


def _entry_with(**changes: object) -> dict[str, object]:
    document = _manifest()
    files = document["files"]
    assert isinstance(files, list)
    files[0].update(changes)
    return document


@pytest.mark.parametrize("document", [
    _entry_with(size="1234"), _entry_with(size=True), _entry_with(size=3.0), _entry_with(size=-1),
    _entry_with(size=2**70), _entry_with(sha256=5), _entry_with(sha256="A" * 64), _entry_with(sha256="a" * 63),
    _entry_with(content_id=["a"]), _entry_with(content_id="x" * 5000), _entry_with(name={"a": 1}),
    _entry_with(kind=None), _entry_with(sop_instance_uid=1.5), _entry_with(surplus=1),
    _manifest(set_part=1.0), _manifest(set_part=True), _manifest(set_total="2"), _manifest(set_bytes=None),
    _manifest(files={}), _manifest(files=[1]), _manifest(files=[[]]), _manifest(files="abc"),
    _manifest(version=True), _manifest(version="1"), _manifest(set_id=None), _manifest(set_id="1.2\n"),
    _manifest(study_instance_uid=["1.2.3"]), _manifest(created=7),
    _manifest(files=[_entry_with()["files"][0]] * 2),  # type: ignore[index]
])
def test_manifest_with_wrong_types_is_a_format_error(document: dict[str, object]) -> None:
    with pytest.raises(WireFormatError):
        Manifest.from_json(json.dumps(document).encode())


@pytest.mark.parametrize("data", [
    b"[" * 100_000,
    b"{\"a\":" * 100_000,
    b'{"format": "dicommail-manifest", "x": ' + b"[" * (MAX_JSON_DEPTH + 1) + b"]" * (MAX_JSON_DEPTH + 1) + b"}",
    b"[]," * 1_000_000,
    b"1" * 5000,
    b"\xff\xfe",
])
def test_deeply_nested_or_odd_json_is_a_format_error(data: bytes) -> None:
    with pytest.raises(WireFormatError):
        Manifest.from_json(data)


def test_brackets_inside_strings_do_not_count() -> None:
    document = _entry_with(name="[[[[[[[[[[{{{{{{{{{{ \\\" ]]]")
    assert Manifest.from_json(json.dumps(document).encode()).files[0].name.startswith("[[[")


# --- through open_mail -------------------------------------------------------------


def _open(site: Site, mail: Path, tmp_path: Path) -> None:
    open_mail(mail, site.keyring, tmp_path / "work", max_output=MAX)


def test_outer_mime_bomb_is_refused_before_decryption(practice_site: Site, tmp_path: Path) -> None:
    # Unauthenticated: 3,000 levels inside multipart/encrypted, as the 210 KB mail.
    head = (
        b"From: x@y.test\r\nX-TELEMEDICINE-SETID: 2.25.1\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="E"\r\n\r\n--E\r\n'
    )
    mail = _write(tmp_path, head + nested_multipart(3000) + b"--E--\r\n", "bomb.eml")
    with pytest.raises(WireFormatError, match="nested deeper"):
        _open(practice_site, mail, tmp_path)


def _dicom_mail(site: Site, tmp_path: Path, data: bytes, manifest: bytes | None = None) -> Path:
    parts = [dicom_part(data, "IM1.dcm")]
    if manifest is not None:
        parts.append(f"Content-Type: {h.MANIFEST_TYPE}\r\n\r\n".encode() + manifest + b"\r\n")
    inner = inner_entity(parts, {h.SETID: "2.25.77", h.SETPART: "1", h.SETTOTAL: "1"})
    return encrypted_mail(site, PRACTICE, inner, tmp_path / "mail.eml")


def test_inner_mime_bomb_from_a_certified_peer(hospital_site: Site, practice_site: Site, tmp_path: Path) -> None:
    inner = b"MIME-Version: 1.0\r\n" + nested_multipart(3000)
    mail = encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / "mail.eml")
    with pytest.raises(WireFormatError, match="nested deeper"):
        _open(practice_site, mail, tmp_path)


def test_garbled_manifest_from_a_certified_peer(hospital_site: Site, practice_site: Site, tmp_path: Path) -> None:
    data = part10(identifying())
    entry = {"content_id": ["IM1"], "name": "IM1.dcm", "kind": "dicom", "size": str(len(data)),
             "sha256": hashlib.sha256(data).hexdigest(), "sop_instance_uid": INSTANCE}
    document = _manifest(set_id="2.25.77", set_part=1, set_total=1, files=[entry])
    mail = _dicom_mail(hospital_site, tmp_path, data, json.dumps(document).encode())
    with pytest.raises(WireFormatError, match="manifest entry 1"):
        _open(practice_site, mail, tmp_path)
    nested = _dicom_mail(hospital_site, tmp_path, data, b"[" * 100_000)
    with pytest.raises(WireFormatError, match=r"arrays or objects|nested deeper"):
        _open(practice_site, nested, tmp_path)


@pytest.mark.parametrize("case", ["nested", "length", "bomb"])
def test_dicom_bombs_from_a_certified_peer(hospital_site: Site, practice_site: Site, tmp_path: Path,
                                           case: str) -> None:
    data = {
        "nested": lambda: part10(identifying() + nested_sequences(20_000, tag=0x00400275)),
        "length": lambda: part10(identifying() + element(0x7FE00010, "OB", bytes(16), length=0xFFFFFFF0)),
        "bomb": lambda: _bomb(1100, level=1),
    }[case]()
    mail = _dicom_mail(hospital_site, tmp_path, data)
    with pytest.raises(NotDicomError) as caught:
        _open(practice_site, mail, tmp_path)
    assert isinstance(caught.value, DicommailError) and "IM1" not in caught.value.message
