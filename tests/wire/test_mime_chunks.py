"""Block-wise MIME decoding: the same parts, bytes and errors as decoding line by line.

The walker reads about a megabyte at a time, finds delimiters with
``bytes.find`` and decodes base64 a block at a time.  These tests shrink the
block size so that every way a delimiter, a line break or a padding
character can fall across a block edge is tried, and compare the result
with base64 decoded strictly line by line (each line's complete groups).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import random
import tracemalloc
from email.message import Message
from pathlib import Path

import pytest

from dicommail.dicom import scan
from dicommail.errors import WireFormatError
from dicommail.wire import mime
from dicommail.wire.mime import LineReader, read_headers, walk
from dicommail.wire.unpack import unpack_files
from tests.wire.conftest import PRACTICE, Site

BLANKS = b"\r\n \t"


class _Sink:
    def __init__(self, media: str) -> None:
        self.media = media
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True


class _Collect:
    def __init__(self) -> None:
        self.sinks: list[_Sink] = []

    def open_leaf(self, headers: Message) -> _Sink:
        self.sinks.append(_Sink(headers.get_content_type()))
        return self.sinks[-1]


def _walk(raw: bytes) -> tuple[list[tuple[str, bytes]], bytes | None, bytes]:
    """Parts (type, body), the line that ended the walk, and what the reader had left."""
    reader = LineReader(io.BytesIO(raw))
    collect = _Collect()
    ended = walk(reader, read_headers(reader), collect)
    rest = b""
    while line := reader.readline():
        rest += line
    return [(s.media, bytes(s.data)) for s in collect.sinks], ended, rest


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Lines in these tests stay under 90 bytes, so lines are never cut into pieces.
    monkeypatch.setattr(mime, "MAX_LINE", 90)
    monkeypatch.setattr(mime, "READ_BLOCK", 7)
    monkeypatch.setattr(mime, "HEADER_READ", 5)


def _single_part(body_lines: list[bytes], eols: list[bytes], encoding: str = "base64") -> bytes:
    body = b"".join(line + eol for line, eol in zip(body_lines, eols, strict=True))
    return (
        b"Content-Type: multipart/mixed; boundary=\"=_b\"\r\n\r\npreamble\r\n--=_b\r\n"
        b"Content-Type: application/dicom\r\nContent-Transfer-Encoding: " + encoding.encode() + b"\r\n\r\n"
        + body + b"\r\n--=_b--\r\nepilogue\r\n"
    )


def _line_by_line(lines: list[bytes]) -> bytes | str:
    """Strict base64 decoded one line at a time: the decoded bytes, or the error message."""
    rest = b""
    out = bytearray()
    error = ""
    for line in lines:
        text = rest + line.translate(None, BLANKS)
        usable = len(text) - len(text) % 4
        rest = text[usable:]
        try:
            out += binascii.a2b_base64(text[:usable], strict_mode=True)
        except binascii.Error as exc:
            error = f"invalid base64 in a MIME part: {exc}"
            break
    if rest.strip(b"="):
        return "base64 part is truncated (its length is not a multiple of 4)"
    return error or bytes(out)


def _walks_as_lines_decode(lines: list[bytes], eols: list[bytes], seed: int
                           ) -> tuple[list[tuple[str, bytes]], bytes | None, bytes] | None:
    """Assert that one base64 part of ``lines`` decodes (or fails) exactly as line by line; what it walked."""
    raw = _single_part(lines, eols)
    expected = _line_by_line(lines)
    if isinstance(expected, str):
        with pytest.raises(WireFormatError) as caught:
            _walk(raw)
        assert caught.value.message == expected, seed
        return None
    walked = _walk(raw)
    assert walked[0] == [("application/dicom", expected)], seed
    return walked


def _odd_base64_lines(chooser: random.Random) -> list[bytes]:
    encoded = base64.b64encode(chooser.randbytes(chooser.randrange(0, 300)))
    lines = []
    while encoded:
        width = chooser.choice([76, 76, 76, 4, 5, 1, 3, 40])
        line, encoded = encoded[:width], encoded[width:]
        oddity = chooser.random()
        if oddity < 0.06:
            line += b"="  # padding in the middle
        elif oddity < 0.09:
            line += b"=="
        elif oddity < 0.12:
            line = line.replace(b"A", b"*")  # not base64
        elif oddity < 0.18:
            line = line[:2] + chooser.choice([b" ", b"\t", b"\r"]) + line[2:]
        elif oddity < 0.2:
            line = line[:-1]
        lines.append(line)
    if chooser.random() < 0.2:
        lines.append(b"QQ==")  # a second padded group after the end
    return lines


@pytest.mark.usefixtures("small_blocks")
def test_base64_blocks_decode_exactly_as_lines_do() -> None:
    for seed in range(600):
        chooser = random.Random(seed)
        lines = _odd_base64_lines(chooser)
        eols = [chooser.choice([b"\r\n", b"\n", b" \r\n", b"\r\r\n"]) for _ in lines]
        walked = _walks_as_lines_decode(lines, eols, seed)
        assert walked is None or walked[1:] == (None, b""), seed


def test_delimiter_across_every_block_edge(monkeypatch: pytest.MonkeyPatch) -> None:
    payload = bytes(range(256)) * 40
    encoded = base64.encodebytes(payload).replace(b"\n", b"\r\n")
    boundary = b"=_dicommail_0123456789abcdef01234567"
    raw = (
        b"Content-Type: multipart/mixed; boundary=\"" + boundary + b"\"\r\n\r\n--" + boundary + b"\r\n"
        b"Content-Transfer-Encoding: base64\r\n\r\n" + encoded + b"--" + boundary + b"\r\n"
        b"Content-Type: text/plain\r\n\r\nnote\r\n--" + boundary + b"--\r\n"
    )
    monkeypatch.setattr(mime, "HEADER_READ", 3)
    for max_line in range(80, 200):
        for read_block in (1, 7, 64, 100, 4096):
            # Block edges fall everywhere relative to the delimiters, their line breaks
            # and the base64 lines: a delimiter starts, ends or is split at each.
            monkeypatch.setattr(mime, "MAX_LINE", max_line)
            monkeypatch.setattr(mime, "READ_BLOCK", read_block)
            parts, ended, rest = _walk(raw)
            assert parts == [("text/plain", payload), ("text/plain", b"note")]
            assert ended is None and rest == b""


@pytest.mark.usefixtures("small_blocks")
def test_lookalike_delimiters_and_prefix_boundaries() -> None:
    raw = (
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
        b"Content-Type: multipart/mixed; boundary=bb\r\n\r\n--bb\r\n\r\n"
        b"--bx\r\n-- b\r\n--b-\r\n --b\r\n--bbb\r\nx--b\r\n--bb \t\r\n\r\n"
        b"--b \t\r\n\r\nlast\r\n--b--  \r\n"
    )
    parts, ended, rest = _walk(raw)
    # "--bb \t" ends the inner part, "--b \t" the inner multipart: its closing delimiter is missing.
    assert parts == [
        ("text/plain", b"--bx\r\n-- b\r\n--b-\r\n --b\r\n--bbb\r\nx--b"),
        ("text/plain", b""),
        ("text/plain", b"last"),
    ]
    assert ended is None and rest == b""


@pytest.mark.usefixtures("small_blocks")
def test_epilogue_and_missing_closing_delimiter() -> None:
    lines = [base64.b64encode(b"x" * 30)] * 5
    raw = _single_part(lines, [b"\n"] * 5) + b"--=_b\r\ntrailing data\n" * 20
    parts, ended, rest = _walk(raw)
    assert parts == [("application/dicom", b"x" * 150)]
    assert (ended, rest) == (None, b"")  # the epilogue is read and ignored, whatever it holds
    truncated = raw[: raw.index(b"\r\n--=_b--")]
    with pytest.raises(WireFormatError, match="closing delimiter is missing"):
        _walk(truncated)
    # A body ending without a line break, and a delimiter as the very last bytes.
    assert _walk(truncated + b"\r\n--=_b--")[0] == parts
    assert _walk(truncated + b"\n--=_b--")[0] == parts


def test_a_delimiter_where_a_long_line_is_cut_still_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    # As with readline(MAX_LINE): a longer line comes in pieces, and a piece
    # starting with a delimiter is one (a sender never writes such lines).
    monkeypatch.setattr(mime, "MAX_LINE", 16)
    monkeypatch.setattr(mime, "READ_BLOCK", 5)
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n" + b"x" * 16 + b"--b--\r\n"
    assert _walk(raw)[0] == [("text/plain", b"x" * 16)]
    raw = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\n" + b"x" * 15 + b"--b--\r\n"
    with pytest.raises(WireFormatError, match="truncated"):
        _walk(raw)


@pytest.mark.usefixtures("small_blocks")
def test_quoted_printable_and_7bit_keep_their_line_breaks() -> None:
    lines = [b"M=C3=BCller soft=", b"break", b"tab\tend  ", b"a=3D=", b"", b"x\r"]
    eols = [b"\r\n", b"\n", b"\r\n", b"\r\n", b"\n", b"\r\n"]
    parts, _ended, _rest = _walk(_single_part(lines, eols, "quoted-printable"))
    assert parts == [("application/dicom", "Müller softbreak\r\ntab\tend  \r\na=\r\nx\r\r\n".encode())]
    parts, _ended, _rest = _walk(_single_part(lines, eols, "7bit"))
    assert parts == [("application/dicom", b"".join(a + b for a, b in zip(lines, eols, strict=True)))]


def test_many_lookalike_lines_and_many_small_parts() -> None:
    # 200,000 lines that start like delimiters: one step each, as reading line by line took.
    raw = (
        b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\n"
        b"Content-Type: multipart/mixed; boundary=in\r\n\r\n--in\r\n\r\n"
        + b"--inx\n--outerx\n" * 100_000
        + b"--in--\r\n--outer--\r\n"
    )
    parts, ended, _rest = _walk(raw)
    assert parts == [("text/plain", b"--inx\n--outerx\n" * 99_999 + b"--inx\n--outerx")]
    assert ended is None
    # Thousands of small parts ahead of a long line: each part costs its own size, not a block's.
    raw = (
        b"Content-Type: multipart/mixed; boundary=outer\r\n\r\n--outer\r\n"
        b"Content-Type: multipart/mixed; boundary=in\r\n\r\n--in\r\n"
        + b"\r\nx\r\n--in\r\n" * 9000 + b"\r\n" + b"y" * 3 * mime.MAX_LINE + b"\r\n--in--\r\n--outer--\r\n"
    )
    parts, ended, _rest = _walk(raw)
    assert parts[:-1] == [("text/plain", b"x")] * 9000 and parts[-1] == ("text/plain", b"y" * 3 * mime.MAX_LINE)


class _Base64Stream(io.RawIOBase):
    """A mail with one base64 part of ``lines`` lines, made up while it is read."""

    def __init__(self, lines: int) -> None:
        self.head = (
            b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\n"
        )
        self.line = base64.b64encode(bytes(range(57))) + b"\r\n"
        self.left = lines
        self.tail = b"--b--\r\n"
        self.pending = self.head

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        while len(self.pending) < len(buffer) and (self.left or self.tail):
            count = min(self.left, 4096)
            self.pending += self.line * count
            self.left -= count
            if not self.left:
                self.pending += self.tail
                self.tail = b""
        size = min(len(buffer), len(self.pending))
        buffer[:size] = self.pending[:size]
        self.pending = self.pending[size:]
        return size


class _Digest:
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def open_leaf(self, headers: Message) -> _Digest:
        return self

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.digest.update(data)

    def close(self) -> None:
        pass


def test_memory_is_bounded_by_the_block_not_the_part() -> None:
    lines = 400_000  # a 30 MiB base64 part (22 MiB decoded)
    sink = _Digest()
    tracemalloc.start()
    try:
        reader = LineReader(io.BufferedReader(_Base64Stream(lines)))
        walk(reader, read_headers(reader), sink)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sink.size == 57 * lines
    assert sink.digest.digest() == hashlib.sha256(bytes(range(57)) * lines).digest()
    assert peak < 12 * mime.MAX_LINE  # the stream's own buffer, two blocks and their decoded copies


def test_unpack_decrypts_ahead_and_keeps_the_input_order(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    # A broken copy of a mail among the others: it is rejected, in its place, and the set
    # still unpacks; every input is counted once although gpg works ahead of the decoding.
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2).pack(scan(ct_study[:6]).files, tmp_path / "sent")
    mails = [m.path for m in packed.mails]
    assert len(mails) >= 3
    broken = tmp_path / "broken.eml"
    data = bytearray(mails[1].read_bytes())
    middle = data.index(b"\n", data.index(b"-----BEGIN PGP MESSAGE-----") + 4000) + 5
    data[middle] = ord("A") if data[middle] != ord("A") else ord("B")
    broken.write_bytes(bytes(data))
    given = [mails[0], broken, *mails[1:]]
    counted: list[int] = []
    report = unpack_files(given, practice_site.keyring, tmp_path / "out", max_output=1024**3,
                          progress=counted.append)
    assert sum(counted) == len(given)
    assert [path for path, _error in report.rejected] == [broken]
    assert [s.ok for s in report.sets] == [True]
    written = report.sets[0].directory
    assert written is not None and len(list(written.glob("*.dcm"))) == 6
