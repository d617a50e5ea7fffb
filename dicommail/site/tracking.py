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
import shutil
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dicommail.checks import CheckResult, run_checks
from dicommail.config import PacsConfig
from dicommail.errors import DicommailError, InputError, InvalidArgumentError, StateError
from dicommail.sender import tracking as _t
from dicommail.sender.tracking import TimelineEntry, TransferView
from dicommail.site.base import SiteBase
from dicommail.store.db import Database

__all__ = [
    "RECEIVED_STATES",
    "TRANSFER_STATES",
    "CheckResult",
    "EchoResult",
    "InvalidArgumentError",
    "QuarantineChange",
    "QuarantinedItem",
    "ReceivedEvent",
    "ReceivedSet",
    "ReceivedSetDetail",
    "SentNotification",
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

#: The states of :attr:`ReceivedSet.state`, in the order a set goes through them.
RECEIVED_STATES = ("incomplete", "verified", "waiting", "forwarding", "delivered", "failed", "expired")

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
        """What ``dicommail status IDENT --json`` prints; patient data only with ``show_patient``.

        Times are ISO 8601 strings with offset (the transfer's and the
        timeline's in UTC; ``final_report`` is the receiver's report as it
        sent it, whose times a dicommail receiver also gives that way).
        """
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
    #: When the next forwarding attempt is due (a set waiting for the destination), else None.
    next_attempt_at: datetime | None = None
    #: The part numbers not verified yet (an incomplete or expired set).
    missing_parts: tuple[int, ...] = ()
    #: The set's DICOM instances, where known (a verified set whose decoded parts are in the spool).
    instances_total: int | None = None
    #: The mails that brought its verified parts, and their size in bytes (as received, encrypted).
    mails: int = 0
    bytes: int = 0

    @property
    def state(self) -> str:
        """What ``dicommail inbox`` shows, one of :data:`RECEIVED_STATES`.

        "incomplete" (parts missing), "verified" (complete, not forwarded
        yet), "waiting" (the destination failed; ``error`` says why, it is
        tried again at ``next_attempt_at``), "forwarding" (instances are
        going out), "delivered", "failed" or "expired".
        """
        if self.status == "collecting":
            return "incomplete"
        if self.status == "complete":
            if self.error:
                return "waiting"
            return "forwarding" if self.instances_forwarded else "verified"
        return self.status

    def to_json(self) -> dict[str, object]:
        """The set as JSON: times in ISO 8601 with offset, None for absent values."""
        return {
            "state": self.state,
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
            "missing_parts": list(self.missing_parts),
            "instances_forwarded": self.instances_forwarded,
            "instances_total": self.instances_total,
            "next_attempt_at": _iso(self.next_attempt_at),
            "mails": self.mails,
            "bytes": self.bytes,
        }


@dataclass(frozen=True)
class ReceivedEvent:
    """One step of a received set's history: when, what, which part (None: the set), and a detail."""

    at: datetime
    event: str
    set_part: int | None
    detail: str

    def to_json(self) -> dict[str, object]:
        """The entry as JSON: the time in ISO 8601 with offset, None for an absent detail."""
        return {"at": self.at.isoformat(), "event": self.event, "set_part": self.set_part,
                "detail": self.detail or None}


@dataclass(frozen=True)
class SentNotification:
    """A notification (acknowledgement) this site recorded for a received set, sent or not.

    ``event`` names what it reports (e.g. "part 2 verified", "set final");
    ``status`` is "pending", "sent", "failed", "held" or "superseded".
    """

    event: str
    scope: str
    set_part: int | None
    outcome: str
    reason: str | None
    status: str
    recipient: str | None
    method: str | None
    created_at: datetime
    sent_at: datetime | None
    attempts: int
    last_error: str | None

    def to_json(self) -> dict[str, object]:
        """The notification as JSON: times in ISO 8601 with offset, None for absent values."""
        return {
            "event": self.event, "scope": self.scope, "set_part": self.set_part, "outcome": self.outcome,
            "reason": self.reason, "status": self.status, "recipient": self.recipient, "method": self.method,
            "created_at": self.created_at.isoformat(), "sent_at": _iso(self.sent_at), "attempts": self.attempts,
            "last_error": self.last_error,
        }


@dataclass(frozen=True)
class ReceivedSetDetail:
    """One received set with its timeline and its notifications: what ``dicommail inbox SETID`` shows."""

    set: ReceivedSet
    timeline: tuple[ReceivedEvent, ...]
    notifications: tuple[SentNotification, ...]

    def to_json(self) -> dict[str, object]:
        """What ``dicommail inbox SETID --json`` prints for each set: the set, its timeline, its notifications."""
        return {
            **self.set.to_json(),
            "timeline": [entry.to_json() for entry in self.timeline],
            "notifications": [n.to_json() for n in self.notifications],
        }


@dataclass(frozen=True)
class QuarantineChange:
    """What :meth:`Tracking.retry_quarantined` or :meth:`~Tracking.purge_quarantine` did.

    ``items`` are the items as they were; ``mails_requeued`` counts the mails
    stored again for the pipeline (a retry), ``sets_reset`` the set records
    removed so that their mails make the set anew.
    """

    action: str
    items: tuple[QuarantinedItem, ...]
    mails_requeued: int = 0
    sets_reset: int = 0

    def to_json(self) -> dict[str, object]:
        """What ``dicommail quarantine retry|purge --json`` prints."""
        return {
            "ok": True,
            "action": self.action,
            "items": [item.to_json() for item in self.items],
            "mails_requeued": self.mails_requeued,
            "sets_reset": self.sets_reset,
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
            _t.refuse(action, view.set_id, view.status)  # before the operator is asked to confirm it
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
        """The sets this site has received or is receiving, newest first (what ``dicommail inbox`` lists)."""
        with self._database() as db:
            return _received_sets(db)

    def received_set(self, ident: str | int) -> list[ReceivedSetDetail]:
        """One received set by set ID, with its timeline and notifications; oldest first.

        A set belongs to its signer, so one set ID may name several sets (two
        peers reusing an ID): each is returned.  A number that is no set ID
        names the set by its record number (``ReceivedSet.id``).  Raises
        :class:`~dicommail.errors.StateError` if there is no such set.
        """
        text = str(ident).strip()
        with self._database() as db:
            sets = _received_sets(db, set_id=text)
            if not sets and text.isdigit():
                sets = _received_sets(db, ref=int(text))
            if not sets:
                raise StateError(f"no received set {text!r}", "`dicommail inbox` lists the sets received here")
            return [ReceivedSetDetail(one, tuple(_set_timeline(db, one)), tuple(_set_notifications(db, one.id)))
                    for one in reversed(sets)]

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

    def quarantined(self, name: str) -> QuarantinedItem:
        """One item of :meth:`quarantine` by its folder name, or by the end of it (e.g. "mail-12").

        Raises :class:`~dicommail.errors.StateError` if no item, or more than
        one, has that name.
        """
        items = self.quarantine()
        exact = [item for item in items if item.name == name]
        matches = exact or [item for item in items if name and item.name.endswith(f"-{name}")]
        if len(matches) == 1:
            return matches[0]
        if not matches:
            raise StateError(f"no quarantined item {name!r}", "`dicommail quarantine list` shows the items")
        raise StateError(f"{name!r} names {len(matches)} quarantined items", "give the full name of one")

    def retry_quarantined(
        self, name: str, *, confirm: Callable[[QuarantinedItem], bool] | None = None
    ) -> QuarantineChange:
        """Put a quarantined item back into the receiver's pipeline; the next receive cycle processes it.

        A mail item (e.g. after the signer's key was certified): its mails
        are stored again as if just fetched.  A set item ("...-set-N"): the
        set's record is removed and its mails stored again, so that they make
        the set anew; refused if any instance of it was forwarded already
        (they would go to the destination twice).  The quarantine folder is
        removed.  ``confirm`` as for :meth:`retry`.  Raises
        :class:`~dicommail.errors.StateError` if there is no such item, or
        nothing of it can be stored again (the mails and their records are
        gone).
        """
        item = self.quarantined(name)
        if confirm is not None and not confirm(item):
            raise InputError("not confirmed; nothing was changed")
        reason = _reason(item.path)
        with self._database() as db, db.transaction() as conn:
            set_ref = _quarantined_set_ref(item, reason)
            if set_ref is not None:
                mails = _reset_set(conn, set_ref, item)
                sets = 1
            else:
                mails = _requeue_mails(conn, item, reason)
                sets = 0
            shutil.rmtree(item.path)
        return QuarantineChange("retry", (item,), mails_requeued=mails, sets_reset=sets)

    def purge_quarantine(
        self,
        name: str | None = None,
        *,
        older_than: timedelta | None = None,
        confirm: Callable[[list[QuarantinedItem]], bool] | None = None,
    ) -> QuarantineChange:
        """Remove quarantined items: one by ``name``, those quarantined longer ago than ``older_than``, or all.

        ``confirm``, if given, is called with the items before anything is
        removed (not when there are none); returning False raises
        :class:`~dicommail.errors.InputError` with nothing changed.  Raises
        :class:`~dicommail.errors.StateError` for an unknown ``name`` and
        :class:`InvalidArgumentError` for both ``name`` and ``older_than``.
        """
        if name is not None and older_than is not None:
            raise InvalidArgumentError("give an item name or an age, not both", argument="older_than")
        if name is not None:
            items = [self.quarantined(name)]
        else:
            items = self.quarantine()
            if older_than is not None:
                cutoff = datetime.now(UTC) - older_than
                items = [item for item in items if item.quarantined_at < cutoff]
        if items and confirm is not None and not confirm(items):
            raise InputError("not confirmed; nothing was changed")
        for item in items:
            shutil.rmtree(item.path, ignore_errors=True)
        return QuarantineChange("purge", tuple(items))

    # -- checks -----------------------------------------------------------------------------------

    def check(self) -> list[CheckResult]:
        """Check that this site can run: config, secret files, keys, a test signature, servers, gateway, acks.

        One :class:`CheckResult` per check, in a fixed order, every check
        always there: one that does not apply is "skipped" with the setting
        that would enable it.  A failed check never stops the others.  The
        test signature flushes the passphrases this home's gpg-agent cached,
        so that a wrong passphrase file shows now.  Keys must not expire
        within 30 days; secret files open to others are a "warning".  If the
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


def _received_sets(db: Database, set_id: str | None = None, ref: int | None = None) -> list[ReceivedSet]:
    # All sets, or those of one set ID, or one record number.
    which: dict[str, object] = {"set_id": set_id, "ref": ref}
    rows = db.query(
        """SELECT s.*,
               (SELECT COUNT(*) FROM inbound_parts p WHERE p.set_ref = s.id) AS parts_received,
               (SELECT COUNT(*) FROM forwarded_instances f WHERE f.set_ref = s.id AND f.state = 'stored')
                   AS instances_forwarded,
               (SELECT COUNT(*) FROM inbound_mails m WHERE m.set_ref = s.id) AS mails,
               (SELECT COALESCE(SUM(m.size), 0) FROM inbound_mails m WHERE m.set_ref = s.id) AS bytes
           FROM inbound_sets s WHERE (:set_id IS NULL OR s.set_id = :set_id) AND (:ref IS NULL OR s.id = :ref)
           ORDER BY s.first_seen_at DESC, s.id DESC""",
        which,
    )
    parts: dict[int, list[tuple[int, str]]] = {}
    for part in db.query("SELECT p.set_ref, p.set_part, p.directory FROM inbound_parts p "
                         "JOIN inbound_sets s ON s.id = p.set_ref "
                         "WHERE (:set_id IS NULL OR s.set_id = :set_id) AND (:ref IS NULL OR s.id = :ref)", which):
        parts.setdefault(part["set_ref"], []).append((part["set_part"], part["directory"]))
    return [_received_set(row, parts.get(row["id"], [])) for row in rows]


def _received_set(row: sqlite3.Row, parts: list[tuple[int, str]]) -> ReceivedSet:
    have = {number for number, _ in parts}
    missing = tuple(n for n in range(1, row["set_total"] + 1) if n not in have) \
        if row["status"] != "delivered" else ()
    # While forwarding, the decoded parts are in the spool: their part.json files count the instances.
    total = _instances_in(directory for _, directory in parts) if row["status"] == "complete" else None
    waiting = row["status"] == "complete" and row["error"] is not None
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
        next_attempt_at=_utc(row["next_attempt_at"]) if waiting and row["next_attempt_at"] else None,
        missing_parts=missing,
        instances_total=total,
        mails=row["mails"],
        bytes=row["bytes"],
    )


def _instances_in(directories: Iterable[str]) -> int | None:
    """The DICOM instances the decoded parts in ``directories`` hold; None if a part.json cannot be read."""
    count = 0
    for directory in directories:
        try:
            data = json.loads((Path(directory) / "part.json").read_text(encoding="utf-8"))
            count += sum(1 for entry in data["files"] if isinstance(entry, dict) and entry.get("dicom"))
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return count


def _set_timeline(db: Database, one: ReceivedSet) -> list[ReceivedEvent]:
    """What happened to one received set, in time order (from its mails, parts, instances and record)."""
    events = [ReceivedEvent(one.first_seen_at, "first seen", None,
                            f"{one.set_total} part(s), signed by {one.signer}")]
    mails = db.query("SELECT set_part, size, received_at, processed_at FROM inbound_mails WHERE set_ref = ? "
                     "ORDER BY set_part, id", (one.id,))
    by_part: dict[int, list[sqlite3.Row]] = {}
    for mail in mails:
        by_part.setdefault(mail["set_part"] or 0, []).append(mail)
    for number, group in sorted(by_part.items()):
        verified = max((m["processed_at"] or m["received_at"]) for m in group)
        size = sum(m["size"] for m in group)
        events.append(ReceivedEvent(_utc(verified), "part verified", number or None,
                                    f"{len(group)} mail(s), {size} bytes"))
    # Mails that named this set ID but were never verified (their signer unknown): they may explain a gap.
    for mail in db.query("SELECT set_part, error, processed_at, received_at FROM inbound_mails WHERE set_id = ? "
                         "AND set_ref IS NULL AND status = 'quarantined' ORDER BY id", (one.set_id,)):
        events.append(ReceivedEvent(_utc(mail["processed_at"] or mail["received_at"]), "mail quarantined",
                                    mail["set_part"], f"not verified: {mail['error'] or 'unknown error'}"))
    tracking = db.query("SELECT verified_at FROM set_tracking WHERE set_ref = ?", (one.id,))
    if tracking and tracking[0]["verified_at"] is not None:
        events.append(ReceivedEvent(_utc(tracking[0]["verified_at"]), "complete", None,
                                    "all parts verified against the manifest"))
    forwarded = db.query("SELECT MIN(forwarded_at) AS first, MAX(forwarded_at) AS last, COUNT(*) AS n "
                         "FROM forwarded_instances WHERE set_ref = ? AND state = 'stored'", (one.id,))[0]
    if forwarded["n"]:
        events.append(ReceivedEvent(_utc(forwarded["first"]), "forwarding", None, "first instance accepted"))
        events.append(ReceivedEvent(_utc(forwarded["last"]), "forwarded", None,
                                    f"{forwarded['n']} instance(s) accepted in all"))
    if one.state == "waiting":  # the record keeps the last attempt only; next_attempt_at says when the next is
        events.append(ReceivedEvent(one.updated_at, "forwarding failed", None, f"attempt {one.attempts}: {one.error}"))
    if one.status == "delivered" and one.delivered_at is not None:
        after = f" after {one.attempts} failed attempt(s)" if one.attempts else ""
        events.append(ReceivedEvent(one.delivered_at, "delivered", None,
                                    f"{one.instances_forwarded} instance(s){after}"))
    elif one.status in ("failed", "expired"):
        events.append(ReceivedEvent(one.updated_at, one.status, None, one.error or ""))
    for note in _set_notifications(db, one.id):
        if note.sent_at is not None:
            events.append(ReceivedEvent(note.sent_at, "notification sent", note.set_part,
                                        f"{note.event}: {note.outcome} to {note.recipient} ({note.method})"))
    return sorted(events, key=lambda e: e.at)


def _set_notifications(db: Database, set_ref: int) -> list[SentNotification]:
    rows = db.query("SELECT * FROM notifications WHERE set_ref = ? ORDER BY created_at, id", (set_ref,))
    return [SentNotification(
        event=_event_name(row["event"], set_ref),
        scope=row["scope"],
        set_part=row["set_part"],
        outcome=row["outcome"],
        reason=row["reason"],
        status=row["status"],
        recipient=row["recipient"],
        method=row["method"],
        created_at=_utc(row["created_at"]),
        sent_at=_utc(row["sent_at"]) if row["sent_at"] is not None else None,
        attempts=row["attempts"],
        last_error=row["last_error"],
    ) for row in rows]


def _event_name(key: str, set_ref: int) -> str:
    """A notification's unique key ("<ref>/part/2/verified/pgp") as words ("part 2 verified")."""
    words = key.split("/")
    if words and words[0] == str(set_ref):
        words = words[1:]
    if words and words[-1] in ("pgp", "rfc"):
        words = words[:-1]
    return " ".join(w for w in words if not w.startswith("#")) or key


# -- retrying quarantined items -------------------------------------------------------------------


def _reason(folder: Path) -> dict[str, object]:
    try:
        raw = json.loads((folder / "reason.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return raw if isinstance(raw, dict) else {}


def _quarantined_set_ref(item: QuarantinedItem, reason: dict[str, object]) -> int | None:
    """The inbound_sets id of a set item (reason.json's set_ref, or the folder's "set-<ref>" label)."""
    ref = reason.get("set_ref")
    if isinstance(ref, int) and not isinstance(ref, bool):
        return ref
    match = _SET_LABEL_RE.search(item.name)
    return int(match.group(1)) if match and item.set_id is not None else None


def _store_again(conn: sqlite3.Connection, rows: list[sqlite3.Row], item: QuarantinedItem) -> int:
    """Make mail records 'stored' again; a mail gone from spool/inbox is put back from the quarantine's copy."""
    copies = {mail.name: mail for mail in item.mails}
    stored = 0
    for row in rows:
        path = Path(row["spool_path"])
        if not path.is_file():
            copy = copies.get(path.name)
            if copy is None:
                continue  # nothing left to process: the record stays as it is
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(copy, path)
        conn.execute("UPDATE inbound_mails SET status = 'stored', error = NULL, processed_at = NULL, set_ref = NULL "
                     "WHERE id = ?", (row["id"],))
        if row["fragment_id"] is not None:
            # The group's candidates must be tried again, not skipped as "tried before".
            conn.execute("DELETE FROM fragment_groups WHERE fragment_id = ?", (row["fragment_id"],))
        stored += 1
    return stored


def _requeue_mails(conn: sqlite3.Connection, item: QuarantinedItem, reason: dict[str, object]) -> int:
    ids = reason.get("inbound_ids")
    uids = reason.get("mails")
    account = reason.get("account")
    rows: list[sqlite3.Row] = []
    if isinstance(ids, list) and all(isinstance(i, int) for i in ids) and ids:
        rows = [r for i in ids for r in conn.execute("SELECT * FROM inbound_mails WHERE id = ?", (i,)).fetchall()]
    elif isinstance(uids, list) and isinstance(account, str) and uids:
        rows = [r for uid in uids if isinstance(uid, str) for r in conn.execute(
            "SELECT * FROM inbound_mails WHERE account = ? AND server_uid = ?", (account, uid)).fetchall()]
    else:  # an item without a usable reason.json: its files are named like the spool's
        names = {mail.name for mail in item.mails}
        rows = [r for r in conn.execute("SELECT * FROM inbound_mails WHERE status = 'quarantined'").fetchall()
                if Path(r["spool_path"]).name in names]
    rows = [r for r in rows if r["status"] == "quarantined"]
    if not rows:
        raise StateError(f"the mails of {item.name} have no record to store again",
                         "they were retried or processed already; `dicommail quarantine purge NAME` removes it")
    stored = _store_again(conn, rows, item)
    if not stored:
        raise StateError(f"the mails of {item.name} are gone from the spool and the quarantine",
                         "ask the sender to send them again")
    return stored


def _reset_set(conn: sqlite3.Connection, set_ref: int, item: QuarantinedItem) -> int:
    """Remove a failed set's record so that its mails, stored again, make it anew."""
    row = conn.execute("SELECT status FROM inbound_sets WHERE id = ?", (set_ref,)).fetchone()
    if row is None:
        raise StateError(f"the set of {item.name} has no record any more", "`dicommail quarantine purge NAME` "
                         "removes the item; ask the sender to send the set again")
    if row["status"] not in ("failed", "expired"):
        raise StateError(f"the set of {item.name} is {row['status']}, not failed or expired",
                         "nothing to retry; `dicommail quarantine purge NAME` removes the item")
    forwarded = conn.execute("SELECT COUNT(*) FROM forwarded_instances WHERE set_ref = ?", (set_ref,)).fetchone()[0]
    if forwarded:
        raise StateError(
            f"{forwarded} instance(s) of the set of {item.name} were forwarded already; a retry would send them "
            "again",
            "ask the sender to send the set again, or forward its mails by hand (`dicommail unpack`)",
        )
    rows = conn.execute("SELECT * FROM inbound_mails WHERE set_ref = ?", (set_ref,)).fetchall()
    stored = _store_again(conn, list(rows), item)
    # The set's notifications stay as history, but their unique keys must not stop the new set's
    # (its record may get the same number): unsent ones are moot now.
    conn.execute("UPDATE notifications SET status = 'superseded' WHERE set_ref = ? AND status IN ('held', "
                 "'pending', 'failed')", (set_ref,))
    conn.execute("UPDATE notifications SET event = event || '/#' || id, set_ref = NULL WHERE set_ref = ?",
                 (set_ref,))
    conn.execute("DELETE FROM inbound_sets WHERE id = ?", (set_ref,))  # parts and tracking with it
    return stored


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


#: A set item's folder: "<stamp>-set-<ref>" (with "-<n>" if two were made in one second).
_SET_LABEL_RE = re.compile(r"-set-(\d+)(?:-\d+)?$")


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
