"""Base64 framed as ours is (76 characters and CRLF a line) takes a faster way; the result must not change.

Blocks of such lines lose their line breaks by numpy, not ``bytes.translate``.
Blanks and other oddities at every place in those lines must still give the
bytes, or the error, of decoding strictly line by line.
"""

from __future__ import annotations

import base64
import random

import pytest

from dicommail.wire import mime
from tests.wire.test_mime_chunks import _walks_as_lines_decode


def _framed_lines(chooser: random.Random) -> list[bytes]:
    encoded = base64.b64encode(chooser.randbytes(chooser.randrange(0, 2000)))
    lines = [encoded[i:i + 76] for i in range(0, len(encoded), 76)]
    for _ in range(chooser.choice([0, 0, 1, 2])):
        if not lines:
            break
        number = chooser.randrange(len(lines))
        line = lines[number]
        at = chooser.randrange(len(line) + 1)
        oddity = chooser.choice([b" ", b"\t", b"\r", b"=", b"*", b""])
        # A character replaced (at the end: one added), or the line cut short: the lines after it are out of step.
        lines[number] = line[:at] + oddity + line[at + 1:] if oddity else line[:at]
    return lines


@pytest.mark.parametrize(("max_line", "read_block"), [(90, 7), (400, 64), (5000, 1000)])
def test_framed_base64_decodes_exactly_as_lines_do(monkeypatch: pytest.MonkeyPatch, max_line: int,
                                                   read_block: int) -> None:
    monkeypatch.setattr(mime, "MAX_LINE", max_line)
    monkeypatch.setattr(mime, "READ_BLOCK", read_block)
    for seed in range(1000):
        chooser = random.Random(seed)
        lines = _framed_lines(chooser)
        eols = [chooser.choice([b"\r\n"] * 8 + [b" \r\n", b"\n"]) for _ in lines]
        _walks_as_lines_decode(lines, eols, seed)
