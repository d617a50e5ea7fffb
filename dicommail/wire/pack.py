"""Packing: a study becomes a set of signed, encrypted DICOM-Mail messages.

Each mail is one streaming pipeline, so memory stays bounded by a few
buffers whatever the study size, and no plaintext is ever written to disk:

1. the outer PGP/MIME mail's (RFC 3156) header and frame are written to the
   mail file;
2. the inner MIME entity (``multipart/mixed``: DICOM parts, optional note and
   attachments, the manifest) is written into gpg's input as gpg signs and
   encrypts it, and gpg writes the ASCII armor straight into the mail file;
3. the frame is closed; a mail still over the size limit is split into
   ``message/partial`` fragments.

``packing.workers`` mails are encrypted at once (one gpg process each,
because gpg uses one core); one more gpg process may be starting up or
finishing meanwhile, so that gpg never waits between two mails.
"""

from __future__ import annotations

import contextlib
import email.utils
import fcntl
import hashlib
import io
import json
import mimetypes
import os
import shutil
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dicommail import __version__
from dicommail.constancy.values import FILE_NAME as CONSTANCY_NAME
from dicommail.constancy.values import HEADER as CONSTANCY_HEADER
from dicommail.constancy.values import MEDIA_TYPE as CONSTANCY_TYPE
from dicommail.constancy.values import ConstancyMark
from dicommail.crypto.gpg import Keyring
from dicommail.dicom import DicomFile
from dicommail.errors import InputError, WireFormatError
from dicommail.store.files import fsync_dir, fsync_file, scratch_dir
from dicommail.wire import headers as h
from dicommail.wire.manifest import Manifest, ManifestEntry
from dicommail.wire.mime import CRLF, LF, base64_size, header_block, new_boundary, safe_param, wire_size, write_base64
from dicommail.wire.partial import split_mail

#: Outer header fields and the PGP/MIME frame around the armor.
OUTER_OVERHEAD = 2048
#: Signature, session key and packet headers added by OpenPGP (RSA-4096 at most).
OPENPGP_OVERHEAD = 4096
#: Part headers of one file inside the encrypted entity.
PART_OVERHEAD = 400
#: Manifest bytes per listed file (UIDs, name, hash) and fixed.
MANIFEST_PER_FILE = 640
MANIFEST_FIXED = 1024
#: Constancy mark bytes (a test transfer only): fixed per mail, and beyond each instance's JSON.
CONSTANCY_FIXED = 2048
CONSTANCY_PER_FILE = 128
#: A wire-size estimate is kept this much under the limit, for rounding.
SAFETY_MARGIN = 0.99
#: Compression is predicted from this many files, this many bytes each ...
SAMPLE_FILES = 16
SAMPLE_BYTES = 256 * 1024
#: ... and assumed this much worse than the sample, to keep parts under the limit.
COMPRESSION_MARGIN = 1.25


@dataclass(frozen=True)
class PackOptions:
    """What to pack for whom: sender and recipient, signing key, mail size, note, attachments."""

    sender: str
    recipient: str
    signer: str
    max_mail_size: int
    passphrase: str | None = None
    compression_level: int = 1
    uid_root: str = ""
    note: str = ""
    attachments: tuple[Path, ...] = ()
    emergency: bool = False
    workers: int = 1
    #: A constancy check's test transfer: each mail carries the mark with the expectations of its own instances.
    constancy: ConstancyMark | None = None


@dataclass(frozen=True)
class PackedMail:
    """One mail of a packed set: its file, set part, Message-ID, wire size and fragment number (0: whole)."""

    path: Path
    set_part: int
    message_id: str
    size: int  # on the wire, with CRLF line ends
    fragment: int = 0  # 0: a whole mail; n: fragment n of ``fragments``
    fragments: int = 0


