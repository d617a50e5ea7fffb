"""Packing, sending and unpacking studies: the jobs of ``dicommail pack|send|unpack``."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicommail.config import is_mail_address
from dicommail.constancy.values import ConstancyMark
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.dicom import DicomFile, scan
from dicommail.errors import ConfigError, DicommailError, InputError
from dicommail.identity import own_addresses
from dicommail.sender.outbox import (
    TransferResult,
    queue_set,
    queued_bytes,
    send_pending,
    sender_lock,
    transfer_result,
    with_mails,
)
from dicommail.sender.packing import pack_options, sender_address
from dicommail.sender.tracking import record_study_details
from dicommail.site.base import Counter, ProgressCallback, SiteBase
from dicommail.store.db import Database
from dicommail.wire.pack import PackedSet, Packer, PackOptions
from dicommail.wire.unpack import UnpackReport, unpack_files

# The SMTP client (aiosmtplib, asyncio) is imported where mail is sent: unpack and pack go without it.
if TYPE_CHECKING:
    from dicommail.transport.smtp import SmtpClient

__all__ = ["PackedSet", "Sending", "SkipCallback", "TransferResult", "UnpackReport"]

log = logging.getLogger("dicommail.site")

#: Called with ``(path, reason)`` for each file found under the given paths that is not sent
#: (not DICOM, or an instance already found); ``reason`` is a sentence that names the file.
SkipCallback = Callable[[Path, str], None]

#: Called once the paths are scanned, before anything is packed, with the number of DICOM files
#: that will be packed and their size in bytes.
FoundCallback = Callable[[int, int], None]

#: Studies found under the given paths: study UID -> its DICOM files, in sending order.
_Studies = dict[str, list[DicomFile]]

#: Skipped files named in a --strict refusal; the rest are counted (on_skip names them all).
_NAMED = 3


class Sending(SiteBase):
    """Methods of :class:`dicommail.Site` that pack, send and unpack."""

    def pack(
        self,
        paths: Sequence[Path],
        to: str,
        out_dir: Path,
        *,
        sender: str = "",
        note: str = "",
        attachments: Sequence[Path] = (),
        emergency: bool = False,
        max_mail_size: int | None = None,
        progress: ProgressCallback | None = None,
        on_skip: SkipCallback | None = None,
        strict: bool = False,
        on_found: FoundCallback | None = None,
    ) -> list[PackedSet]:
        """Pack the DICOM files under ``paths`` (one set per study) for ``to`` into ``out_dir``; send nothing.

        ``paths`` are files or folders; files that are not DICOM, or are damaged (truncated
        pixel data, say), are skipped (see ``on_skip``); with ``strict`` any such file is an
        :class:`~dicommail.errors.InputError` instead, raised before anything is packed.
        ``on_found(files, bytes)`` is told what will be packed once the scan is done.
        ``sender`` overrides identity.address as the From address, ``max_mail_size``
        the configured largest mail; ``note`` (text) and ``attachments`` (files) travel
        encrypted in part 1 of every set.  ``progress`` gets "packing" updates in bytes
        (from gpg's worker threads).  Each set's mails appear in ``out_dir`` all or none.

        Raises :class:`~dicommail.errors.InputError` if ``to`` is no mail address or no DICOM
        file is found, :class:`~dicommail.errors.RecipientKeyError` if ``to`` has no certified,
        valid key, :class:`~dicommail.errors.KeyNotFoundError` without a key of this site's own.
        """
        with self._keyring() as keyring:
            options, studies = self._prepare(
                keyring, paths, to, sender, note, attachments, emergency, max_mail_size,
                _Scanning("pack", on_skip, strict, on_found),
            )
            sets: list[PackedSet] = []
            _pack_studies(keyring, options, studies, out_dir, sets, progress)
        return sets

    def unpack(self, mails: Sequence[Path], out_dir: Path, *, progress: ProgressCallback | None = None) -> UnpackReport:
        """Decrypt, verify and reassemble mail files (any order, duplicates allowed) into ``out_dir``.

        Every complete set whose signer this site has certified is written to a folder of its own
        under ``out_dir``, all files or none.  What fails does not raise: the report lists failed
        sets and rejected mails with their errors (``report.ok`` is False then).  ``progress`` gets
        "unpacking" updates counted in mails.
        """
        config = self.config
        counter = Counter(progress, "unpacking", len(mails), unit="mails")
        with self._keyring() as keyring:
            return unpack_files(
                list(mails),
                keyring,
                out_dir,
                max_output=config.unpacking.max_decrypted_size,
                passphrase=config.passphrase(),
                own_addresses=frozenset(own_addresses(config, keyring)),
                progress=counter.advance,
            )

    def send(
        self,
        paths: Sequence[Path],
        to: str,
        *,
        sender: str = "",
        note: str = "",
        attachments: Sequence[Path] = (),
        emergency: bool = False,
        max_mail_size: int | None = None,
        progress: ProgressCallback | None = None,
        on_wait: Callable[[], None] | None = None,
        on_skip: SkipCallback | None = None,
        constancy: ConstancyMark | None = None,
        strict: bool = False,
        on_found: FoundCallback | None = None,
    ) -> list[TransferResult]:
        """Pack, queue and submit over SMTP; returns each transfer with its state (sent, queued, failed).

        Packs like :meth:`pack` (same arguments, ``strict`` and ``on_found`` included), into the
        outbox; each set is queued with what it holds (for ``transfers()``), then its mails go
        out in order.  A temporary SMTP failure leaves a transfer queued (``result.waiting``)
        for :meth:`send_pending`; a permanent one fails it (``status == "failed"``).
        ``progress`` gets "packing", then "sending" updates, both in bytes; ``on_wait``
        is called before waiting for another process that is sending from this home.
        ``constancy`` marks the sets as a constancy check's test transfer (see
        :meth:`constancy_run`, which is how to run one).
        This call blocks; it runs its own event loop, so call it outside of one.

        Raises :class:`~dicommail.errors.ConfigError` for a bad ``[smtp]`` section before
        anything is packed, the errors of :meth:`pack` (then nothing is queued), and
        :class:`~dicommail.errors.AuthenticationError` and other non-temporary connection
        errors (a bad TLS certificate).  An error raised after the sets were queued carries
        their transfer IDs in its ``queued_transfers`` attribute: they stay in the outbox for
        :meth:`send_pending`.
        """
        from dicommail.transport.smtp import SmtpClient

        config = self.config
        # Checked before packing, which may take long: a bad [smtp] section fails at once.
        client = SmtpClient.from_config(config)
        with self._keyring() as keyring:
            options, studies = self._prepare(
                keyring, paths, to, sender, note, attachments, emergency, max_mail_size,
                _Scanning("send", on_skip, strict, on_found), constancy,
            )
            sets: list[PackedSet] = []
            try:
                _pack_studies(keyring, options, studies, config.spool / "outbox", sets, progress)
            except BaseException:
                # Nothing is queued yet: mails packed so far would only be orphans.
                for packed in sets:
                    for mail in packed.mails:
                        mail.path.unlink(missing_ok=True)
                raise
        with self._database() as db:
            # What each transfer holds (images, patient, study) is remembered locally, for `transfers()`.
            transfer_ids = [
                queue_set(db, packed, on_queued=functools.partial(record_study_details,
                                                                  files=studies.get(packed.study_uid, [])))
                for packed in sets
            ]
            try:
                return self._submit(db, client, options.sender, transfer_ids, progress, on_wait)
            except DicommailError as exc:
                # The sets are safe in the outbox; the caller learns which, to say so or retry them.
                # (An attribute like IncompleteSetError.missing_parts, but on whichever error it is.)
                exc.queued_transfers = tuple(transfer_ids)
                raise

    def send_pending(
        self,
        *,
        sender: str = "",
        progress: ProgressCallback | None = None,
        on_wait: Callable[[], None] | None = None,
    ) -> list[TransferResult]:
        """Submit what the outbox holds that is due (retries after an SMTP outage).

        Returns every unfinished transfer looked at, also those not yet due (``sent_now == 0``).
        ``sender`` overrides the envelope sender (default identity.address, else this site's
        key's address).  ``progress`` gets "sending" updates in bytes; ``on_wait`` as for
        :meth:`send`.  Raises :class:`~dicommail.errors.ConfigError` for a bad ``[smtp]``
        section or no sender address, and the connection errors of :meth:`send`.
        """
        from dicommail.transport.smtp import SmtpClient

        config = self.config
        client = SmtpClient.from_config(config)
        if not sender and not config.identity.address:
            with self._keyring() as keyring:
                sender = own_key(keyring, config.identity.key).email
        sender = sender or config.identity.address
        if not is_mail_address(sender):
            raise ConfigError("no sender address", "set identity.address in dicommail.toml or pass --from")
        with self._database() as db:
            return self._submit(db, client, sender, None, progress, on_wait)

    # -- shared steps -------------------------------------------------------------

    def _prepare(
        self,
        keyring: Keyring,
        paths: Sequence[Path],
        to: str,
        sender: str,
        note: str,
        attachments: Sequence[Path],
        emergency: bool,
        max_mail_size: int | None,
        scanning: _Scanning,
        constancy: ConstancyMark | None = None,
    ) -> tuple[PackOptions, _Studies]:
        """Check the addresses and this site's key, find the studies: all that may fail before packing."""
        if not is_mail_address(to):
            raise InputError(f"--to {to!r} is not a mail address")
        config = self.config
        me = own_key(keyring, config.identity.key)
        sender = sender_address(config, me, sender)
        studies = _find_studies(paths, scanning)
        options = pack_options(
            config,
            me,
            sender,
            to,
            note=note,
            attachments=attachments,
            emergency=emergency,
            max_mail_size=max_mail_size,
            constancy=constancy,
        )
        return options, studies

    def _submit(
        self,
        db: Database,
        client: SmtpClient,
        sender: str,
        transfer_ids: list[int] | None,
        progress: ProgressCallback | None,
        on_wait: Callable[[], None] | None,
    ) -> list[TransferResult]:
        """Send due mails (all, or of ``transfer_ids``) under the outbox lock; results with their mails."""
        import asyncio

        config = self.config
        with sender_lock(config.spool / "outbox", on_wait=on_wait):
            # Counted under the lock: another run may have sent some while we waited.
            counter = Counter(progress, "sending", queued_bytes(db, transfer_ids))
            results = asyncio.run(
                send_pending(
                    db,
                    lambda: client,
                    sender=sender,
                    max_attempts=config.smtp.max_attempts,
                    transfer_ids=transfer_ids,
                    progress=counter.advance,
                )
            )
        if transfer_ids is not None:
            # Another run may have sent some of ours while we waited for the lock: report them all.
            by_id = {r.transfer_id: r for r in results}
            results = [by_id.get(i) or transfer_result(db, i) for i in transfer_ids]
        return [with_mails(db, r) for r in results]


@dataclass(frozen=True)
class _Scanning:
    """How :meth:`Sending.pack` and :meth:`Sending.send` treat the scan of their paths."""

    command: str  # "pack" or "send", for the messages
    on_skip: SkipCallback | None
    strict: bool
    on_found: FoundCallback | None


def _find_studies(paths: Sequence[Path], scanning: _Scanning) -> _Studies:
    """The DICOM files under ``paths`` by study; what is skipped is reported, and none at all is an error.

    All of it before anything is packed: with ``strict``, one skipped file
    refuses the whole job, so nothing of it goes out half.
    """
    result = scan(paths)
    for path, reason in result.skipped:
        log.debug("skipped: %s", reason)  # names a file, so not at the default level
        if scanning.on_skip is not None:
            scanning.on_skip(path, reason)
    verb = "packed" if scanning.command == "pack" else "sent"
    if scanning.strict and result.skipped:
        names = ", ".join(str(path) for path, _reason in result.skipped[:_NAMED])
        more = len(result.skipped) - _NAMED
        raise InputError(
            f"--strict was given and {len(result.skipped)} file(s) cannot be {verb}: {names}"
            + (f" and {more} more" if more > 0 else "") + f"; nothing was {verb}",
            "repair or re-export those files, or move them out of the given paths",
        )
    studies = result.studies()
    if not studies:
        raise InputError("no DICOM files found in the given paths",
                         f"point {scanning.command} at DICOM files or folders")
    if scanning.on_found is not None:
        scanning.on_found(len(result.files), sum(f.size for f in result.files))
    return studies


def _pack_studies(
    keyring: Keyring,
    options: PackOptions,
    studies: _Studies,
    out_dir: Path,
    sets: list[PackedSet],
    progress: ProgressCallback | None,
) -> None:
    """Pack each study into ``out_dir``, appending each set to ``sets`` as it is done (for a cleanup)."""
    # Attachments ride in every set, and the packer counts them as it writes them.
    extra = sum(path.stat().st_size for path in options.attachments if path.is_file())
    total = sum(f.size for files in studies.values() for f in files) + extra * len(studies)
    counter = Counter(progress, "packing", total)
    packer = Packer(keyring, options, progress=counter.advance)
    for files in studies.values():
        sets.append(packer.pack(files, out_dir))
