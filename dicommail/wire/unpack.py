"""Unpacking: DICOM-Mail messages become verified files again.

Three stages, each usable on its own (the receiving daemon persists between
them):

* :func:`read_envelope` classifies a raw mail: a fragment or a whole mail;
  :func:`dicommail.wire.partial.join_fragments` rebuilds whole mails;
* :func:`open_mail` decrypts one whole mail, checks its signer against the
  trust rule and decodes its parts into a work directory;
* :func:`verify_set` proves a set complete and intact (manifest or, for
  other @GIT senders, SETTOTAL) and :func:`write_set` moves it into place,
  all files or none.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any, BinaryIO

from dicommail.constancy.values import HEADER as CONSTANCY_HEADER
from dicommail.constancy.values import MAX_MARK_SIZE, ConstancyMark, InstanceExpectation, parse_header
from dicommail.constancy.values import MEDIA_TYPE as CONSTANCY_TYPE
from dicommail.crypto.gpg import Keyring, Verification
from dicommail.dicom import DicomFile, read_dicom_info
from dicommail.errors import (
    DestinationError,
    DicommailError,
    IncompleteSetError,
    InputError,
    IntegrityError,
    MisaddressedError,
    NotDicomError,
    SignatureError,
    WireFormatError,
)
from dicommail.store.files import atomic_writer, fsync_dir, fsync_file, open_private, scratch_dir
from dicommail.wire import headers as h
from dicommail.wire.manifest import MAX_MANIFEST_SIZE, Manifest
from dicommail.wire.mime import LeafSink, LineReader, read_headers, walk
from dicommail.wire.partial import FragmentInfo, format_ranges, fragment_info, join_fragments

#: A set claiming more parts than this is refused before anything is buffered.
MAX_SET_TOTAL = 100_000
#: Note text above this size is not a note.
MAX_NOTE_SIZE = 1024 * 1024
#: Files of a set fsynced at the same time when it is written.
FSYNC_THREADS = 8
#: Mails that :func:`unpack_files` has gpg decrypt at the same time, ahead of decoding them.
DECRYPT_WORKERS = 2
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f:*?\"<>|]")


@dataclass(frozen=True)
class Envelope:
    """What the outer header of a raw mail says, before any decryption."""

    path: Path
    message_id: str
    sender: str
    fragment: FragmentInfo | None
    set_id: str
    set_part: int | None
    set_total: int | None

    @property
    def sender_address(self) -> str:
        """The (unverified) From address, lower-case; empty if there is none."""
        return email.utils.parseaddr(self.sender)[1].lower()


@dataclass
class ReceivedFile:
    content_id: str
    name: str
    media_type: str
    kind: str  # "dicom" or "attachment"
    path: Path
    size: int
    sha256: str
    dicom: DicomFile | None = None


@dataclass
class ReceivedPart:
    """One decrypted, signature-checked set part, its files decoded on disk."""

    set_id: str
    set_part: int
    set_total: int
    study_uid: str
    message_id: str
    signer: Verification
    files: list[ReceivedFile]
    manifest: Manifest | None
    note: str = ""
    #: Addresses of the signed inner ``To`` header (protected headers); ``None``
    #: when the sender put no ``To`` inside the encryption (older @GIT senders).
    recipients: tuple[str, ...] | None = None
    #: The constancy check mark (a test transfer, docs/wire-format.md section 10) with this mail's instances.
    constancy: ConstancyMark | None = None
    #: The outer header marks it an emergency (unauthenticated: it decides when, never what, is forwarded).
    emergency: bool = False


@dataclass
class VerifiedSet:
    set_id: str
    study_uid: str
    signer: Verification
    parts: list[ReceivedPart]
    files: list[ReceivedFile]
    note: str = ""
    warnings: list[str] = field(default_factory=list)
    #: The parts' constancy marks merged (all instances of the set): a test set, never for the clinical PACS.
    constancy: ConstancyMark | None = None

    @property
    def dicom_files(self) -> list[ReceivedFile]:
        return [f for f in self.files if f.kind == "dicom"]


def _int_header(headers: Message, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(str(value).strip())
    except ValueError as exc:
        raise WireFormatError(f"header {name} is not a number") from exc


def read_envelope(path: Path) -> Envelope:
    """Read a raw mail's outer header; raise :class:`WireFormatError` if it is no DICOM-Mail."""
    try:
        with path.open("rb") as handle:
            headers = read_headers(LineReader(handle))
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    fragment = fragment_info(headers)
    if fragment is None and headers.get_content_type() != "multipart/encrypted":
        raise WireFormatError(
            f"{path.name} is not an encrypted DICOM-Mail (Content-Type {headers.get_content_type()})",
            "only signed and encrypted PGP/MIME mails are accepted",
        )
    set_id = str(headers.get(h.SETID, "")).strip()
    return Envelope(
        path=path,
        message_id=str(headers.get("Message-ID", "")).strip(),
        sender=str(headers.get("From", "")).strip(),
        fragment=fragment,
        set_id=set_id,
        set_part=_int_header(headers, h.SETPART),
        set_total=_int_header(headers, h.SETTOTAL),
    )


