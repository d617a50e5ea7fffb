"""RFC 2046 ``message/partial``: split an oversized mail at line ends, and join it again.

Reassembly follows RFC 2046 section 5.2.2.1: the enclosing header of
fragment 1 supplies every field except Content-*, Subject, Message-ID,
Encrypted and MIME-Version, which come from the enclosed header at the start
of fragment 1's body.
"""

from __future__ import annotations

import email.utils
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import BinaryIO

from dicommail.errors import IncompleteSetError, WireFormatError
from dicommail.store.files import atomic_writer
from dicommail.wire.mime import CRLF, LF, header_block

#: A fragment count beyond this is not a mail we produced or want to buffer.
MAX_FRAGMENTS = 2000
#: Room left for a fragment's own header fields.
FRAGMENT_HEADER_ROOM = 2048
_ENCLOSED = re.compile(rb"^(content-|subject:|message-id:|encrypted:|mime-version:)", re.IGNORECASE)


@dataclass(frozen=True)
class FragmentInfo:
    id: str
    number: int
    total: int | None


def fragment_info(headers: Message) -> FragmentInfo | None:
    """The message/partial parameters of a mail, or ``None`` if it is not a fragment."""
    if headers.get_content_type() != "message/partial":
        return None
    frag_id, number, total = headers.get_param("id"), headers.get_param("number"), headers.get_param("total")
    if not isinstance(frag_id, str) or not frag_id or len(frag_id) > 256:
        raise WireFormatError("message/partial without an id")
    try:
        number_value = int(str(number))
        total_value = int(str(total)) if total is not None else None
    except ValueError as exc:
        raise WireFormatError("message/partial with a non-numeric number or total") from exc
    if total_value is not None and not 1 <= total_value <= MAX_FRAGMENTS:
        raise WireFormatError(
            f"message/partial claims {total_value} fragments (at most {MAX_FRAGMENTS} are accepted)",
            "the mail is malformed or hostile; it is quarantined",
        )
    if number_value < 1 or number_value > (total_value or MAX_FRAGMENTS):
        raise WireFormatError(f"message/partial fragment number {number_value} is out of range")
    return FragmentInfo(id=frag_id, number=number_value, total=total_value)


def _split_header(path: Path) -> tuple[list[bytes], int]:
    """The raw header fields (folded lines joined) and the body's offset."""
    fields: list[bytes] = []
    offset = 0
    with path.open("rb") as handle:
        while True:
            line = handle.readline(1024 * 1024)
            offset += len(line)
            if not line or line in (b"\r\n", b"\n"):
                break
            if line[:1] in (b" ", b"\t") and fields:
                fields[-1] += line
            else:
                fields.append(line)
    return fields, offset


def _wire_len(data: bytes) -> int:
    """Length once every line end is CRLF, as on the SMTP wire."""
    return len(data) + data.count(b"\n") - data.count(b"\r\n")