@dataclass
class PackedSet:
    """One study packed as a set of mails for one recipient (``mails`` in part order)."""

    set_id: str
    study_uid: str
    recipient: str
    file_count: int
    byte_count: int
    set_total: int
    mails: list[PackedMail] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The set as ``dicommail pack --json`` prints it (one entry of its ``sets`` list)."""
        return {
            "set_id": self.set_id,
            "study_instance_uid": self.study_uid,
            "recipient": self.recipient,
            "files": self.file_count,
            "bytes": self.byte_count,
            "set_total": self.set_total,
            "mails": [
                {
                    "path": str(m.path),
                    "set_part": m.set_part,
                    "message_id": m.message_id,
                    "size": m.size,
                    "fragment": m.fragment,
                    "fragments": m.fragments,
                }
                for m in self.mails
            ],
        }


@dataclass(frozen=True)
class _Item:
    """One file to send: a DICOM instance or an attachment."""

    path: Path
    size: int
    kind: str
    content_id: str
    name: str
    media_type: str
    dicom: DicomFile | None = None
    extra: int = 0  # bytes this item adds to the mail besides its part (its constancy expectations)


def estimate_wire_size(items: Sequence[_Item], note: str = "", ratio: float = 1.0) -> int:
    """Estimated mail size on the wire when the base64 text compresses to ``ratio``.

    With ``ratio=1`` (nothing compresses) this is an upper bound.
    """
    return _estimate_from_inner(_inner_base(note) + sum(_inner_bytes(item) for item in items), ratio)


def _inner_base(note: str) -> int:
    """Estimated inner entity bytes besides the parts of the files."""
    return 1024 + MANIFEST_FIXED + len(note.encode()) * 3


def _inner_bytes(item: _Item) -> int:
    """Estimated inner entity bytes of one file: its part and its manifest entry."""
    return PART_OVERHEAD + MANIFEST_PER_FILE + base64_size(item.size) + item.extra


def _estimate_from_inner(inner: int, ratio: float) -> int:
    binary = int(inner * ratio) + OPENPGP_OVERHEAD
    armored = (binary + 2) // 3 * 4
    armored += (armored + 63) // 64 * 2 + 128  # CRLF per 64-character line, armor lines
    return OUTER_OVERHEAD + armored


#: Files per mail, well under what a receiver walks in one entity (``mime.MAX_PARTS``).
MAX_FILES_PER_MAIL = 5000


def plan_parts(
    items: Sequence[_Item], max_mail_size: int, note: str = "", ratio: float = 1.0, workers: int = 1
) -> list[list[_Item]]:
    """Group items into mails under ``max_mail_size``, in order, never splitting a file.

    The note and attachments ride in part 1.  An item that alone exceeds the
    limit gets a mail of its own, which is later fragmented.  A set of more
    than one mail gets a multiple of ``workers`` mails of about equal size
    where the files allow it: the last of them would otherwise be encrypted
    alone while the other workers wait (7 mails on 2 workers take as long as 8).
    """
    limit = int(max_mail_size * SAFETY_MARGIN)
    parts = _fill_parts(items, limit, note, ratio)
    if workers < 2 or len(parts) < 2 or len(parts) % workers == 0:
        return parts
    even = _even_parts(items, -(-len(parts) // workers) * workers, limit, note, ratio)
    return even if even is not None else parts


def _even_parts(items: Sequence[_Item], count: int, limit: int, note: str, ratio: float) -> list[list[_Item]] | None:
    """Items in order in ``count`` mails of about equal size; None where files are too coarse for that."""
    sizes = [_inner_bytes(item) for item in items]
    total = sum(sizes)
    parts: list[list[_Item]] = []
    current: list[_Item] = []
    done = 0
    for item, size in zip(items, sizes, strict=True):
        # A mail ends where the running total comes nearest to its share of the whole.
        share = total * (len(parts) + 1) / count
        if current and len(parts) < count - 1 and abs(done - share) <= abs(done + size - share):
            parts.append(current)
            current = []
        current.append(item)
        done += size
    parts.append(current)
    if len(parts) != count:
        return None
    for number, part in enumerate(parts):
        inner = _inner_base(note if number == 0 else "") + sum(_inner_bytes(item) for item in part)
        if len(part) > MAX_FILES_PER_MAIL or _estimate_from_inner(inner, ratio) > limit:
            return None
    return parts


def _fill_parts(items: Sequence[_Item], limit: int, note: str, ratio: float) -> list[list[_Item]]:
    """Items in order, each mail filled while its estimate stays within ``limit``."""
    parts: list[list[_Item]] = []
    current: list[_Item] = []
    inner = _inner_base(note)
    for item in items:
        size = _inner_bytes(item)
        if current and (len(current) >= MAX_FILES_PER_MAIL or _estimate_from_inner(inner + size, ratio) > limit):
            parts.append(current)
            current, inner = [], _inner_base("")  # the note rides in part 1 only
        current.append(item)
        inner += size
    if current or not parts:
        parts.append(current)
    return parts


def estimate_compression(items: Sequence[_Item], level: int) -> float:
    """How far gpg's compression will shrink the base64 text, from a sample of the files.

    The set's part count must be fixed before the first part is encrypted
    (SETTOTAL is signed inside it), so the ratio is predicted, not measured.
    A margin covers the files not sampled; a part that still comes out too
    large is sent as fragments, which is legal, just less tidy.
    """
    if level == 0 or not items:
        return 1.0
    step = max(1, len(items) // SAMPLE_FILES)
    raw = compressed = 0
    for item in list(items)[::step][:SAMPLE_FILES]:
        with item.path.open("rb") as handle:
            # The end of a DICOM file is pixel data, the bulk of what is sent.
            handle.seek(max(0, item.size - SAMPLE_BYTES))
            data = handle.read(SAMPLE_BYTES)
        text = io.BytesIO()
        write_base64(io.BytesIO(data), text)
        packer = zlib.compressobj(level, zlib.DEFLATED, -15)
        compressed += len(packer.compress(text.getvalue())) + len(packer.flush())
        raw += len(text.getvalue())
    if raw == 0:
        return 1.0
    return min(1.0, compressed / raw * COMPRESSION_MARGIN + 0.02)


def _items_for(files: Sequence[DicomFile], attachments: Sequence[Path]) -> list[_Item]:
    items = []
    for path in attachments:
        if not path.is_file():
            raise InputError(f"attachment {path} is not a readable file")
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        items.append(_Item(path, path.stat().st_size, "attachment", "", path.name, media_type))
    items += [_Item(f.path, f.size, "dicom", "", f.path.name, "application/dicom", f) for f in files]
    return [_Item(i.path, i.size, i.kind, f"f{n:05d}", i.name, i.media_type, i.dicom) for n, i in enumerate(items, 1)]


def _with_constancy(items: list[_Item], mark: ConstancyMark) -> list[_Item]:
    """Items carrying the size of their share of the mark; :class:`InputError` if the mark lacks an instance."""
    uids = [i.dicom.sop_instance_uid for i in items if i.dicom is not None]
    try:
        mark.subset(uids).validate()
    except WireFormatError as exc:  # our own mark: a wrong argument, not a wire problem
        raise InputError(f"the constancy mark cannot be sent: {exc.message}") from exc
    result = []
    for number, item in enumerate(items):
        extra = CONSTANCY_FIXED if number == 0 else 0
        if item.dicom is not None:
            expectation = mark.instances[item.dicom.sop_instance_uid]
            extra += len(json.dumps(expectation.to_dict(), indent=1)) * 2 + CONSTANCY_PER_FILE
        result.append(replace(item, extra=extra))
    return result


class Packer:
    """Packs studies for one sender/recipient pair into ``out_dir``."""

    def __init__(self, keyring: Keyring, options: PackOptions, progress: Callable[[int], None] | None = None) -> None:
        self.keyring = keyring
        self.options = options
        self._progress = progress
        self._lock = threading.Lock()

    def pack(self, files: Sequence[DicomFile], out_dir: Path) -> PackedSet:
        """Write the set for one study; all its mails appear in ``out_dir`` or none do."""
        if not files:
            raise InputError("no DICOM files to pack")
        studies = {f.study_uid for f in files}
        if len(studies) != 1:
            raise InputError(f"a set carries one study, got {len(studies)}")
        options = self.options
        items = _items_for(files, options.attachments)
        if options.constancy is not None:
            items = _with_constancy(items, options.constancy)
        set_id = h.new_set_id(options.uid_root)
        ratio = estimate_compression(items, options.compression_level)
        parts = plan_parts(items, options.max_mail_size, options.note, ratio, max(1, options.workers))
        packed = PackedSet(
            set_id=set_id,
            study_uid=files[0].study_uid,
            recipient=options.recipient,
            file_count=len(items),
            byte_count=sum(i.size for i in items),
            set_total=len(parts),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_scratch(out_dir)
        with scratch_dir(out_dir, SCRATCH_PREFIX) as work, _in_use(work):
            results = self._build_mails(packed, parts, work)
            # Only now that every mail exists (each fsynced): move them into place, durably.
            for mails in results:
                for mail in mails:
                    final = out_dir / mail.path.name
                    mail.path.replace(final)
                    packed.mails.append(
                        PackedMail(final, mail.set_part, mail.message_id, mail.size, mail.fragment, mail.fragments)
                    )
            fsync_dir(out_dir)
        return packed

    def _build_mails(self, packed: PackedSet, parts: list[list[_Item]], work: Path) -> list[list[PackedMail]]:
        """Build every part's mail(s) in ``work``; on any failure or Ctrl-C, stop them all first."""
        run = _Run(max(1, self.options.workers))
        try:
            # One thread more than encrypting slots: the next mail's gpg starts while the last one finishes.
            with ThreadPoolExecutor(max_workers=run.workers + 1) as pool:
                try:
                    futures = [pool.submit(self._build_mail, run, packed, number, part, work)
                               for number, part in enumerate(parts, 1)]
                    return [future.result() for future in futures]
                except BaseException:
                    run.cancelled.set()  # a failed mail, or Ctrl-C: the others stop at their next block
                    raise
        finally:
            # Also a thread the pool lost track of, when Ctrl-C came as it was starting one.
            run.wait_until_idle()

    # -- one mail -------------------------------------------------------------

    def _build_mail(
        self, run: _Run, packed: PackedSet, number: int, items: list[_Item], work: Path
    ) -> list[PackedMail]:
        with run.busy():
            return self._build_one(run, packed, number, items, work)

    def _build_one(
        self, run: _Run, packed: PackedSet, number: int, items: list[_Item], work: Path
    ) -> list[PackedMail]:
        options = self.options
        if run.cancelled.is_set():
            raise _Cancelled
        stem = f"{packed.set_id}-{number:04d}"
        date = email.utils.formatdate(localtime=True)
        message_id = h.new_message_id(options.sender)
        subject = f"DICOM-Mail {packed.set_id} ({number}/{packed.set_total})"
        if options.emergency:
            subject = h.EMERGENCY_PREFIX + subject
        boundary = new_boundary()
        mail = work / f"{stem}.eml"

        def feed(stdin: BinaryIO) -> None:
            # gpg is already starting up while this waits for an encrypting slot.
            with run.encrypting:
                self._write_inner(stdin, packed, number, items, date, run.cancelled)
                stdin.flush()

        with mail.open("wb") as out:
            out.write(self._outer_head(packed, number, message_id, subject, date, boundary))
            self.keyring.sign_encrypt_stream(
                feed,
                out,
                recipient=options.recipient,
                signer=options.signer,
                passphrase=options.passphrase,
                compress_level=options.compression_level,
            )
            out.seek(0, os.SEEK_END)  # gpg wrote the armor through the descriptor, past our buffer
            out.write(LF + f"--{boundary}--".encode() + LF)
            out.flush()
            os.fsync(out.fileno())
        size = _mail_wire_size(mail)
        if size <= options.max_mail_size:
            return [PackedMail(mail, number, message_id, size)]
        pieces = split_mail(
            mail, options.max_mail_size, work, stem, message_id.strip("<>").partition("@")[0], subject, options.sender
        )
        mail.unlink()
        for piece in pieces:
            fsync_file(piece)
        return [PackedMail(p, number, message_id, wire_size(p), i, len(pieces)) for i, p in enumerate(pieces, 1)]

    def _write_inner(
        self, out: BinaryIO, packed: PackedSet, number: int, items: list[_Item], date: str, cancelled: threading.Event
    ) -> None:
        options = self.options
        boundary = new_boundary()
        out.write(
            header_block(
                [
                    # Protected headers: signed with the content, so that a receiver can
                    # tell that this set was meant for it and not re-encrypted by a third party.
                    ("From", options.sender),
                    ("To", options.recipient),
                    ("Date", date),
                    ("MIME-Version", "1.0"),
                    ("Content-Type", f'multipart/mixed; boundary="{boundary}"'),
                    (h.SETID, packed.set_id),
                    (h.SETPART, str(number)),
                    (h.SETTOTAL, str(packed.set_total)),
                    (h.STUDYID, packed.study_uid),
                    *([(CONSTANCY_HEADER, options.constancy.header_value())] if options.constancy else []),
                ]
            )
            + CRLF
        )
        delimiter = f"--{boundary}".encode() + CRLF
        if number == 1 and options.note:
            out.write(delimiter)
            out.write(
                header_block([("Content-Type", "text/plain; charset=utf-8"), ("Content-Transfer-Encoding", "base64")])
            )
            out.write(CRLF)
            out.write(_base64_bytes(options.note.encode("utf-8")))
        entries = []
        for item in items:
            name = safe_param(item.name)
            fields = [
                ("Content-Type", f'{item.media_type}; name="{name}"'),
                ("Content-Transfer-Encoding", "base64"),
                ("Content-Disposition", f'attachment; filename="{name}"'),
                ("Content-ID", f"<{item.content_id}.{packed.set_id}@dicommail>"),
            ]
            out.write(delimiter + header_block(fields) + CRLF)
            digest = _Digest(cancelled)
            with item.path.open("rb") as source:
                size = write_base64(source, out, digest)
            if size != item.size:
                raise InputError(f"{item.path} changed while it was being packed", "pack the study again")
            entries.append(
                ManifestEntry(
                    content_id=f"{item.content_id}.{packed.set_id}@dicommail",
                    name=item.name,
                    kind=item.kind,
                    size=size,
                    sha256=digest.hexdigest(),
                    media_type=item.media_type,
                    sop_instance_uid=item.dicom.sop_instance_uid if item.dicom else "",
                    sop_class_uid=item.dicom.sop_class_uid if item.dicom else "",
                    transfer_syntax_uid=item.dicom.transfer_syntax_uid if item.dicom else "",
                )
            )
            self._advance(size)
        if options.constancy is not None:
            mark = options.constancy.subset([i.dicom.sop_instance_uid for i in items if i.dicom is not None])
            out.write(delimiter)
            out.write(
                header_block(
                    [
                        ("Content-Type", f'{CONSTANCY_TYPE}; name="{CONSTANCY_NAME}"'),
                        ("Content-Transfer-Encoding", "7bit"),
                        ("Content-Disposition", f'attachment; filename="{CONSTANCY_NAME}"'),
                    ]
                )
                + CRLF
            )
            out.write(mark.to_json())
        manifest = Manifest(
            set_id=packed.set_id,
            study_instance_uid=packed.study_uid,
            set_part=number,
            set_total=packed.set_total,
            set_files=packed.file_count,
            set_bytes=packed.byte_count,
            files=entries,
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            generator=f"dicommail {__version__}",
        )
        out.write(delimiter)
        out.write(
            header_block(
                [
                    ("Content-Type", f'{h.MANIFEST_TYPE}; name="{h.MANIFEST_NAME}"'),
                    ("Content-Transfer-Encoding", "7bit"),
                    ("Content-Disposition", f'attachment; filename="{h.MANIFEST_NAME}"'),
                ]
            )
            + CRLF
        )
        out.write(manifest.to_json())
        out.write(f"--{boundary}--".encode() + CRLF)

    def _outer_head(
        self, packed: PackedSet, number: int, message_id: str, subject: str, date: str, boundary: str
    ) -> bytes:
        """The outer mail up to the armor (which gpg writes); ``LF --boundary-- LF`` closes it."""
        options = self.options
        fields = [
            ("From", options.sender),
            ("To", options.recipient),
            ("Date", date),
            ("Subject", subject),
            ("Message-ID", message_id),
            ("MIME-Version", "1.0"),
            ("Content-Type", f'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{boundary}"'),
            ("Disposition-Notification-To", options.sender),
            (h.NOTIFICATION_TO, options.sender),
            (h.SETID, packed.set_id),
            (h.SETPART, str(number)),
            (h.SETTOTAL, str(packed.set_total)),
            ("X-Mailer", f"dicommail {__version__}"),
        ]
        if options.emergency:
            fields += h.EMERGENCY_HEADERS
        return b"".join(
            [
                header_block(fields, LF) + LF,
                b"This is an OpenPGP/MIME encrypted message (RFC 3156)." + LF,
                f"--{boundary}".encode() + LF,
                header_block([("Content-Type", "application/pgp-encrypted")], LF),
                LF + b"Version: 1" + LF + LF,
                f"--{boundary}".encode() + LF,
                header_block(
                    [
                        ("Content-Type", 'application/octet-stream; name="encrypted.asc"'),
                        ("Content-Disposition", 'inline; filename="encrypted.asc"'),
                    ],
                    LF,
                )
                + LF,
            ]
        )

    def _advance(self, size: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(size)


#: Scratch directories of a packing in progress, in the output directory.
SCRATCH_PREFIX = ".dicommail-pack-"
#: A scratch directory nobody holds is left alone this long: its packing may be just starting.
STALE_AFTER = 60.0


class _Run:
    """What the mails of one :meth:`Packer.pack` share."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        #: A slot per worker, held while a mail is written into its gpg.
        self.encrypting = threading.Semaphore(workers)
        #: Set when one mail failed or the caller was interrupted.
        self.cancelled = threading.Event()
        self._active = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Around one mail's work, so that :meth:`wait_until_idle` waits for it."""
        with self._idle:
            self._active += 1
        try:
            yield
        finally:
            with self._idle:
                self._active -= 1
                self._idle.notify_all()

    def wait_until_idle(self) -> None:
        with self._idle:
            self._idle.wait_for(lambda: self._active == 0)


class _Cancelled(Exception):
    """Raised in a mail's thread when the packing was cancelled: another mail failed, or Ctrl-C."""


class _Digest:
    """SHA-256 of a file as it is written; stops the writing once the packing is cancelled."""

    def __init__(self, cancelled: threading.Event) -> None:
        self._sha = hashlib.sha256()
        self._cancelled = cancelled

    def update(self, data: bytes, /) -> None:
        # Called for every block written (about 57 KiB): a cancelled packing stops within one block.
        if self._cancelled.is_set():
            raise _Cancelled
        self._sha.update(data)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()


@contextlib.contextmanager
def _in_use(work: Path) -> Iterator[None]:
    """Hold a lock on the scratch directory ``work``: :func:`remove_stale_scratch` leaves it alone."""
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def remove_stale_scratch(out_dir: Path, now: Callable[[], float] = time.time) -> list[Path]:
    """Remove the scratch directories that killed packings left in ``out_dir``; return them.

    One is stale when no packing holds its lock and it is older than
    :data:`STALE_AFTER` (a packing locks it right after creating it).
    Earlier versions left the plaintext inner MIME there.
    """
    removed = []
    for path in out_dir.glob(SCRATCH_PREFIX + "*"):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue  # gone meanwhile, or not a directory of ours
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a packing is running in it
            if now() - os.fstat(fd).st_mtime < STALE_AFTER:
                continue
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            os.close(fd)
    return removed


def _mail_wire_size(path: Path) -> int:
    """:func:`~dicommail.wire.mime.wire_size` of a mail as we write them, without a Python pass over it.

    Our mails and gpg's armor end lines with a bare LF and hold no CR, so the
    wire size is the file's size plus one per LF; numpy counts those without
    holding the GIL, which the other mails' threads need meanwhile.
    """
    block = bytearray(1024 * 1024)
    view = np.frombuffer(block, dtype=np.uint8)
    size = line_ends = returns = 0
    with path.open("rb", buffering=0) as handle:
        while read := handle.readinto(block):
            data = view[:read]
            size += read
            line_ends += int(np.count_nonzero(data == 10))
            returns += int(np.count_nonzero(data == 13))
    return size + line_ends if returns == 0 else wire_size(path)


def _base64_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    write_base64(io.BytesIO(data), out)
    return out.getvalue()