# --- one mail ---------------------------------------------------------------


class _FileSink:
    def __init__(self, path: Path, limit: int | None = None, *, durable: bool = True) -> None:
        self.path = path
        self.handle = open_private(path)  # decoded DICOM is patient data, whatever the umask
        self.digest = hashlib.sha256()
        self.size = 0
        self.limit = limit
        self.durable = durable

    def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.limit is not None and self.size > self.limit:
            raise WireFormatError("a part is larger than allowed")
        self.digest.update(data)
        self.handle.write(data)

    def close(self) -> None:
        # Durable before anyone records the part as received (the server copy may go next).
        self.handle.flush()
        if self.durable:
            os.fsync(self.handle.fileno())
        self.handle.close()


class _PayloadSink:
    """The armored payload, written for gpg to read right away: not hashed (gpg checks it), not fsynced."""

    def __init__(self, path: Path) -> None:
        self.handle = open_private(path)
        self.size = 0

    def write(self, data: bytes) -> None:
        self.size += len(data)
        self.handle.write(data)

    def close(self) -> None:
        self.handle.close()


class _MemorySink:
    def __init__(self, limit: int, what: str) -> None:
        self.data = bytearray()
        self.limit = limit
        self.what = what

    def write(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > self.limit:
            raise WireFormatError(f"the {self.what} is larger than {self.limit} bytes")

    def close(self) -> None:
        pass


class _OuterHandler:
    """Takes the two parts of an RFC 3156 ``multipart/encrypted`` body."""

    def __init__(self, armored: Path) -> None:
        self.armored_path = armored
        self.control: _MemorySink | None = None
        self.payload: _PayloadSink | None = None

    def open_leaf(self, headers: Message) -> LeafSink | None:
        media = headers.get_content_type()
        if media == "application/pgp-encrypted" and self.control is None:
            self.control = _MemorySink(4096, "PGP/MIME control part")
            return self.control
        if media == "application/octet-stream" and self.payload is None:
            self.payload = _PayloadSink(self.armored_path)
            return self.payload
        return None


class _InnerHandler:
    """Decodes the parts of the decrypted entity into files of a work directory."""

    def __init__(self, work: Path, *, durable: bool) -> None:
        self.work = work
        self.durable = durable
        self.files: list[tuple[Message, _FileSink]] = []
        self.manifest: _MemorySink | None = None
        self.constancy: _MemorySink | None = None
        self.notes: list[_MemorySink] = []

    def open_leaf(self, headers: Message) -> LeafSink | None:
        media = headers.get_content_type()
        disposition = str(headers.get("Content-Disposition", "")).lower()
        if media == h.MANIFEST_TYPE:
            if self.manifest is not None:
                raise WireFormatError("a set part carries two manifests")
            self.manifest = _MemorySink(MAX_MANIFEST_SIZE, "manifest")
            return self.manifest
        if media == CONSTANCY_TYPE:
            if self.constancy is not None:
                raise WireFormatError("a set part carries two constancy marks")
            self.constancy = _MemorySink(MAX_MARK_SIZE, "constancy mark")
            return self.constancy
        if media == "text/plain" and not disposition.startswith("attachment") and not headers.get_filename():
            note = _MemorySink(MAX_NOTE_SIZE, "note text")
            self.notes.append(note)
            return note
        sink = _FileSink(self.work / f"{len(self.files) + 1:05d}.part", durable=self.durable)
        self.files.append((headers, sink))
        return sink


@dataclass
class DecryptedMail:
    """A mail after :func:`decrypt_mail`: its outer header and the decrypted entity in a file of the work directory."""

    outer: Message
    inner_path: Path
    signer: Verification


def decrypt_mail(
    path: Path, keyring: Keyring, work: Path, *, max_output: int, passphrase: str | None = None
) -> DecryptedMail:
    """The first half of :func:`open_mail`: check the PGP/MIME frame, decrypt and check the signer."""
    work.mkdir(parents=True, exist_ok=True)
    armored = work / "payload.asc"
    with path.open("rb") as handle:
        reader = LineReader(handle)
        outer = read_headers(reader)
        if outer.get_content_type() != "multipart/encrypted" or (
            str(outer.get_param("protocol", "")).lower() != "application/pgp-encrypted"
        ):
            raise WireFormatError(
                "the mail is not PGP/MIME encrypted (RFC 3156)", "only signed and encrypted mails are accepted"
            )
        handler = _OuterHandler(armored)
        walk(reader, outer, handler)
    if handler.control is None or b"version: 1" not in bytes(handler.control.data).lower():
        raise WireFormatError("the PGP/MIME control part (Version: 1) is missing")
    if handler.payload is None or handler.payload.size == 0:
        raise WireFormatError("the PGP/MIME encrypted part is missing or empty")

    inner_path = work / "inner.mime"
    signer = keyring.decrypt_verify_file(armored, inner_path, max_output=max_output, passphrase=passphrase)
    armored.unlink()
    return DecryptedMail(outer, inner_path, signer)


def decode_mail(
    decrypted: DecryptedMail, work: Path, *, max_output: int, durable: bool = True,
    discard: Callable[[Path], object] = Path.unlink,
) -> ReceivedPart:
    """The second half of :func:`open_mail`: decode the decrypted entity's parts into files of ``work``.

    With ``durable`` each file is fsynced once written; without, the caller makes them durable.
    ``discard`` removes the decrypted entity once it is decoded.
    """
    inner_handler = _InnerHandler(work, durable=durable)
    with decrypted.inner_path.open("rb") as handle:
        reader = LineReader(handle)
        inner = read_headers(reader)
        walk(reader, inner, inner_handler)
        inner_sha256 = ""
        if not str(inner.get(h.SETID, "") or "").strip():
            # Only a mail without a set ID is named by its content (see _to_part).
            inner_sha256 = _file_sha256(handle)
    discard(decrypted.inner_path)
    return _to_part(decrypted.outer, inner, inner_handler, decrypted.signer, inner_sha256, max_output)


def _file_sha256(handle: BinaryIO) -> str:
    digest = hashlib.sha256()
    handle.seek(0)
    for chunk in iter(lambda: handle.read(1024 * 1024), b""):
        digest.update(chunk)
    return digest.hexdigest()


def open_mail(
    path: Path, keyring: Keyring, work: Path, *, max_output: int, passphrase: str | None = None
) -> ReceivedPart:
    """Decrypt and decode one whole mail into ``work`` (which the caller owns and removes)."""
    decrypted = decrypt_mail(path, keyring, work, max_output=max_output, passphrase=passphrase)
    return decode_mail(decrypted, work, max_output=max_output)


def _addresses(value: str) -> tuple[str, ...]:
    return tuple(address.lower() for _name, address in email.utils.getaddresses([value]) if "@" in address)


def _to_part(
    outer: Message, inner: Message, handler: _InnerHandler, signer: Verification, inner_sha256: str, max_output: int
) -> ReceivedPart:
    message_id = str(outer.get("Message-ID", "")).strip()
    # The signed inner headers are authoritative; the outer copies must agree.
    set_id = str(inner.get(h.SETID, "") or "").strip()
    for name in (h.SETID, h.SETPART, h.SETTOTAL):
        if (
            outer.get(name) is not None
            and inner.get(name) is not None
            and (str(outer.get(name)).strip() != str(inner.get(name)).strip())
        ):
            raise WireFormatError(
                f"the outer header {name} differs from the signed one inside the encryption",
                "the mail was altered in transit; ask the sender to send it again",
            )
    # Absent means a mail of its own (1 of 1); a 0 that is there is no part of anything.
    part_header, total_header = _int_header(inner, h.SETPART), _int_header(inner, h.SETTOTAL)
    set_part = 1 if part_header is None else part_header
    set_total = 1 if total_header is None else total_header
    if not set_id:
        # A single mail from a sender that does not use sets: it is its own set, named by
        # its signed content (not by the unsigned Message-ID), so a replay is the same set.
        set_id = "msg-" + inner_sha256[:32]
    if not h.is_set_id(set_id):
        raise WireFormatError("the set ID is malformed")
    if not 1 <= set_part <= set_total <= MAX_SET_TOTAL:
        raise WireFormatError(f"set part {set_part} of {set_total} is out of range (at most {MAX_SET_TOTAL} parts)")
    study_uid = str(inner.get(h.STUDYID, "") or "").strip()
    if study_uid and not h.is_study_id(study_uid):
        raise WireFormatError("the X-TELEMEDICINE-STUDYID header is malformed")

    manifest = Manifest.from_json(bytes(handler.manifest.data)) if handler.manifest else None
    constancy = _constancy(inner, handler)
    entries = {e.content_id: e for e in manifest.files} if manifest else {}
    files = []
    for number, (headers, sink) in enumerate(handler.files, 1):
        content_id = str(headers.get("Content-ID", "")).strip().strip("<>")
        entry = entries.get(content_id)
        media = headers.get_content_type()
        kind = "dicom" if media == "application/dicom" else "attachment"
        name = entry.name if entry else str(headers.get_filename() or headers.get_param("name") or "")
        label = f"part {set_part}, file {number}"
        received = ReceivedFile(
            content_id=content_id,
            name=name,
            media_type=media,
            kind=kind,
            path=sink.path,
            size=sink.size,
            sha256=sink.digest.hexdigest(),
        )
        if kind == "dicom":
            try:
                received.dicom = read_dicom_info(sink.path, label=label, max_inflated=max_output)
            except NotDicomError as exc:
                raise NotDicomError(
                    f"{label} is labelled application/dicom but is not a DICOM file ({exc.message})",
                    "the sender packed a damaged or wrong file; ask for the study again",
                ) from exc
        files.append(received)
    note = "\n".join(bytes(n.data).decode("utf-8", "replace") for n in handler.notes).strip()
    inner_to = inner.get_all("To")
    recipients = _addresses(", ".join(str(v) for v in inner_to)) if inner_to else None
    return ReceivedPart(
        set_id=set_id,
        set_part=set_part,
        set_total=set_total,
        study_uid=study_uid,
        message_id=message_id,
        signer=signer,
        files=files,
        manifest=manifest,
        note=note,
        recipients=recipients,
        constancy=constancy,
        emergency=h.is_emergency(outer),
    )


def _constancy(inner: Message, handler: _InnerHandler) -> ConstancyMark | None:
    """The part's constancy mark: the signed header and the JSON part come together and agree, or not at all."""
    values = inner.get_all(CONSTANCY_HEADER) or []
    if handler.constancy is None and not values:
        return None
    if handler.constancy is None or len(values) != 1:
        raise WireFormatError(f"the {CONSTANCY_HEADER} header and the constancy mark part must come together, once")
    check_id, kind = parse_header(str(values[0]))
    mark = ConstancyMark.from_json(bytes(handler.constancy.data))
    if (mark.check_id, mark.kind) != (check_id, kind):
        raise WireFormatError(f"the constancy mark names another check than the {CONSTANCY_HEADER} header")
    return mark


def merge_constancy(set_id: str, parts: Sequence[ReceivedPart]) -> ConstancyMark | None:
    """One mark for the set: every part carries one, for the same check, kind and entries; or none does."""
    marks = [p.constancy for p in parts if p.constancy is not None]
    if not marks:
        return None
    if len(marks) != len(parts):
        raise IntegrityError(f"set {set_id}: some parts carry a constancy mark and others do not")
    first = marks[0]
    instances: dict[str, InstanceExpectation] = {}
    for mark in marks:
        if (mark.check_id, mark.kind, mark.entries) != (first.check_id, first.kind, first.entries):
            raise IntegrityError(f"set {set_id}: the parts' constancy marks name different checks")
        for uid, expectation in mark.instances.items():
            if instances.setdefault(uid, expectation) != expectation:
                raise IntegrityError(f"set {set_id}: two constancy marks expect different values of one instance")
    return ConstancyMark(first.check_id, first.kind, first.entries, instances)


# --- a whole set -------------------------------------------------------------


def missing_parts(parts: Sequence[ReceivedPart]) -> list[int]:
    total = parts[0].set_total if parts else 0
    have = {p.set_part for p in parts}
    return [n for n in range(1, total + 1) if n not in have]


def verify_set(parts: Sequence[ReceivedPart]) -> VerifiedSet:
    """Prove that ``parts`` (one set, any order, duplicates allowed) are complete and intact."""
    if not parts:
        raise IncompleteSetError("no parts of the set were received")
    by_number: dict[int, ReceivedPart] = {}
    for part in parts:
        by_number.setdefault(part.set_part, part)
    first = by_number[min(by_number)]
    set_id = first.set_id
    for part in by_number.values():
        if part.set_id != set_id:
            raise WireFormatError("parts of different sets were given as one set")
        if part.set_total != first.set_total:
            raise WireFormatError(
                f"set {set_id}: parts disagree about the number of parts ({first.set_total} vs {part.set_total})"
            )
        if part.signer.fingerprint != first.signer.fingerprint:
            raise SignatureError(
                f"set {set_id}: parts are signed by different keys "
                f"({first.signer.fingerprint} and {part.signer.fingerprint})",
                "a set must come from one sender; this one is refused",
                fingerprint=part.signer.fingerprint,
            )
        if part.study_uid != first.study_uid:
            raise WireFormatError(f"set {set_id}: parts name different studies")
    missing = missing_parts(list(by_number.values()))
    if missing:
        raise IncompleteSetError(
            f"set {set_id}: {len(missing)} of {first.set_total} parts are missing: {format_ranges(missing)}",
            "wait for the missing mails, or ask the sender to send those parts again",
            missing_parts=missing,
        )
    ordered = [by_number[n] for n in sorted(by_number)]
    files = [f for p in ordered for f in p.files]
    warnings: list[str] = []
    with_manifest = [p for p in ordered if p.manifest is not None]
    if with_manifest and len(with_manifest) != len(ordered):
        raise IntegrityError(f"set {set_id}: some parts carry a manifest and others do not")
    if with_manifest:
        _check_manifests(set_id, ordered)
    else:
        warnings.append("the sender sent no manifest: completeness rests on SETTOTAL and DICOM validity only")
    if any(p.recipients is None for p in ordered):
        warnings.append("the sender signed no recipient (no To inside the encryption): the set could have been "
                        "meant for another site")
    if not any(f.kind == "dicom" for f in files):
        raise IntegrityError(f"set {set_id} contains no DICOM files")
    seen: dict[str, str] = {}
    for item in files:
        if item.dicom is None:
            continue
        previous = seen.setdefault(item.dicom.sop_instance_uid, item.sha256)
        if previous != item.sha256:
            raise IntegrityError(
                f"set {set_id}: two different files claim SOP Instance UID {item.dicom.sop_instance_uid}"
            )
    study_uid = first.study_uid or next(f.dicom.study_uid for f in files if f.dicom)
    constancy = merge_constancy(set_id, ordered)
    return VerifiedSet(
        set_id=set_id,
        study_uid=study_uid,
        signer=first.signer,
        parts=ordered,
        files=files,
        note="\n\n".join(p.note for p in ordered if p.note),
        warnings=warnings,
        constancy=constancy,
    )


def verify_part(part: ReceivedPart) -> VerifiedSet:
    """One part on its own, for progressive forwarding: its files exactly those of its manifest, intact.

    The set's completeness is not known yet; :func:`verify_set` proves it once all parts are there.
    """
    if part.manifest is not None:
        _check_part_manifest(part.set_id, part)
    # Older @GIT senders leave out the inner study header: the files name the study then, as in verify_set.
    study_uid = part.study_uid or next((f.dicom.study_uid for f in part.files if f.dicom), "")
    return VerifiedSet(set_id=part.set_id, study_uid=study_uid, signer=part.signer, parts=[part],
                       files=list(part.files))


def _check_manifests(set_id: str, parts: Sequence[ReceivedPart]) -> None:
    total_files = 0
    total_bytes = 0
    reference = parts[0].manifest
    assert reference is not None
    for part in parts:
        manifest = part.manifest
        assert manifest is not None
        if (manifest.set_files, manifest.set_bytes) != (reference.set_files, reference.set_bytes):
            raise IntegrityError(f"set {set_id}: manifests disagree about the set's totals")
        files, size = _check_part_manifest(set_id, part)
        total_files += files
        total_bytes += size
    if (total_files, total_bytes) != (reference.set_files, reference.set_bytes):
        raise IncompleteSetError(
            f"set {set_id}: the parts hold {total_files} files ({total_bytes} bytes) "
            f"but the manifest announces {reference.set_files} ({reference.set_bytes} bytes)",
            "ask the sender to send the set again",
        )


def _check_part_manifest(set_id: str, part: ReceivedPart) -> tuple[int, int]:
    """The files of ``part`` against its own manifest; their number and bytes."""
    manifest = part.manifest
    assert manifest is not None
    total_files = total_bytes = 0
    if (manifest.set_id, manifest.set_part, manifest.set_total) != (part.set_id, part.set_part, part.set_total):
        raise IntegrityError(f"set {set_id}: the manifest of part {part.set_part} names another set or part")
    received = {f.content_id: f for f in part.files}
    listed = {e.content_id for e in manifest.files}
    unlisted = sorted(set(received) - listed)
    if unlisted:
        raise IntegrityError(f"set {set_id}, part {part.set_part}: {len(unlisted)} file(s) not in the manifest")
    for entry in manifest.files:
        item = received.get(entry.content_id)
        where = f"set {set_id}, part {part.set_part}, file {entry.content_id.partition('.')[0]}"
        if item is None:
            raise IntegrityError(f"{where}: listed in the manifest but missing from the mail")
        if item.size != entry.size or item.sha256 != entry.sha256:
            raise IntegrityError(f"{where}: size or SHA-256 differs from the manifest; the file is damaged")
        if entry.kind == "dicom" and (item.dicom is None or item.dicom.sop_instance_uid != entry.sop_instance_uid):
            raise IntegrityError(f"{where}: its SOP Instance UID differs from the manifest")
        total_files += 1
        total_bytes += item.size
    return total_files, total_bytes


#: Longest file name written, in UTF-8 bytes: below the 255 of Linux file systems, with room for "-<n>".
MAX_NAME_BYTES = 200
#: Names of dicommail's own files beside a set's files (dicommail-set.json...): a mail's file may not take one.
RESERVED_PREFIX = "dicommail-"


def safe_file_name(name: str, fallback: str) -> str:
    """A plain file name: no directories, no traversal, no control characters, at most 200 bytes.

    A long name keeps its ending (``.dcm``, say) and is cut at a character
    boundary: 200 characters of CJK script would be 600 bytes.
    """
    # Lone surrogates (escaped bytes in a manifest's JSON) cannot be file names: "?", then "_".
    base = name.encode("utf-8", "replace").decode("utf-8").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE_NAME.sub("_", base).strip().lstrip(".").strip()
    encoded = base.encode("utf-8")
    if len(encoded) > MAX_NAME_BYTES:
        stem, dot, suffix = base.rpartition(".")
        ending = f"{dot}{suffix}".encode() if dot and stem and len(suffix.encode()) < 16 else b""
        head = encoded[: MAX_NAME_BYTES - len(ending)].decode("utf-8", "ignore").rstrip()
        base = (head + ending.decode()).lstrip(".").strip()
    return base if base.strip(".") else fallback  # never empty, ".", ".." or a hidden file


def _set_folder(verified: VerifiedSet, first_signer: str) -> str:
    """``<set id>``, or ``<set id>.<signer key id>`` for all but the first signer of a set ID in one job.

    Two peers may use the same set ID; neither set may stand in for the other.
    """
    if first_signer != verified.signer.fingerprint:
        return f"{verified.set_id}.{verified.signer.fingerprint[-16:]}"
    return verified.set_id


def write_set(verified: VerifiedSet, out_dir: Path, name: str = "") -> Path:
    """Move a verified set's files to ``out_dir/<name or set id>/``: all of them, or none."""
    final = out_dir / (name or verified.set_id)
    if final.exists():
        raise InputError(
            f"{final} already exists: set {verified.set_id} was unpacked before", "remove it to unpack again"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    # Where each file sits in the set, for warnings: a file name from the mail
    # may name the patient, so warnings (shown and logged) never quote it.
    positions = [f"part {part.set_part} file {number}" for part in verified.parts for number in
                 range(1, len(part.files) + 1)]
    if len(positions) != len(verified.files):
        positions = [f"file {number}" for number in range(1, len(verified.files) + 1)]
    next_number: dict[str, int] = {}  # a name taken before -> the number its next copy tries first
    with scratch_dir(out_dir, ".dicommail-set-") as staging:
        receipt_files = []
        moved: list[Path] = []
        for item, position in zip(verified.files, positions, strict=True):
            fallback = f"{item.dicom.sop_instance_uid}.dcm" if item.dicom else item.content_id or "attachment"
            name = safe_file_name(item.name, safe_file_name(fallback, "file"))
            renamed = bool(item.name) and name != item.name
            if renamed:
                verified.warnings.append(
                    f"set {verified.set_id} {position}: its file name was not safe to use and was changed "
                    "(dicommail-set.json beside the files lists both names)"
                )
            if name.lower().startswith(RESERVED_PREFIX):
                name = f"_{name}"
            stem, dot, suffix = name.rpartition(".")
            if not stem:
                stem, dot, suffix = name, "", ""
            candidate, counter = name, next_number.get(name.lower(), 1)
            # Counting on from the last copy of the same name: 10,000 files of one name stay linear.
            while candidate.lower() in used:
                counter += 1
                candidate = f"{stem}-{counter}{dot}{suffix}"
            next_number[name.lower()] = counter
            used.add(candidate.lower())
            shutil.move(item.path, staging / candidate)
            moved.append(staging / candidate)
            item.path = final / candidate
            entry: dict[str, object] = {
                "name": candidate,
                "kind": item.kind,
                "sop_instance_uid": item.dicom.sop_instance_uid if item.dicom else "",
                "size": item.size,
                "sha256": item.sha256,
            }
            if renamed:
                entry["name_in_mail"] = item.name  # beside the files, which hold the same data anyway
            receipt_files.append(entry)
        # Several fsyncs at once share the file system's journal commits: a set of
        # small files becomes durable several times faster than one file after the other.
        with ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="dicommail-fsync") as syncing:
            for _ in syncing.map(fsync_file, moved):
                pass
        if verified.note:
            with atomic_writer(staging / "dicommail-note.txt") as handle:
                handle.write(verified.note.encode("utf-8"))
        receipt = {
            "set_id": verified.set_id,
            "study_instance_uid": verified.study_uid,
            "signer": verified.signer.fingerprint,
            "signer_user_id": verified.signer.user_id,
            "parts": len(verified.parts),
            "files": receipt_files,
            "warnings": verified.warnings,
        }
        with atomic_writer(staging / "dicommail-set.json") as handle:
            handle.write(json.dumps(receipt, indent=1).encode("utf-8"))
        fsync_dir(staging)
        staging.rename(final)
        staging.mkdir()  # scratch_dir removes it again
    fsync_dir(out_dir)
    return final


# --- the offline operation: files in, sets out --------------------------------


@dataclass
class SetOutcome:
    """What became of one set in :func:`unpack_files`: written to ``directory``, or ``error``."""

    set_id: str
    ok: bool
    parts_received: int
    set_total: int
    directory: Path | None = None
    dicom_files: int = 0
    other_files: int = 0
    signer: str = ""
    error: DicommailError | None = None
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The set as ``dicommail unpack --json`` prints it (one entry of its ``sets`` list)."""
        return {
            "set_id": self.set_id,
            "ok": self.ok,
            "directory": str(self.directory) if self.directory else None,
            "parts_received": self.parts_received,
            "set_total": self.set_total,
            "dicom_files": self.dicom_files,
            "other_files": self.other_files,
            "signer": self.signer,
            "warnings": self.warnings,
            "error": _error_json(self.error),
        }


@dataclass
class UnpackReport:
    """The result of unpacking mail files: one outcome per set found, and the mails refused outright."""

    sets: list[SetOutcome] = field(default_factory=list)
    rejected: list[tuple[Path, DicommailError]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected and bool(self.sets) and all(s.ok for s in self.sets)

    def to_json(self) -> dict[str, Any]:
        """The report as ``dicommail unpack --json`` prints it."""
        return {
            "ok": self.ok,
            "sets": [s.to_json() for s in self.sets],
            "rejected": [{"mail": str(path), "error": _error_json(exc)} for path, exc in self.rejected],
        }


def _error_json(exc: DicommailError | None) -> dict[str, Any] | None:
    if exc is None:
        return None
    data: dict[str, Any] = {"code": exc.code, "message": str(exc), "hint": exc.hint}
    if isinstance(exc, IncompleteSetError) and exc.missing_parts:
        data["missing_parts"] = exc.missing_parts
    return data


def _remove(path: Path) -> None:
    # The work directory goes at the end in any case.
    with contextlib.suppress(OSError):
        path.unlink()


def _write_out(path: Path) -> None:
    """Start a decoded file's way to disk; a failure is left to the fsync in :func:`write_set`, which counts."""
    with contextlib.suppress(OSError):
        fsync_file(path)


def unpack_files(
    paths: Sequence[Path],
    keyring: Keyring,
    out_dir: Path,
    *,
    max_output: int,
    passphrase: str | None = None,
    own_addresses: frozenset[str] = frozenset(),
    progress: Callable[[int], None] | None = None,
) -> UnpackReport:
    """Unpack mails given in any order, with duplicates: every complete, verified set goes to ``out_dir``.

    With ``own_addresses``, a part whose signed inner ``To`` names none of them is refused.
    ``progress`` receives how many of ``paths`` have been dealt with since its last call
    (a mail joined from n fragments counts n once it is decrypted); the counts add up to ``len(paths)``.
    """

    def advance(count: int) -> None:
        if progress is not None and count:
            progress(count)

    report = UnpackReport()
    out_dir.mkdir(parents=True, exist_ok=True)
    with scratch_dir(out_dir, ".dicommail-work-") as work:
        whole: list[Path] = []
        weight: dict[Path, int] = {}  # input mails each whole mail stands for (fragments joined)
        fragments: dict[str, list[tuple[FragmentInfo, Path]]] = {}
        origin: dict[Path, Path] = {}  # a mail joined from fragments -> its first fragment
        for path in paths:
            try:
                envelope = read_envelope(path)
            except DicommailError as exc:
                report.rejected.append((path, exc))
                advance(1)
                continue
            if envelope.fragment is None:
                whole.append(path)
                weight[path] = weight.get(path, 0) + 1
            else:
                fragments.setdefault(envelope.fragment.id, []).append((envelope.fragment, path))
        for number, pieces in enumerate(fragments.values(), 1):
            joined = work / f"joined-{number}.eml"
            try:
                join_fragments(pieces, joined)
            except DicommailError as exc:
                report.rejected.append((pieces[0][1], exc))
                advance(len(pieces))
                continue
            whole.append(joined)
            weight[joined] = len(pieces)
            origin[joined] = pieces[0][1]  # a failure names a fragment given, not our scratch file

        # A set belongs to its signer: another key reusing the set ID makes another set.
        parts: dict[tuple[str, str], list[ReceivedPart]] = {}
        # gpg decrypts the next mails while this one is decoded, on other cores, each into a
        # file of its own: memory stays bounded by the decoder's blocks, disk by a few mails.
        # Disk work that nothing waits for (writing decoded files out, removing decrypted ones)
        # is left to threads of its own: it costs the decoding thread milliseconds a mail.
        with ThreadPoolExecutor(max_workers=DECRYPT_WORKERS, thread_name_prefix="dicommail-decrypt") as decrypting, \
                ThreadPoolExecutor(max_workers=FSYNC_THREADS, thread_name_prefix="dicommail-disk") as disk:
            decrypting_ahead: dict[int, Future[DecryptedMail]] = {}
            writing_out: list[Future[None]] = []
            try:
                for index, path in enumerate(whole):
                    for ahead in range(index, min(len(whole), index + 1 + DECRYPT_WORKERS)):
                        if ahead not in decrypting_ahead:
                            decrypting_ahead[ahead] = decrypting.submit(
                                decrypt_mail, whole[ahead], keyring, work / f"mail-{ahead + 1}",
                                max_output=max_output, passphrase=passphrase,
                            )
                    try:
                        decrypted = decrypting_ahead.pop(index).result()
                        # No fsync per file here: write_set makes the files durable where they stay.
                        part = decode_mail(decrypted, work / f"mail-{index + 1}", max_output=max_output,
                                           durable=False, discard=lambda inner: disk.submit(_remove, inner))
                        if (own_addresses and part.recipients is not None
                                and not own_addresses.intersection(part.recipients)):
                            raise MisaddressedError(
                                f"set {part.set_id} part {part.set_part} was signed for another recipient",
                                "someone re-encrypted another site's set to us; it is not unpacked",
                            )
                    except DicommailError as exc:
                        report.rejected.append((origin.get(path, path), exc))
                        continue
                    finally:
                        # A file given twice is in ``whole`` twice: its first opening counts for both.
                        advance(weight.pop(path, 0))
                    parts.setdefault((part.signer.fingerprint, part.set_id), []).append(part)
                    # To disk while the next mails are decoded: write_set's fsyncs, which make the
                    # files durable where they stay, then find little left to write.
                    writing_out += [disk.submit(_write_out, received.path) for received in part.files]
            except BaseException:
                for write in writing_out:
                    write.cancel()
                raise
            finally:
                # On an error that ends the job (or Ctrl-C), only decryptions already running finish.
                for future in decrypting_ahead.values():
                    future.cancel()

        first_signer: dict[str, str] = {}  # set id -> the fingerprint of the first key that signed one
        for signer, set_id in parts:
            first_signer.setdefault(set_id, signer)
        for (_signer, set_id), members in parts.items():
            outcome = SetOutcome(
                set_id=set_id,
                ok=False,
                parts_received=len({p.set_part for p in members}),
                set_total=members[0].set_total,
                signer=members[0].signer.fingerprint,
            )
            try:
                verified = verify_set(members)
                outcome.directory = write_set(verified, out_dir, _set_folder(verified, first_signer[set_id]))
            except DicommailError as exc:
                outcome.error = exc
            except OSError as exc:
                # Not the file's path: it ends in a name from the mail, which may name the patient.
                outcome.error = DestinationError(
                    f"cannot write set {set_id} to {out_dir}: {exc.strerror or type(exc).__name__}",
                    f"check free space and write permission in {out_dir}, then unpack the set again")
            else:
                outcome.ok = True
                outcome.dicom_files = len(verified.dicom_files)
                outcome.other_files = len(verified.files) - outcome.dicom_files
                outcome.warnings = verified.warnings
            report.sets.append(outcome)
    return report
