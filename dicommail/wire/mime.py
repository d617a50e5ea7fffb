"""Streaming MIME: write parts to a file and walk a multipart file part by part.

Mails of a study can be hundreds of megabytes; Python's ``email`` package
holds a whole message in memory several times over.  These helpers work
in blocks of about a megabyte (base64 is encoded and decoded a block at a
time, delimiters found with ``bytes.find``), so memory stays bounded by the
block size, not by the study or even the mail.
"""

from __future__ import annotations

import binascii
import email.parser
import email.policy
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from email.message import Message
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from dicommail.errors import WireFormatError

CRLF = b"\r\n"
#: Mail files on disk use the Unix line end, as Maildir and mail tools do;
#: SMTP turns it into CRLF on the wire.
LF = b"\n"
#: Base64 lines of 76 characters (RFC 2045) come from 57 input bytes.
BASE64_LINE_INPUT = 57
#: Encode this many bytes per write: a multiple of 57 so lines stay whole.
BASE64_CHUNK = BASE64_LINE_INPUT * 1024
#: Longest header block we accept; a real one is a few hundred bytes.
MAX_HEADER_BLOCK = 64 * 1024
#: Most lines in one header block (folded continuation lines count too).
MAX_HEADER_LINES = 1000
#: Deepest multipart nesting we walk; our mails use two levels, other senders a few more.
MAX_DEPTH = 16
#: Most parts (leaves and multiparts) in one entity walked: each leaf may become a file.
MAX_PARTS = 10_000
#: Longest line we look at as a unit; longer "lines" are read in pieces.
#: Bodies are also scanned and decoded in blocks of this size.
MAX_LINE = 1024 * 1024
#: Bytes read from the file at a time while scanning a body.
READ_BLOCK = 1024 * 1024
#: Bytes read at a time while reading header lines (a header block is a few hundred bytes).
HEADER_READ = 64 * 1024
_LF = ord("\n")
_CRLF_ARRAY = np.frombuffer(b"\r\n", dtype=np.uint8)
_UNSAFE_PARAM = re.compile(r'[\x00-\x1f\x7f"\\]')

_header_parser = email.parser.BytesHeaderParser(policy=email.policy.compat32)


def new_boundary() -> str:
    # The "=_" sequence cannot occur in base64 or quoted-printable bodies.
    return f"=_dicommail_{secrets.token_hex(12)}"


def safe_param(value: str, fallback: str = "file") -> str:
    """A MIME parameter value that cannot break out of its quotes or header line."""
    cleaned = _UNSAFE_PARAM.sub("_", value).strip()
    ascii_only = cleaned.encode("ascii", "replace").decode("ascii").replace("?", "_")
    return ascii_only[:200] or fallback


def header_block(fields: Iterable[tuple[str, str]], eol: bytes = CRLF) -> bytes:
    """Render header fields, one per line; values must already be safe."""
    lines = []
    for name, value in fields:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"line break in header {name!r}")
        lines.append(f"{name}: {value}".encode("ascii") + eol)
    return b"".join(lines)


def wire_size(path: Path) -> int:
    """Size of a mail file once SMTP has turned its bare LF line ends into CRLF."""
    size = lf = crlf = 0
    last = b""
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            size += len(chunk)
            lf += chunk.count(b"\n")
            crlf += chunk.count(b"\r\n") + (1 if last == b"\r" and chunk[:1] == b"\n" else 0)
            last = chunk[-1:]
    return size + lf - crlf


