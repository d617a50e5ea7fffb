"""Packing: a study becomes a set of signed, encrypted DICOM-Mail messages.

Each mail is built in three streaming steps, so memory stays bounded by a
copy buffer whatever the study size:

1. the inner MIME entity (``multipart/mixed``: DICOM parts, optional note and
   attachments, the manifest) is written to a scratch file;
2. gpg signs and encrypts it in one pass into an ASCII-armored file;
3. the outer PGP/MIME mail (RFC 3156) wraps the armor; a mail still over the
   size limit is split into ``message/partial`` fragments.

Mails are built in parallel (one gpg process each) because gpg uses one core.
"""

from __future__ import annotations

import email.utils
import hashlib
import io
import json
import mimetypes
import shutil
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

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
    inner = 1024 + MANIFEST_FIXED + len(note.encode()) * 3
    for item in items:
        inner += PART_OVERHEAD + MANIFEST_PER_FILE + base64_size(item.size) + item.extra
    binary = int(inner * ratio) + OPENPGP_OVERHEAD
    armored = (binary + 2) // 3 * 4
    armored += (armored + 63) // 64 * 2 + 128  # CRLF per 64-character line, armor lines
    return OUTER_OVERHEAD + armored


#: Files per mail, well under what a receiver walks in one entity (``mime.MAX_PARTS``).
MAX_FILES_PER_MAIL = 5000


def plan_parts(items: Sequence[_Item], max_mail_size: int, note: str = "", ratio: float = 1.0) -> list[list[_Item]]:
    """Group items into mails under ``max_mail_size``, in order, never splitting a file.

    The note and attachments ride in part 1.  An item that alone exceeds the
    limit gets a mail of its own, which is later fragmented.
    """
    limit = int(max_mail_size * SAFETY_MARGIN)
    parts: list[list[_Item]] = []
    current: list[_Item] = []
    for item in items:
        note_here = note if not parts else ""
        if current and (len(current) >= MAX_FILES_PER_MAIL
                        or estimate_wire_size([*current, item], note_here, ratio) > limit):
            parts.append(current)
            current = []
        current.append(item)
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
        parts = plan_parts(items, options.max_mail_size, options.note, ratio)
        packed = PackedSet(
            set_id=set_id,
            study_uid=files[0].study_uid,
            recipient=options.recipient,
            file_count=len(items),
            byte_count=sum(i.size for i in items),
            set_total=len(parts),
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        with scratch_dir(out_dir, ".dicommail-pack-") as work:
            jobs = [(number, part) for number, part in enumerate(parts, 1)]
            with ThreadPoolExecutor(max_workers=max(1, options.workers)) as pool:
                results = list(pool.map(lambda job: self._build_mail(packed, job[0], job[1], work), jobs))
            # Only now that every mail exists: move them into place, durably.
            for mails in results:
                for mail in mails:
                    final = out_dir / mail.path.name
                    fsync_file(mail.path)
                    mail.path.replace(final)
                    packed.mails.append(
                        PackedMail(final, mail.set_part, mail.message_id, mail.size, mail.fragment, mail.fragments)
                    )
            fsync_dir(out_dir)
        return packed

    # -- one mail -------------------------------------------------------------

    def _build_mail(self, packed: PackedSet, number: int, items: list[_Item], work: Path) -> list[PackedMail]:
        options = self.options
        stem = f"{packed.set_id}-{number:04d}"
        inner = work / f"{stem}.inner"
        armored = work / f"{stem}.asc"
        date = email.utils.formatdate(localtime=True)
        with inner.open("wb") as out:
            self._write_inner(out, packed, number, items, date)
        self.keyring.sign_encrypt_file(
            inner,
            armored,
            recipient=options.recipient,
            signer=options.signer,
            passphrase=options.passphrase,
            compress_level=options.compression_level,
        )
        inner.unlink()
        message_id = h.new_message_id(options.sender)
        subject = f"DICOM-Mail {packed.set_id} ({number}/{packed.set_total})"
        if options.emergency:
            subject = "EMERGENCY: " + subject
        mail = work / f"{stem}.eml"
        with mail.open("wb") as out:
            self._write_outer(out, packed, number, message_id, subject, armored, date)
        armored.unlink()
        size = wire_size(mail)
        if size <= options.max_mail_size:
            return [PackedMail(mail, number, message_id, size)]
        pieces = split_mail(
            mail, options.max_mail_size, work, stem, message_id.strip("<>").partition("@")[0], subject, options.sender
        )
        mail.unlink()
        return [PackedMail(p, number, message_id, wire_size(p), i, len(pieces)) for i, p in enumerate(pieces, 1)]

    def _write_inner(self, out: BinaryIO, packed: PackedSet, number: int, items: list[_Item], date: str) -> None:
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
            digest = hashlib.sha256()
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

    def _write_outer(
        self, out: BinaryIO, packed: PackedSet, number: int, message_id: str, subject: str, armored: Path, date: str
    ) -> None:
        options = self.options
        boundary = new_boundary()
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
            fields += [("X-Priority", "1 (Highest)"), ("Importance", "high"), ("Priority", "urgent")]
        out.write(header_block(fields, LF) + LF)
        out.write(b"This is an OpenPGP/MIME encrypted message (RFC 3156)." + LF)
        out.write(f"--{boundary}".encode() + LF)
        out.write(header_block([("Content-Type", "application/pgp-encrypted")], LF))
        out.write(LF + b"Version: 1" + LF + LF)
        out.write(f"--{boundary}".encode() + LF)
        out.write(
            header_block(
                [
                    ("Content-Type", 'application/octet-stream; name="encrypted.asc"'),
                    ("Content-Disposition", 'inline; filename="encrypted.asc"'),
                ],
                LF,
            )
            + LF
        )
        with armored.open("rb") as source:
            shutil.copyfileobj(source, out, 1024 * 1024)
        out.write(LF + f"--{boundary}--".encode() + LF)

    def _advance(self, size: int) -> None:
        if self._progress is not None:
            with self._lock:
                self._progress(size)


def _base64_bytes(data: bytes) -> bytes:
    out = io.BytesIO()
    write_base64(io.BytesIO(data), out)
    return out.getvalue()
