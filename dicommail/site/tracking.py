"""What happened to sent and received studies: the jobs of ``dicommail status|transfers|check|echo``.

Sent transfers are :class:`TransferView` values (a list for
:meth:`Tracking.transfers`, a :class:`TransferDetail` with its timeline for
:meth:`Tracking.transfer`); the receiving side's sets are
:class:`ReceivedSet` values and the mails it could not process
:class:`QuarantinedItem` values.  Each has a ``to_json()`` that is what the
CLI prints with ``--json``.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicommail.checks import CheckResult, run_checks
from dicommail.config import PacsConfig
from dicommail.errors import DicommailError, InputError, InvalidArgumentError
from dicommail.sender import tracking as _t
from dicommail.sender.tracking import TimelineEntry, TransferView
from dicommail.site.base import SiteBase

__all__ = [
    "TRANSFER_STATES",
    "CheckResult",
    "EchoResult",
    "InvalidArgumentError",
    "QuarantinedItem",
    "ReceivedSet",
    "TimelineEntry",
    "Tracking",
    "TransferChange",
    "TransferDetail",
    "TransferView",
]

#: The ``state`` filters of :meth:`Tracking.transfers` and the transfer states each one selects.
TRANSFER_STATES: dict[str, tuple[str, ...]] = {
    "active": _t.ACTIVE,
    "waiting": _t.WAITING,
    "done": (_t.DELIVERED,),
    "failed": _t.UNSUCCESSFUL,
}

# AE titles: 1-16 characters of the default repertoire without backslash.
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
# AE@HOST:PORT, the host in brackets when it is an IPv6 address.
_TARGET_RE = re.compile(r"^(?:(?P<aet>[^@]+)@)?(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:@\[\]]+)):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class TransferDetail:
    """One sent transfer with its history: what ``dicommail status IDENT`` shows.

    ``final_report`` is the receiver's set-level status report (files, DICOM
    instances forwarded, times) once it has sent one, else None.
    """

    transfer: TransferView
    timeline: tuple[TimelineEntry, ...]
    final_report: dict[str, object] | None

    def to_json(self, show_patient: bool = False) -> dict[str, object]:
        """What ``dicommail status IDENT --json`` prints; patient data only with ``show_patient``."""
        return {
            "ok": True,
            "transfer": self.transfer.to_json(show_patient),
            "final_report": self.final_report,
            "timeline": [entry.to_json() for entry in self.timeline],
        }


@dataclass(frozen=True)
class TransferChange:
    """What :meth:`Tracking.retry`, :meth:`~Tracking.cancel` or :meth:`~Tracking.delete` did.

    ``transfer`` is the transfer as it was before the change; ``mails_queued``
    counts the mails a retry queued again, ``files_removed`` the outbox files
    a delete removed (0 for the other actions).
    """

    action: str
    transfer: TransferView
    mails_queued: int = 0
    files_removed: int = 0


@dataclass(frozen=True)
class ReceivedSet:
    """One set this site received (or is receiving), from the receiver's state.

    ``status`` is "collecting", "complete", "delivered", "failed" or
    "expired"; ``error`` says why a set failed (a reason code and message,
    never patient data).  ``parts_received`` counts the verified parts,
    ``instances_forwarded`` the DICOM instances the destination has accepted.
    Times are timezone-aware (UTC).
    """

    id: int
    set_id: str
    signer: str
    sender: str | None
    set_total: int
    study_uid: str | None
    status: str
    error: str | None
    first_seen_at: datetime
    updated_at: datetime
    delivered_at: datetime | None
    attempts: int
    parts_received: int
    instances_forwarded: int

    def to_json(self) -> dict[str, object]:
        """The set as JSON: times in ISO 8601 with offset, None for absent values."""
        return {
            "id": self.id,
            "set_id": self.set_id,
            "signer": self.signer,
            "sender": self.sender,
            "set_total": self.set_total,
            "study_uid": self.study_uid,
            "status": self.status,
            "error": self.error,
            "first_seen_at": self.first_seen_at.isoformat(),
            "updated_at": self.updated_at.isoformat(),
            "delivered_at": _iso(self.delivered_at),
            "attempts": self.attempts,
            "parts_received": self.parts_received,
            "instances_forwarded": self.instances_forwarded,
        }


@dataclass(frozen=True)
class QuarantinedItem:
    """One folder of ``spool/quarantine/``: mails the receiver could not process, kept as they arrived.

    ``code``, ``message`` and ``hint`` are the error that put them there;
    ``set_id`` is set for a set that failed as a whole; ``mails`` are the
    copies of the (still encrypted) mails.  ``detail`` is the original
    exception text of an unforeseen failure: it may quote content from the
    mail, so it is an attribute for the operator's eyes only and is left out
    of :meth:`to_json`.  A folder without a readable ``reason.json`` is listed
    with code "unknown".
    """

    name: str
    path: Path
    code: str
    message: str
    hint: str
    quarantined_at: datetime
    set_id: str | None
    mails: tuple[Path, ...]
    detail: str | None = None

    def to_json(self) -> dict[str, object]:
        """The item as JSON (without ``detail``): time in ISO 8601 with offset, None for absent values."""
        return {
            "name": self.name,
            "path": str(self.path),
            "code": self.code,
            "message": self.message,
            "hint": self.hint or None,
            "quarantined_at": self.quarantined_at.isoformat(),
            "set_id": self.set_id,
            "mails": [mail.name for mail in self.mails],
        }


@dataclass(frozen=True)
class EchoResult:
    """A successful C-ECHO: whom we asked, as whom, and how long the answer took (seconds)."""

    called_aet: str
    host: str
    port: int
    calling_aet: str
    seconds: float

    def to_json(self) -> dict[str, object]:
        """What ``dicommail echo --json`` prints."""
        return {
            "ok": True,
            "called_aet": self.called_aet,
            "host": self.host,
            "port": self.port,
            "calling_aet": self.calling_aet,
            "seconds": round(self.seconds, 6),
        }


class Tracking(SiteBase):
    """Methods of :class:`dicommail.Site` that report and manage transfers, and check the site."""

    # -- sent transfers ---------------------------------------------------------------------------

    def transfers(self, *, state: str | None = None, since: datetime | None = None) -> list[TransferView]:
        """Sent transfers, oldest first, as ``dicommail status`` lists them.

        ``state`` is one of :data:`TRANSFER_STATES`: "active" (not finished),
        "waiting" (sent, waiting for the receiver), "done" (delivered) or
        "failed" (failed, expired or cancelled); None lists all.  ``since``
        keeps transfers created at or after that time (a naive datetime is
        local time).  Transfers overdue for their final notification
        (``tracking.ack_timeout``) are marked expired first.

        Raises :class:`~dicommail.errors.InputError` for an unknown ``state``.
        """
        if state is not None and state not in TRANSFER_STATES:
            raise InputError(f"{state!r} is not a transfer state", f"use one of: {', '.join(TRANSFER_STATES)}")
        states = TRANSFER_STATES[state] if state is not None else ()
        with self._database() as db:
            _t.expire_overdue(db, self.config.tracking.ack_timeout)
            return _t.list_transfers(db, states, since.timestamp() if since is not None else None)

    def transfer(self, ident: str | int) -> TransferDetail:
        """One transfer by set ID or transfer number, with its timeline and the receiver's final report.

        Marks overdue transfers expired first, like :meth:`transfers`.
        Raises :class:`~dicommail.errors.StateError` (a
        :class:`~dicommail.errors.DicommailError`) if there is no such transfer.
        """
        with self._database() as db:
            _t.expire_overdue(db, self.config.tracking.ack_timeout)
            view = _t.get_transfer(db, str(ident))
            return TransferDetail(view, tuple(_t.timeline(db, view.id)), _t.final_report(db, view.id))

    def retry(self, ident: str | int, *, confirm: Callable[[TransferView], bool] | None = None) -> TransferChange:
        """Queue a failed, expired or cancelled transfer's unacknowledged parts again.

        The mails go out with :meth:`send_pending` or the running receiver.
        ``confirm``, if given, is called with the transfer before anything
        changes; if it returns False (or raises), nothing is changed (see
        :meth:`cancel`).  Raises :class:`~dicommail.errors.StateError` if
        there is no such transfer, it is not finished unsuccessfully, or its
        mails are gone from the outbox.
        """
        return self._change("retry", ident, confirm)

    def cancel(self, ident: str | int, *, confirm: Callable[[TransferView], bool] | None = None) -> TransferChange:
        """Stop an active transfer: mails not yet sent stay unsent; later notifications change nothing.

        ``confirm`` as for :meth:`retry`: returning False raises
        :class:`~dicommail.errors.InputError` with nothing changed, and an
        exception it raises propagates unchanged (the CLI's prompt does so).
        Raises :class:`~dicommail.errors.StateError` if there is no such
        transfer or it is not active.
        """
        return self._change("cancel", ident, confirm)

    def delete(self, ident: str | int, *, confirm: Callable[[TransferView], bool] | None = None) -> TransferChange:
        """Remove a finished transfer, its records and its mails in the outbox.

        ``confirm`` as for :meth:`retry`.  Raises
        :class:`~dicommail.errors.StateError` if there is no such transfer,
        it is still active, or other records (the gateway's) refer to it.
        """
        return self._change("delete", ident, confirm)

    def _change(
        self, action: str, ident: str | int, confirm: Callable[[TransferView], bool] | None
    ) -> TransferChange:
        # No expiry first (unlike transfer()): these act on the state the operator was shown.
        with self._database() as db:
            view = _t.get_transfer(db, str(ident))
            if confirm is not None and not confirm(view):
                raise InputError("not confirmed; nothing was changed")
            if action == "retry":
                return TransferChange(action, view, mails_queued=_t.retry_transfer(db, view.id))
            if action == "cancel":
                _t.cancel_transfer(db, view.id)
                return TransferChange(action, view)
            return TransferChange(action, view, files_removed=_t.delete_transfer(db, view.id))

    # -- the receiving side -----------------------------------------------------------------------

    def received_sets(self) -> list[ReceivedSet]:
        """The sets this site has received or is receiving, newest first."""
        with self._database() as db:
            rows = db.query(
                """SELECT s.*,
                       (SELECT COUNT(*) FROM inbound_parts p WHERE p.set_ref = s.id) AS parts_received,
                       (SELECT COUNT(*) FROM forwarded_instances f WHERE f.set_ref = s.id AND f.state = 'stored')
                           AS instances_forwarded
                   FROM inbound_sets s ORDER BY s.first_seen_at DESC, s.id DESC"""
            )
        return [_received_set(row) for row in rows]

    def quarantine(self) -> list[QuarantinedItem]:
        """What the receiver put aside (``spool/quarantine/``), newest first.

        Items are removed by the receiver after ``receiver.quarantine_days``.
        """
        root = self.config.spool / "quarantine"
        try:
            entries = [e for e in root.iterdir() if e.is_dir() and not e.is_symlink()]
        except FileNotFoundError:
            return []  # nothing was ever received here
        items: list[QuarantinedItem] = []
        for entry in entries:
            try:
                items.append(_quarantined(entry))
            except FileNotFoundError:
                continue  # removed meanwhile: the receiver expires old items
        return sorted(items, key=lambda item: (item.quarantined_at, item.name), reverse=True)

    # -- checks -----------------------------------------------------------------------------------

    def check(self) -> list[CheckResult]:
        """Check that this site can run: config, own key, peers' keys, SMTP, mailbox, PACS.

        One :class:`CheckResult` per check, in a fixed order; a failed check
        never stops the others.  Keys must not expire within 30 days.  If the
        checks cannot start at all (the keyring cannot be opened), the result
        is one failed "config" check saying why.
        """
        try:
            return run_checks(self.config)
        except DicommailError as exc:
            return [CheckResult("config", False, exc.message, exc.hint)]

    def echo(self, target: str | None = None, calling_aet: str | None = None) -> EchoResult:
        """C-ECHO a PACS: ``target`` as ``AE@HOST:PORT`` (AE optional), else the PACS configured in [pacs].

        ``calling_aet`` replaces ``pacs.calling_aet`` for this test.  Raises
        :class:`InvalidArgumentError` (an :class:`~dicommail.errors.InputError`)
        for a malformed ``target`` or AE title, and
        :class:`~dicommail.errors.DestinationError` if the PACS cannot be
        reached, refuses or does not answer.
        """
        from dicommail.receiver.destinations import echo as send_echo  # pynetdicom: only when needed

        pacs = self.config.pacs
        if target:
            pacs = _target(pacs, target)
        if calling_aet is not None:
            pacs = dataclasses.replace(pacs, calling_aet=_aet(calling_aet, "calling_aet"))
        seconds = send_echo(pacs)
        return EchoResult(pacs.called_aet, pacs.host, pacs.port, pacs.calling_aet, seconds)


def _iso(timestamp: datetime | None) -> str | None:
    return timestamp.isoformat() if timestamp is not None else None


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _received_set(row: sqlite3.Row) -> ReceivedSet:
    return ReceivedSet(
        id=row["id"],
        set_id=row["set_id"],
        signer=row["signer"],
        sender=row["sender"],
        set_total=row["set_total"],
        study_uid=row["study_uid"],
        status=row["status"],
        error=row["error"],
        first_seen_at=_utc(row["first_seen_at"]),
        updated_at=_utc(row["updated_at"]),
        delivered_at=_utc(row["delivered_at"]) if row["delivered_at"] is not None else None,
        attempts=row["attempts"],
        parts_received=row["parts_received"],
        instances_forwarded=row["instances_forwarded"],
    )


def _quarantined(folder: Path) -> QuarantinedItem:
    mails = tuple(sorted(p for p in folder.iterdir() if p.is_file() and p.name != "reason.json"))
    # The folder's time stands in where reason.json is missing or has no usable time.
    made = _utc(folder.stat().st_mtime)
    try:
        raw = json.loads((folder / "reason.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raw = None
    if not isinstance(raw, dict):
        return QuarantinedItem(folder.name, folder, "unknown", "reason.json is missing or unreadable", "", made,
                               None, mails)

    def text(key: str) -> str | None:
        value = raw.get(key)
        return value if isinstance(value, str) and value else None

    when = text("quarantined_at")
    try:
        at = datetime.fromisoformat(when) if when else made
    except ValueError:
        at = made
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)  # the spool writes UTC
    return QuarantinedItem(
        name=folder.name,
        path=folder,
        code=text("code") or "unknown",
        message=text("message") or "",
        hint=text("hint") or "",
        quarantined_at=at,
        set_id=text("set_id"),
        mails=mails,
        detail=text("detail"),
    )


def _aet(value: str, argument: str) -> str:
    if not _AET_RE.match(value) or not value.strip():
        raise InvalidArgumentError(
            f"{value!r} is not a DICOM AE title (1-16 characters, no backslash)", argument=argument
        )
    return value


def _target(config: PacsConfig, value: str) -> PacsConfig:
    match = _TARGET_RE.match(value)
    port = int(match.group("port")) if match else 0
    if not match or not 1 <= port <= 65535:
        raise InvalidArgumentError(f"{value!r} is not AE@HOST:PORT (e.g. PACS@192.0.2.7:104)", argument="target")
    called = _aet(match.group("aet"), "target") if match.group("aet") else config.called_aet
    return dataclasses.replace(config, called_aet=called, host=match.group("ipv6") or match.group("host"), port=port)