def write_base64(source: BinaryIO, out: BinaryIO, hasher: _Hasher | None = None) -> int:
    """Copy ``source`` to ``out`` as base64 lines of 76 characters; return bytes read."""
    total = 0
    while True:
        chunk = source.read(BASE64_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if hasher is not None:
            hasher.update(chunk)
        encoded = binascii.b2a_base64(chunk, newline=False)
        if len(chunk) == BASE64_CHUNK:
            # Whole lines only: numpy inserts the line breaks without a Python
            # loop (and without holding the GIL), a third of packing's CPU time otherwise.
            lines = np.frombuffer(encoded, dtype=np.uint8).reshape(-1, 76)
            framed = np.empty((lines.shape[0], 78), dtype=np.uint8)
            framed[:, :76] = lines
            framed[:, 76:] = _CRLF_ARRAY
            out.write(framed.tobytes())
        else:
            out.write(CRLF.join(encoded[i : i + 76] for i in range(0, len(encoded), 76)) + CRLF)
    return total


def base64_size(size: int) -> int:
    """Bytes that :func:`write_base64` produces for ``size`` input bytes."""
    encoded = (size + 2) // 3 * 4
    lines = (encoded + 75) // 76
    return encoded + 2 * lines


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


# --- reading ----------------------------------------------------------------


class LeafSink(Protocol):
    """Receives the decoded body of one non-multipart part."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class PartHandler(Protocol):
    """Decides, per leaf part, where its decoded body goes (``None``: skip it)."""

    def open_leaf(self, headers: Message) -> LeafSink | None: ...


class LineReader:
    """Lines and large blocks from a binary file, with one line of push-back.

    A line is what ``readline(MAX_LINE)`` returns: up to and including its
    LF, and a longer line comes in pieces of :data:`MAX_LINE` bytes.  Bodies
    are scanned a block at a time (:meth:`scan`) but delimiters are still
    recognised only where such a line starts, so the result is the same as
    reading the file line by line, and memory stays bounded by two blocks.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._buffer = b""
        self._pos = 0
        self._eof = False

    def _fill(self, wanted: int, step: int) -> None:
        """Buffer at least ``wanted`` bytes after the position, unless the file ends first."""
        if self._eof or len(self._buffer) - self._pos >= wanted:
            return
        pieces = [self._buffer[self._pos :]]
        have = len(pieces[0])
        while have < wanted:
            data = self._stream.read(max(step, wanted - have))
            if not data:
                self._eof = True
                break
            pieces.append(data)
            have += len(data)
        self._buffer = b"".join(pieces)
        self._pos = 0

    def readline(self) -> bytes:
        while True:
            start = self._pos
            end = self._buffer.find(b"\n", start, start + MAX_LINE)
            if end >= 0:
                end += 1
                break
            if self._eof or len(self._buffer) - start >= MAX_LINE:
                end = min(len(self._buffer), start + MAX_LINE)
                break
            # Header blocks are small: read them in small steps, not a whole block.
            self._fill(len(self._buffer) - start + 1, HEADER_READ)
        self._pos = end
        return self._buffer[start:end]

    def push_back(self, line: bytes) -> None:
        self._buffer = line + self._buffer[self._pos :]
        self._pos = 0

    def scan(self, boundaries: tuple[bytes, ...], take: Callable[[bytes], None] | None) -> bytes | None:
        """Consume up to and including the next delimiter line of ``boundaries``; return it (``None`` at EOF).

        The bytes before it go to ``take`` in blocks of at most :data:`MAX_LINE`
        bytes, each ending where a line ends (or where a line too long to be
        one is cut), as consecutive calls to :meth:`readline` would have split them.
        """
        while True:
            self._fill(MAX_LINE, READ_BLOCK)
            buffer, start = self._buffer, self._pos
            if start >= len(buffer):
                return None
            limit = min(len(buffer), start + MAX_LINE)
            if boundaries:
                # Searched from the start, not from the block's end: a small part costs its size.
                for candidate in _dashed_lines(buffer, start, limit):
                    line_end = buffer.find(b"\n", candidate, limit) + 1
                    if not line_end:
                        if candidate > start:
                            break  # a line that goes on past the block: the next block starts with it
                        line_end = limit  # a line cut into pieces, or the last one of the file
                    line = buffer[candidate:line_end]
                    if _matches(line, boundaries) is not None:
                        if take is not None and candidate > start:
                            take(buffer[start:candidate])
                        self._pos = line_end
                        return line
            end = buffer.rfind(b"\n", start, limit) + 1 or limit
            if take is not None:
                take(buffer[start:end])
            self._pos = end


def _dashed_lines(buffer: bytes, start: int, end: int) -> Iterator[int]:
    """Starts of the lines in ``buffer[start:end]`` (``start`` starts one) that begin with "--".

    A search for "-" (memchr-fast; base64 has none) finds the next line that
    may be one; a line with a "-" elsewhere is skipped whole, so the cost is
    one step per line holding a "-", whatever the boundaries or the nesting.
    """
    position = start
    while True:
        dash = buffer.find(b"-", position, end)
        if dash < 0:
            return
        if (dash == position or buffer[dash - 1] == _LF) and buffer.startswith(b"--", dash):
            yield dash
        position = buffer.find(b"\n", dash, end) + 1
        if position == 0:
            return


def read_headers(reader: LineReader) -> Message:
    """Read a header block up to its empty line; parse it leniently."""
    block = bytearray()
    lines = 0
    while True:
        line = reader.readline()
        if not line or line in (b"\r\n", b"\n"):
            break
        block += line
        lines += 1
        if len(block) > MAX_HEADER_BLOCK:
            raise WireFormatError("a MIME header block is larger than 64 KiB", "the mail is malformed or hostile")
        if lines > MAX_HEADER_LINES:
            raise WireFormatError(
                f"a MIME header block has more than {MAX_HEADER_LINES} lines", "the mail is malformed or hostile"
            )
    try:
        return _header_parser.parsebytes(bytes(block))
    except Exception as exc:  # the email package is lenient, but guard against its corner cases
        raise WireFormatError(f"a MIME header block cannot be parsed ({type(exc).__name__})") from exc


def _is_multipart(headers: Message) -> bool:
    try:
        return headers.get_content_maintype() == "multipart"
    except Exception as exc:  # a garbled Content-Type must not escape as anything but a format error
        raise WireFormatError(f"a MIME part has an unreadable Content-Type ({type(exc).__name__})") from exc


def _boundary_of(headers: Message) -> bytes:
    try:
        boundary = headers.get_param("boundary")
        media = headers.get_content_type()
    except Exception as exc:  # RFC 2231 parameters and odd quoting reach deep into the email package
        raise WireFormatError(f"a multipart part has an unreadable boundary ({type(exc).__name__})") from exc
    if not isinstance(boundary, str) or not boundary or len(boundary) > 200:
        raise WireFormatError(f"{media} part without a usable boundary")
    return boundary.encode("ascii", "replace")


def _matches(line: bytes, boundaries: tuple[bytes, ...]) -> bytes | None:
    """The boundary this line delimits (``--b`` or ``--b--``), if any."""
    if not line.startswith(b"--"):
        return None
    stripped = line.rstrip(b"\r\n").rstrip(b" \t")
    for boundary in boundaries:
        if stripped in (b"--" + boundary, b"--" + boundary + b"--"):
            return boundary
    return None


def walk(reader: LineReader, headers: Message, handler: PartHandler, outer: tuple[bytes, ...] = ()) -> bytes | None:
    """Consume the body of the entity whose ``headers`` were just read.

    Leaf bodies are decoded and handed to ``handler``.  Returns the line that
    ended the body (a delimiter of an enclosing multipart) or ``None`` at the
    end of the file.  Nesting is followed with an explicit stack, not by
    recursion, and bounded by :data:`MAX_DEPTH` and :data:`MAX_PARTS`.
    """
    stack: list[_Multipart] = []
    parts = 1
    while True:
        # Start one entity: a leaf is consumed whole, a multipart up to its first delimiter.
        ended: bytes | None
        if _is_multipart(headers):
            if len(stack) >= MAX_DEPTH:
                raise WireFormatError(
                    f"MIME nested deeper than {MAX_DEPTH} levels", "the mail is malformed or hostile; it is refused"
                )
            frame = _Multipart(_boundary_of(headers), outer)
            ended = _skip_preamble(reader, frame)
            if _matches(ended, frame.inner) == frame.boundary:
                stack.append(frame)
        else:
            ended = _walk_leaf(reader, headers, handler, outer)
        # Finish entities until one of the open multiparts has another part to start.
        while True:
            if not stack:
                return ended
            frame = stack[-1]
            if ended is None:
                raise WireFormatError("multipart body is truncated: its closing delimiter is missing")
            if _matches(ended, frame.inner) != frame.boundary:
                stack.pop()  # a delimiter of an enclosing multipart ends this one too
                continue
            if ended.rstrip(b"\r\n \t").endswith(frame.boundary + b"--"):
                ended = _skip_epilogue(reader, frame.outer)
                stack.pop()
                continue
            parts += 1
            if parts > MAX_PARTS:
                raise WireFormatError(
                    f"a MIME entity has more than {MAX_PARTS} parts", "the mail is malformed or hostile; it is refused"
                )
            headers = read_headers(reader)
            outer = frame.inner
            break


class _Multipart:
    """One open multipart: its boundary and the delimiters that may end one of its parts."""

    def __init__(self, boundary: bytes, outer: tuple[bytes, ...]) -> None:
        self.boundary = boundary
        self.outer = outer
        self.inner = (boundary, *outer)


def _skip_preamble(reader: LineReader, frame: _Multipart) -> bytes:
    """Skip to the first delimiter of ``frame`` (returned) or of an enclosing multipart."""
    line = reader.scan(frame.inner, None)
    if line is None:
        raise WireFormatError("multipart body ends before its first part")
    return line


def _skip_epilogue(reader: LineReader, outer: tuple[bytes, ...]) -> bytes | None:
    return reader.scan(outer, None)


def _walk_leaf(reader: LineReader, headers: Message, handler: PartHandler, outer: tuple[bytes, ...]) -> bytes | None:
    sink = handler.open_leaf(headers)
    decoder = _decoder_for(headers, sink)
    pending_eol = b""

    def take(block: bytes) -> None:
        # A block ends where a line ends; its line break is held back because
        # the line break before a delimiter belongs to the delimiter.
        nonlocal pending_eol
        decoder.feed(pending_eol)
        if block.endswith(b"\r\n"):
            pending_eol = b"\r\n"
        elif block.endswith(b"\n"):
            pending_eol = b"\n"
        else:
            pending_eol = b""
        decoder.feed_lines(block, len(block) - len(pending_eol))

    try:
        ended = reader.scan(outer, take)
        if ended is None:
            decoder.feed(pending_eol)
        return ended
    finally:
        decoder.finish()


#: What a base64 decoder skips: line breaks and the blanks some senders leave.
_BASE64_BLANKS = b"\r\n \t"
#: A base64 line as :func:`write_base64` frames it: 76 characters and CRLF.
_FRAMED_LINE = 78


def _without_blanks(block: bytes) -> bytes:
    """``block`` without :data:`_BASE64_BLANKS`, or, where its lines are framed as ours are, without their CRLFs.

    The second is numpy's strided copy, five times faster than ``bytes.translate``.
    A blank it leaves inside a line makes strict decoding fail, and the caller
    then decodes line by line, as for any other error; one in the last, partial
    group of four is removed by the caller.
    """
    framed = len(block) - len(block) % _FRAMED_LINE
    if framed:
        rows = np.frombuffer(block, dtype=np.uint8, count=framed).reshape(-1, _FRAMED_LINE)
        if (rows[:, -2] == 13).all() and (rows[:, -1] == 10).all():
            return rows[:, :-2].tobytes() + block[framed:].translate(None, _BASE64_BLANKS)
    return block.translate(None, _BASE64_BLANKS)


class _Decoder:
    """Decodes one part's body, fed as line breaks (:meth:`feed`) and runs of whole lines (:meth:`feed_lines`)."""

    def __init__(self, sink: LeafSink | None) -> None:
        self.sink = sink

    def feed(self, data: bytes) -> None:
        if self.sink is not None and data:
            self.sink.write(data)

    def feed_lines(self, block: bytes, length: int) -> None:
        """``block[:length]``: lines joined by their line breaks, the last one without its break.

        The rest of ``block`` is that last line's break, which comes later, through :meth:`feed`.
        (Passing the whole block spares base64, the bulk of the data, a copy.)
        """
        self.feed(block if length == len(block) else block[:length])

    def finish(self) -> None:
        if self.sink is not None:
            self.sink.close()


class _Base64Decoder(_Decoder):
    """Strict base64, as if decoded line by line: each line's complete 4-character groups at once.

    Padding ("=") may therefore end any line's groups, not just the last
    line's; a block with padding before its final group is decoded line by
    line to accept and refuse exactly that.
    """

    def __init__(self, sink: LeafSink | None) -> None:
        super().__init__(sink)
        self._rest = b""

    def feed(self, data: bytes) -> None:
        if self.sink is not None:
            self._decode(self._rest + data.translate(None, _BASE64_BLANKS))

    def feed_lines(self, block: bytes, length: int) -> None:
        if self.sink is None:
            return
        rest = self._rest
        text = rest + _without_blanks(block)  # the held line break is blank too
        usable = len(text) - len(text) % 4
        # Without padding before the last group, one decode gives what line by line would.
        if text.find(b"=", 0, max(0, usable - 4)) < 0:
            try:
                # A view, not a slice, which would copy the block (a megabyte) once more.
                decoded = binascii.a2b_base64(memoryview(text)[:usable], strict_mode=True)
            except binascii.Error:
                pass  # decoded line by line below, for the same partial output and message as ever
            else:
                # What strict decoding passed has no blanks; a blank _without_blanks left can only be here.
                self._rest = text[usable:].translate(None, _BASE64_BLANKS)
                if decoded:
                    self.sink.write(decoded)
                return
        for line in block[:length].split(b"\n"):
            self.feed(line)

    def _decode(self, text: bytes) -> None:
        assert self.sink is not None
        usable = len(text) - len(text) % 4
        self._rest = text[usable:]
        if usable:
            try:
                self.sink.write(binascii.a2b_base64(text[:usable], strict_mode=True))
            except binascii.Error as exc:
                raise WireFormatError(f"invalid base64 in a MIME part: {exc}") from exc

    def finish(self) -> None:
        if self.sink is not None and self._rest.strip(b"="):
            raise WireFormatError("base64 part is truncated (its length is not a multiple of 4)")
        super().finish()


class _QuotedPrintableDecoder(_Decoder):
    def __init__(self, sink: LeafSink | None) -> None:
        super().__init__(sink)
        self._soft = False

    def feed(self, data: bytes) -> None:
        # Lines arrive without their break, breaks arrive alone: a line ending
        # in "=" is a soft break, so its following CRLF is dropped.
        if data in (b"\r\n", b"\n"):
            if not self._soft:
                super().feed(b"\r\n")
            self._soft = False
            return
        self._soft = data.endswith(b"=")
        super().feed(binascii.a2b_qp(data[:-1] if self._soft else data))

    def feed_lines(self, block: bytes, length: int) -> None:
        # Quoted-printable is rare and small (notes): line by line, as it always was.
        *complete, last = block[:length].split(b"\n")
        for line in complete:
            if line.endswith(b"\r"):
                self.feed(line[:-1])
                self.feed(b"\r\n")
            else:
                self.feed(line)
                self.feed(b"\n")
        self.feed(last)


def _decoder_for(headers: Message, sink: LeafSink | None) -> _Decoder:
    encoding = str(headers.get("Content-Transfer-Encoding", "7bit")).strip().lower()
    if encoding == "base64":
        return _Base64Decoder(sink)
    if encoding == "quoted-printable":
        return _QuotedPrintableDecoder(sink)
    if encoding in ("7bit", "8bit", "binary"):
        return _Decoder(sink)
    raise WireFormatError(f"unknown Content-Transfer-Encoding {encoding!r}")