def split_mail(
    mail: Path, max_size: int, out_dir: Path, stem: str, fragment_id: str, subject: str, sender: str
) -> list[Path]:
    """Split ``mail`` into ``message/partial`` mails of at most ``max_size`` bytes each."""
    fields, body_offset = _split_header(mail)
    enclosed = b"".join(f for f in fields if _ENCLOSED.match(f))
    outer = [f for f in fields if not _ENCLOSED.match(f)]
    budget = max_size - FRAGMENT_HEADER_ROOM - sum(_wire_len(f) for f in outer)
    if budget < 16 * 1024:
        raise WireFormatError("max_mail_size is too small to fragment this mail")

    # Pass 1: choose cut points at line ends; fragment 1 also carries the enclosed header.
    cuts: list[int] = []
    size = _wire_len(enclosed) + 2
    with mail.open("rb") as handle:
        handle.seek(body_offset)
        position = body_offset
        for line in iter(lambda: handle.readline(64 * 1024), b""):
            if size + _wire_len(line) > budget and size > 0:
                cuts.append(position)
                size = 0
            size += _wire_len(line)
            position += len(line)
    bounds = [body_offset, *cuts, position]
    total = len(bounds) - 1
    if total > MAX_FRAGMENTS:
        raise WireFormatError(f"the mail would need {total} fragments; raise max_mail_size")

    paths = []
    with mail.open("rb") as source:
        for number in range(1, total + 1):
            path = out_dir / f"{stem}-f{number:04d}.eml"
            own = [
                ("Subject", f"{subject} ({number}/{total})"),
                ("Message-ID", f"<{fragment_id}.f{number}@{sender.rpartition('@')[2] or 'dicommail.invalid'}>"),
                ("Date", email.utils.formatdate(localtime=True)),
                ("MIME-Version", "1.0"),
                # "total" only on the last fragment, as RFC 2046 requires at least:
                # munpack refuses fragments that repeat it.
                (
                    "Content-Type",
                    f'message/partial; id="{fragment_id}"; number={number}'
                    + (f"; total={total}" if number == total else ""),
                ),
            ]
            with atomic_writer(path, durable=False) as out:
                out.writelines(f for f in outer if not f.lower().startswith(b"date:"))
                out.write(header_block(own, LF) + LF)
                if number == 1:
                    out.write(enclosed + LF)
                source.seek(bounds[number - 1])
                _copy_range(source, out, bounds[number] - bounds[number - 1])
            paths.append(path)
    return paths


def _copy_range(source: BinaryIO, out: BinaryIO, length: int) -> None:
    while length > 0:
        chunk = source.read(min(length, 1024 * 1024))
        if not chunk:
            raise WireFormatError("file shrank while fragmenting")
        out.write(chunk)
        length -= len(chunk)


def join_fragments(fragments: Sequence[tuple[FragmentInfo, Path]], out: Path) -> None:
    """Reassemble fragments (any order, duplicates allowed) into the original mail at ``out``."""
    by_number: dict[int, Path] = {}
    total: int | None = None
    for info, path in fragments:
        if info.total is not None:
            if total is not None and total != info.total:
                raise WireFormatError(f"fragments of {info.id!r} disagree about their total ({total} vs {info.total})")
            total = info.total
        by_number.setdefault(info.number, path)
    if total is None:
        raise IncompleteSetError("the last fragment (the one naming the total) is missing", missing_parts=[])
    missing = [n for n in range(1, total + 1) if n not in by_number]
    if missing:
        raise IncompleteSetError(
            f"{len(missing)} of {total} fragments are missing: {format_ranges(missing)}",
            "wait for the rest, or ask the sender to send the set again",
            missing_parts=missing,
        )
    extra = sorted(set(by_number) - set(range(1, total + 1)))
    if extra:
        raise WireFormatError(f"fragment numbers beyond the total: {extra}")

    first_fields, first_body = _split_header(by_number[1])
    with atomic_writer(out, durable=False) as target:
        target.writelines(f for f in first_fields if not _ENCLOSED.match(f))
        with by_number[1].open("rb") as first:
            first.seek(first_body)
            # The enclosed header block: keep only the fields RFC 2046 takes from it.
            enclosed: list[bytes] = []
            while True:
                line = first.readline(1024 * 1024)
                if not line or line in (b"\r\n", b"\n"):
                    break
                if line[:1] in (b" ", b"\t") and enclosed:
                    enclosed[-1] += line
                else:
                    enclosed.append(line)
            target.writelines(f for f in enclosed if _ENCLOSED.match(f))
            target.write(CRLF if first_fields and first_fields[0].endswith(CRLF) else LF)
            shutil.copyfileobj(first, target, 1024 * 1024)
        for number in range(2, total + 1):
            _, body = _split_header(by_number[number])
            with by_number[number].open("rb") as part:
                part.seek(body)
                shutil.copyfileobj(part, target, 1024 * 1024)


def format_ranges(numbers: list[int]) -> str:
    """``[1, 2, 3, 7]`` → ``"1-3, 7"``: short enough for a message about 1,000 parts."""
    spans: list[str] = []
    start = prev = numbers[0]
    for n in [*numbers[1:], None]:
        if n is not None and n == prev + 1:
            prev = n
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if n is not None:
            start = prev = n
    return ", ".join(spans)
