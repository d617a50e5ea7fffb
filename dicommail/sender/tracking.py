"""Transfer tracking on the sending side: what the receiver reported, and what follows from it.

States of a transfer (``transfers.status``)::

    queued -> sending -> sent -> acknowledged -> delivered
                 ^         |          |
                 |         +----------+--> failed (hard error, resend limit, SMTP)
                 +-- resend (error, resend possible: only the affected parts)
    sent / acknowledged --(no final notification within ack_timeout)--> expired
    any active state --(dicommail transfers cancel)--> cancelled

``acknowledged`` means some parts were acknowledged ("partly acknowledged");
``delivered`` needs the receiver's final, set-level notification.  A later
final notification still turns an ``expired`` (or resend-``failed``)
transfer into ``delivered`` or ``failed``: it is the receiver's word.

A notification is acted on only if it names a transfer of this site (by set
ID, checked against Original-Message-ID) and comes from its recipient: a
PGP/MIME one must be signed by a certified key whose mail address is the
transfer's recipient in a user id this site certified; a plain MDN is
believed only from a peer configured ``notification = "rfc"`` (a peer set to
``"both"`` also sends signed ones, so an unsigned one in its name proves
nothing).  Everything else is recorded as ignored, with the reason, and
changes nothing.
"""

from __future__ import annotations

import email.utils
import json
import logging
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from dicommail.config import Config
from dicommail.constancy.store import record_receipt
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import find_key
from dicommail.dicom import DicomFile, quiet_pydicom
from dicommail.errors import CryptoError, DicommailError, StateError
from dicommail.sender.outbox import FAILED, QUEUED, SENDING, SENT
from dicommail.store.db import Database
from dicommail.wire import notifications as n

log = logging.getLogger("dicommail.sender")
log.addHandler(logging.NullHandler())

ACKNOWLEDGED = "acknowledged"
DELIVERED = "delivered"
EXPIRED = "expired"
CANCELLED = "cancelled"

#: Not finished: mails still go out or the receiver has not said its last word.
ACTIVE: tuple[str, ...] = (QUEUED, SENDING, SENT, ACKNOWLEDGED)
#: All mails are out; waiting for the receiver.
WAITING: tuple[str, ...] = (SENT, ACKNOWLEDGED)
#: Ended without delivery.
UNSUCCESSFUL: tuple[str, ...] = (FAILED, EXPIRED, CANCELLED)
ALL_STATES = (QUEUED, SENDING, SENT, ACKNOWLEDGED, DELIVERED, FAILED, EXPIRED, CANCELLED)

_FRAGMENT_ID = re.compile(r"^<?([^@<>]+?)(?:\.f\d+)?@([^<>]+)>?$")


def _norm_message_id(value: str) -> str:
    """``<abc.f3@host>`` and ``<abc@host>`` name the same set part."""
    match = _FRAGMENT_ID.match(value.strip())
    return f"<{match.group(1)}@{match.group(2).lower()}>" if match else value.strip()


def _emails_of(user_ids: Sequence[str]) -> set[str]:
    return {email.utils.parseaddr(uid)[1].lower() for uid in user_ids} - {""}


# -- pack time ---------------------------------------------------------------------------------


def study_details(files: Sequence[DicomFile]) -> tuple[int, str, str]:
    """(DICOM instances, patient name, study description) of a study, for this site's eyes only."""
    import pydicom

    name = description = ""
    for item in files[:1]:
        try:
            dataset = pydicom.dcmread(item.path, stop_before_pixels=True, specific_tags=["PatientName",
                                                                                          "StudyDescription"])
            name = str(dataset.get("PatientName", "") or "")
            description = str(dataset.get("StudyDescription", "") or "")
        except (OSError, ValueError, pydicom.errors.InvalidDicomError):
            pass
    return len(files), name, description


def record_study_details(conn: sqlite3.Connection, transfer_id: int, files: Sequence[DicomFile]) -> None:
    """Remember what a transfer holds (a ``queue_set`` ``on_queued`` hook); never leaves this site."""
    # It reads the patient's name with pydicom: odd values must not warn on the terminal.
    with quiet_pydicom(f"transfer {transfer_id}"):
        images, name, description = study_details(files)
    conn.execute(
        "INSERT INTO transfer_tracking (transfer_id, images, patient_name, study_description) VALUES (?, ?, ?, ?) "
        "ON CONFLICT (transfer_id) DO UPDATE SET images = excluded.images, patient_name = excluded.patient_name, "
        "study_description = excluded.study_description",
        (transfer_id, images, name or None, description or None),
    )


# -- notifications ---------------------------------------------------------------------------------


def _ensure_tracking(conn: sqlite3.Connection, transfer_id: int) -> sqlite3.Row:
    conn.execute("INSERT OR IGNORE INTO transfer_tracking (transfer_id) VALUES (?)", (transfer_id,))
    row: sqlite3.Row = conn.execute("SELECT * FROM transfer_tracking WHERE transfer_id = ?", (transfer_id,)).fetchone()
    return row


def add_event(conn: sqlite3.Connection, transfer_id: int, event: str, detail: str = "", set_part: int | None = None,
              at: float | None = None) -> None:
    conn.execute(
        "INSERT INTO transfer_events (transfer_id, at, event, set_part, detail) VALUES (?, ?, ?, ?, ?)",
        (transfer_id, at if at is not None else time.time(), event, set_part, detail or None),
    )


@dataclass(frozen=True)
class Decision:
    """What became of one notification."""

    accepted: bool
    detail: str
    transfer_id: int | None = None


class Tracker:
    """Acts on notifications for this site's transfers (a pipeline ``ReportHandler``)."""

    def __init__(self, db: Database, config: Config, keyring: Keyring, *,
                 now: Callable[[], float] = time.time) -> None:
        self.db = db
        self.config = config
        self.keyring = keyring
        self.now = now

    # -- matching and trust ---------------------------------------------------------------------

    def _transfer_for(self, note: n.Notification) -> sqlite3.Row | None:
        if note.set_id:
            rows = self.db.query("SELECT * FROM transfers WHERE set_id = ?", (note.set_id,))
            return rows[0] if rows else None
        if note.original_message_id:
            wanted = _norm_message_id(note.original_message_id)
            rows = self.db.query(
                "SELECT t.* FROM transfers t JOIN outbound_mails m ON m.transfer_id = t.id WHERE m.message_id = ?",
                (wanted,),
            )
            return rows[0] if rows else None
        return None

    def _check(self, received: n.ReceivedReport, transfer: sqlite3.Row) -> str:
        """Why the notification must be ignored; empty if it may be acted on."""
        note = received.notification
        recipient = str(transfer["recipient"]).lower()
        if received.signer is not None:
            try:
                key = find_key(self.keyring, received.signer.fingerprint)
            except CryptoError as exc:
                return f"its signing key cannot be looked up: {exc.message}"
            # Only a user id we certified counts: a peer could add any address to its own key.
            if recipient not in _emails_of(key.certified_user_ids):
                return (f"signed by key {received.signer.fingerprint}, which does not belong to the transfer's "
                        f"recipient {recipient}")
        else:
            # Only a peer that cannot sign at all ("rfc") may be believed unsigned: with "both"
            # the signed twin is what counts, and a plain MDN is anyone's forgery.
            method = self.config.notification_for(recipient)
            if method != "rfc":
                return (f"an unsigned notification, but {recipient} is configured for signed ones "
                        f'(notification = "{method}"; only a peer set to "rfc" in its [peers] table may send '
                        "plain MDNs)")
            if received.sender != recipient:
                return f"an unsigned notification from {received.sender or 'nobody'}, not from {recipient}"
        if note.original_message_id:
            wanted = _norm_message_id(note.original_message_id)
            ids = {r["message_id"] for r in self.db.query(
                "SELECT message_id FROM outbound_mails WHERE transfer_id = ?", (transfer["id"],))}
            if wanted not in ids:
                return "its Original-Message-ID is no mail of this transfer"
        if note.scope == n.PART and (note.set_part is None or not 1 <= note.set_part <= transfer["set_total"]):
            return f"it names part {note.set_part} of a set of {transfer['set_total']}"
        if note.set_total is not None and note.set_total != transfer["set_total"]:
            return f"it names a set of {note.set_total} parts, but {transfer['set_total']} were sent"
        return ""

    # -- the handler ----------------------------------------------------------------------------------

    def on_report(self, mail_id: int, received: n.ReceivedReport) -> None:
        if self.db.query("SELECT 1 FROM acknowledgements WHERE inbound_id = ?", (mail_id,)):
            return  # handled before a crash
        decision = self.decide(mail_id, received)
        level = logging.INFO if decision.accepted else logging.WARNING
        log.log(level, "notification for set %s (%s %s%s): %s", received.notification.set_id or "-",
                received.notification.scope, received.notification.outcome,
                f" part {received.notification.set_part}" if received.notification.set_part else "",
                decision.detail)

    def decide(self, mail_id: int | None, received: n.ReceivedReport) -> Decision:
        note = received.notification
        transfer = self._transfer_for(note)
        reason = "no transfer of this site has this set ID" if transfer is None else self._check(received, transfer)
        with self.db.transaction() as conn:
            if transfer is not None and not reason:
                current = conn.execute("SELECT * FROM transfers WHERE id = ?", (transfer["id"],)).fetchone()
                detail = self._act(conn, current, note, received.written_at)
                accepted = True
                if note.scope == n.SET:
                    self._constancy_receipt(conn, transfer["id"], note)
            else:
                detail, accepted = f"ignored: {reason}", False
            conn.execute(
                """INSERT INTO acknowledgements (inbound_id, transfer_id, set_id, set_part, scope, outcome,
                       disposition, reason, method, signer, message_id, original_message_id, accepted, detail,
                       received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (
                    mail_id,
                    transfer["id"] if transfer is not None else None,
                    note.set_id or None,
                    note.set_part if note.scope == n.PART else None,
                    note.scope,
                    note.outcome,
                    str(note.disposition),
                    note.reason,
                    "pgp" if received.signer is not None else "rfc",
                    received.signer.fingerprint if received.signer is not None else None,
                    received.message_id or None,
                    note.original_message_id or None,
                    int(accepted),
                    detail,
                    self.now(),
                ),
            )
        return Decision(accepted, detail, transfer["id"] if transfer is not None else None)

    def _constancy_receipt(self, conn: sqlite3.Connection, transfer_id: int, note: n.Notification) -> None:
        """A final set notification that ended a constancy check's test transfer is that check's receipt."""
        status = conn.execute("SELECT status FROM transfers WHERE id = ?", (transfer_id,)).fetchone()["status"]
        if status not in (DELIVERED, FAILED):
            return  # e.g. a resend of missing parts: not the last word yet
        report: dict[str, object] = (json.loads(note.status.to_json()) if note.status is not None
                                     else {"scope": n.SET, "outcome": note.outcome, "reason": note.reason})
        record_receipt(conn, transfer_id, report, self.now())

    def _act(self, conn: sqlite3.Connection, transfer: sqlite3.Row, note: n.Notification,
             written_at: float | None = None) -> str:
        status = transfer["status"]
        transfer_id = transfer["id"]
        at = self.now()
        if status == CANCELLED:
            return "recorded; the transfer was cancelled"
        outcome = note.outcome
        if note.scope == n.SET and outcome in (n.SUCCESS, n.WARNING):
            first_sent = transfer["first_sent_at"]
            # The transfer ended when the receiver wrote its acknowledgement, not when this site
            # fetched it (a once-a-minute timer would add up to a minute).  Its Date is the
            # receiver's clock and unsigned: it is only believed between first send and now.
            finished = min(at, max(first_sent, written_at)) if first_sent and written_at is not None else at
            seconds = finished - first_sent if first_sent else None
            _ensure_tracking(conn, transfer_id)
            conn.execute(
                "UPDATE transfer_tracking SET finished_at = ?, transfer_seconds = ?, reason = NULL, final_report = ? "
                "WHERE transfer_id = ?",
                (finished, seconds, note.status.to_json().decode("ascii") if note.status else None, transfer_id),
            )
            conn.execute("UPDATE transfers SET status = ?, error = NULL, updated_at = ? WHERE id = ?",
                         (DELIVERED, at, transfer_id))
            add_event(conn, transfer_id, "delivered", "warning" if outcome == n.WARNING else "", at=at)
            shown = f"{seconds:.1f} s" if seconds is not None else "unknown"
            return f"delivered (transfer time {shown})"
        if status == DELIVERED:
            return "recorded; the transfer is already delivered"
        if status == FAILED and outcome in (n.ERROR, n.FATAL):
            return "recorded; the transfer has already failed"
        if note.scope == n.PART and outcome in (n.SUCCESS, n.WARNING):
            if status == SENT:
                conn.execute("UPDATE transfers SET status = ?, updated_at = ? WHERE id = ?",
                             (ACKNOWLEDGED, at, transfer_id))
            return f"part {note.set_part} acknowledged"
        reason = note.reason or ("parts-missing" if note.missing_parts else "error")
        if outcome == n.ERROR and (note.scope == n.PART or note.missing_parts):
            parts = [note.set_part] if note.scope == n.PART and note.set_part else note.missing_parts
            return self._resend(conn, transfer, sorted(set(parts)), reason)
        return self._fail(conn, transfer_id, reason, f"the receiver reports a hard error ({reason})", final=True)

    def _fail(self, conn: sqlite3.Connection, transfer_id: int, reason: str, message: str, *,
              final: bool = False) -> str:
        at = self.now()
        _ensure_tracking(conn, transfer_id)
        conn.execute("UPDATE transfer_tracking SET reason = ?, finished_at = COALESCE(?, finished_at) "
                     "WHERE transfer_id = ?", (reason, at if final else None, transfer_id))
        conn.execute("UPDATE transfers SET status = ?, error = ?, updated_at = ? WHERE id = ?",
                     (FAILED, message, at, transfer_id))
        add_event(conn, transfer_id, "failed", message, at=at)
        return f"transfer failed: {message}"

    def _resend(self, conn: sqlite3.Connection, transfer: sqlite3.Row, parts: list[int], reason: str) -> str:
        transfer_id = transfer["id"]
        tracking = _ensure_tracking(conn, transfer_id)
        acked = {r[0] for r in conn.execute(
            "SELECT DISTINCT set_part FROM acknowledgements WHERE transfer_id = ? AND accepted = 1 AND scope = ? "
            "AND outcome IN (?, ?)", (transfer_id, n.PART, n.SUCCESS, n.WARNING))}
        # The receiver acknowledged these parts as verified: an error naming them now (a forged mail's
        # headers can name any part) is no reason to send them again, let alone to use up the resends.
        settled = [p for p in parts if p in acked]
        parts = [p for p in parts if p not in acked]
        if not parts:
            return f"part(s) {_numbers(settled)} were acknowledged already; nothing to resend"
        mails = [m for m in conn.execute("SELECT * FROM outbound_mails WHERE transfer_id = ?", (transfer_id,))
                 if m["set_part"] in parts]
        if all(m["status"] == QUEUED for m in mails) and mails:
            return f"part(s) {_numbers(parts)} are already queued for resending"
        limit = self.config.tracking.resend_limit
        if tracking["resends"] >= limit:
            return self._fail(conn, transfer_id, reason,
                              f"the receiver reports {reason} for part(s) {_numbers(parts)}, and the resend limit "
                              f"({limit}) is reached")
        missing_files = [m["set_part"] for m in mails if not Path(m["path"]).exists()]
        if missing_files or not mails:
            return self._fail(conn, transfer_id, reason,
                              f"the receiver reports {reason} for part(s) {_numbers(parts)}, but their mails are "
                              "no longer in the outbox")
        at = self.now()
        for mail in mails:
            conn.execute("UPDATE outbound_mails SET status = ?, attempts = 0, next_attempt_at = 0, last_error = NULL "
                         "WHERE id = ?", (QUEUED, mail["id"]))
        conn.execute("UPDATE transfer_tracking SET resends = resends + 1 WHERE transfer_id = ?", (transfer_id,))
        conn.execute("UPDATE transfers SET status = ?, error = ?, updated_at = ? WHERE id = ?",
                     (SENDING, f"resending part(s) {_numbers(parts)}: {reason}", at, transfer_id))
        for part in parts:
            add_event(conn, transfer_id, "resend", reason, set_part=part, at=at)
        return f"part(s) {_numbers(parts)} queued again ({reason}; resend {tracking['resends'] + 1} of {limit})"

    # -- time -----------------------------------------------------------------------------------------

    def expire_overdue(self) -> int:
        """Sent transfers without a final notification after ``tracking.ack_timeout``: expired."""
        return expire_overdue(self.db, self.config.tracking.ack_timeout, self.now)

    def after_sending(self) -> None:
        """Transfers the outbox marked sent again after a resend, with parts acknowledged: acknowledged."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE transfers SET status = ? WHERE status = ? AND id IN (SELECT transfer_id FROM "
                "acknowledgements WHERE accepted = 1 AND scope = ? AND outcome IN (?, ?))",
                (ACKNOWLEDGED, SENT, n.PART, n.SUCCESS, n.WARNING),
            )


def expire_overdue(db: Database, ack_timeout: int, now: Callable[[], float] = time.time) -> int:
    """Transfers sent completely more than ``ack_timeout`` seconds ago without a final notification."""
    rows = db.query(
        "SELECT id, set_id FROM transfers WHERE status IN (?, ?) AND COALESCE(sent_at, first_sent_at) < ?",
        (SENT, ACKNOWLEDGED, now() - ack_timeout),
    )
    for row in rows:
        message = f"no final notification from the receiver within {ack_timeout} s"
        with db.transaction() as conn:
            _ensure_tracking(conn, row["id"])
            conn.execute("UPDATE transfer_tracking SET reason = ? WHERE transfer_id = ?",
                         ("no-final-notification", row["id"]))
            conn.execute("UPDATE transfers SET status = ?, error = ?, updated_at = ? WHERE id = ?",
                         (EXPIRED, message, now(), row["id"]))
            add_event(conn, row["id"], "expired", message, at=now())
        log.warning("set %s expired: no final notification within %d s", row["set_id"], ack_timeout)
    return len(rows)


def _numbers(parts: Sequence[int]) -> str:
    return ", ".join(str(p) for p in parts) or "-"


# -- the job manager's queries and actions -------------------------------------------------------------


def iso_time(timestamp: float | None) -> str | None:
    """Unix seconds as the JSON output shows times: ISO 8601 with offset (UTC); None stays None."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat() if timestamp is not None else None


@dataclass(frozen=True)
class TransferView:
    """One sent transfer as ``dicommail status`` shows it: its state, counts and times (Unix seconds).

    ``patient_name`` and ``study_description`` are this site's own record of
    what was sent; :meth:`to_json` leaves them out unless ``show_patient``.
    In :meth:`to_json` the times are ISO 8601 strings with offset (UTC), None
    where absent; ``transfer_seconds`` stays a number of seconds.
    """

    id: int
    set_id: str
    recipient: str
    status: str
    created_at: float
    set_total: int
    files: int
    bytes: int
    mails: int
    mails_sent: int
    parts_sent: int
    parts_acknowledged: int
    images: int | None
    first_sent_at: float | None
    sent_at: float | None
    finished_at: float | None
    transfer_seconds: float | None
    resends: int
    reason: str | None
    error: str | None
    patient_name: str | None
    study_description: str | None

    def to_json(self, show_patient: bool = False) -> dict[str, object]:
        data: dict[str, object] = {
            "id": self.id, "set_id": self.set_id, "recipient": self.recipient, "status": self.status,
            "created_at": iso_time(self.created_at), "set_total": self.set_total, "files": self.files,
            "bytes": self.bytes,
            "images": self.images, "mails": self.mails, "mails_sent": self.mails_sent,
            "parts_sent": self.parts_sent, "parts_acknowledged": self.parts_acknowledged,
            "first_sent_at": iso_time(self.first_sent_at), "sent_at": iso_time(self.sent_at),
            "finished_at": iso_time(self.finished_at),
            "transfer_seconds": self.transfer_seconds, "resends": self.resends, "reason": self.reason,
            "error": self.error,
        }
        if show_patient:
            data["patient_name"] = self.patient_name
            data["study_description"] = self.study_description
        return data


_VIEW_SQL = """
SELECT t.*, k.images, k.patient_name, k.study_description, COALESCE(k.resends, 0) AS resends, k.reason,
       k.finished_at, k.transfer_seconds,
       (SELECT COUNT(*) FROM outbound_mails m WHERE m.transfer_id = t.id) AS mails,
       (SELECT COUNT(*) FROM outbound_mails m WHERE m.transfer_id = t.id AND m.status = 'sent') AS mails_sent,
       (SELECT COUNT(DISTINCT m.set_part) FROM outbound_mails m WHERE m.transfer_id = t.id
            AND m.sent_at IS NOT NULL) AS parts_sent,
       (SELECT COUNT(DISTINCT a.set_part) FROM acknowledgements a WHERE a.transfer_id = t.id AND a.accepted = 1
            AND a.scope = 'part' AND a.outcome IN ('success', 'warning')) AS parts_acknowledged
FROM transfers t LEFT JOIN transfer_tracking k ON k.transfer_id = t.id
"""


def _view(row: sqlite3.Row) -> TransferView:
    status = row["status"]
    acked = row["parts_acknowledged"]
    if status == DELIVERED:
        acked = row["set_total"]  # the final notification covers every part
    return TransferView(
        id=row["id"], set_id=row["set_id"], recipient=row["recipient"], status=status,
        created_at=row["created_at"], set_total=row["set_total"], files=row["files"], bytes=row["bytes"],
        mails=row["mails"], mails_sent=row["mails_sent"], parts_sent=row["parts_sent"], parts_acknowledged=acked,
        images=row["images"], first_sent_at=row["first_sent_at"], sent_at=row["sent_at"],
        finished_at=row["finished_at"], transfer_seconds=row["transfer_seconds"], resends=row["resends"],
        reason=row["reason"], error=row["error"], patient_name=row["patient_name"],
        study_description=row["study_description"],
    )


def list_transfers(db: Database, states: Sequence[str] = (), since: float | None = None) -> list[TransferView]:
    where: list[str] = []
    params: list[object] = []
    if states:
        where.append(f"t.status IN ({','.join('?' * len(states))})")
        params.extend(states)
    if since is not None:
        where.append("t.created_at >= ?")
        params.append(since)
    sql = _VIEW_SQL + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY t.created_at, t.id"
    return [_view(r) for r in db.query(sql, tuple(params))]


def get_transfer(db: Database, ident: str) -> TransferView:
    """One transfer by its set ID or its (outbox) transfer id."""
    ident = ident.strip()
    rows = db.query(_VIEW_SQL + " WHERE t.set_id = ?", (ident,))
    if not rows and ident.isdigit():
        rows = db.query(_VIEW_SQL + " WHERE t.id = ?", (int(ident),))
    if not rows:
        raise StateError(f"no transfer {ident!r} in this site's outbox",
                         "see `dicommail status` for transfers and their set IDs")
    return _view(rows[0])


@dataclass(frozen=True)
class TimelineEntry:
    """One step of a transfer's history: ``at`` (Unix seconds), what happened, to which part (None: the set).

    :meth:`to_json` gives ``at`` as an ISO 8601 string with offset (UTC).
    """

    at: float
    event: str
    set_part: int | None
    detail: str

    def to_json(self) -> dict[str, object]:
        """The entry as ``dicommail status IDENT --json`` prints it."""
        return {"at": iso_time(self.at), "event": self.event, "set_part": self.set_part, "detail": self.detail}


def timeline(db: Database, transfer_id: int) -> list[TimelineEntry]:
    """What happened to a transfer, mail by mail, in time order."""
    entries: list[TimelineEntry] = []
    transfer = db.query("SELECT * FROM transfers WHERE id = ?", (transfer_id,))[0]
    entries.append(TimelineEntry(transfer["created_at"], "queued",
                                 None, f"{transfer['set_total']} part(s) for {transfer['recipient']}"))
    for mail in db.query("SELECT * FROM outbound_mails WHERE transfer_id = ? ORDER BY set_part, fragment",
                         (transfer_id,)):
        what = f"fragment {mail['fragment']}/{mail['fragments']}, " if mail["fragment"] else ""
        if mail["sent_at"] is not None:
            entries.append(TimelineEntry(mail["sent_at"], "mail sent", mail["set_part"],
                                         f"{what}{mail['message_id']}, {mail['size']} bytes"))
        elif mail["status"] == FAILED:
            entries.append(TimelineEntry(transfer["updated_at"], "mail failed", mail["set_part"],
                                         f"{what}{mail['last_error'] or ''}"))
        elif mail["last_error"]:
            entries.append(TimelineEntry(transfer["updated_at"], "mail waiting", mail["set_part"],
                                         f"{what}attempt {mail['attempts']}: {mail['last_error']}"))
    for ack in db.query("SELECT * FROM acknowledgements WHERE transfer_id = ? ORDER BY received_at", (transfer_id,)):
        scope = "set" if ack["scope"] == n.SET else "part"
        label = f"{scope} notification ({ack['method']}): {ack['outcome']}"
        detail = ack["detail"] or ""
        if ack["reason"]:
            detail = f"{ack['reason']}; {detail}"
        entries.append(TimelineEntry(ack["received_at"], label, ack["set_part"], detail))
    for event in db.query("SELECT * FROM transfer_events WHERE transfer_id = ? ORDER BY at", (transfer_id,)):
        entries.append(TimelineEntry(event["at"], event["event"], event["set_part"], event["detail"] or ""))
    return sorted(entries, key=lambda e: e.at)


def final_report(db: Database, transfer_id: int) -> dict[str, object] | None:
    rows = db.query("SELECT final_report FROM transfer_tracking WHERE transfer_id = ?", (transfer_id,))
    if not rows or not rows[0]["final_report"]:
        return None
    data: dict[str, object] = json.loads(rows[0]["final_report"])
    return data


def refuse(action: str, set_id: str, status: str) -> None:
    """Raise :class:`StateError` if ``action`` (retry, cancel, delete) cannot be done to a transfer in ``status``.

    Asked before the operator is asked to confirm, and again in the transaction that acts.
    """
    if action == "retry" and status not in UNSUCCESSFUL:
        raise StateError(f"set {set_id} is {status}: only failed, expired or cancelled transfers can be retried",
                         f"see `dicommail status {set_id}`")
    if action == "cancel" and status not in ACTIVE:
        raise StateError(f"set {set_id} is {status}: only active transfers can be cancelled")
    if action == "delete" and status in ACTIVE:
        raise StateError(f"set {set_id} is still {status}", f"cancel it first: dicommail transfers cancel {set_id}")


def retry_transfer(db: Database, transfer_id: int, now: Callable[[], float] = time.time) -> int:
    """Queue a failed, expired or cancelled transfer's unacknowledged parts again; return how many mails."""
    with db.transaction() as conn:
        transfer = conn.execute("SELECT * FROM transfers WHERE id = ?", (transfer_id,)).fetchone()
        if transfer is None:
            raise StateError(f"transfer {transfer_id} is not in the outbox")
        refuse("retry", transfer["set_id"], transfer["status"])
        acked = {r[0] for r in conn.execute(
            "SELECT DISTINCT set_part FROM acknowledgements WHERE transfer_id = ? AND accepted = 1 AND scope = ? "
            "AND outcome IN (?, ?)", (transfer_id, n.PART, n.SUCCESS, n.WARNING))}
        mails = [m for m in conn.execute("SELECT * FROM outbound_mails WHERE transfer_id = ?", (transfer_id,))
                 if m["set_part"] not in acked]
        gone = sorted({m["set_part"] for m in mails if not Path(m["path"]).exists()})
        if gone:
            raise StateError(
                f"the mails of part(s) {_numbers(gone)} of set {transfer['set_id']} are no longer in the outbox",
                "send the study again with `dicommail send`",
            )
        for mail in mails:
            conn.execute("UPDATE outbound_mails SET status = ?, attempts = 0, next_attempt_at = 0, last_error = NULL "
                         "WHERE id = ?", (QUEUED, mail["id"]))
        any_sent = transfer["first_sent_at"] is not None
        conn.execute("UPDATE transfers SET status = ?, error = NULL, updated_at = ? WHERE id = ?",
                     (SENDING if any_sent else QUEUED, now(), transfer_id))
        _ensure_tracking(conn, transfer_id)
        conn.execute("UPDATE transfer_tracking SET resends = 0, reason = NULL, finished_at = NULL, "
                     "transfer_seconds = NULL WHERE transfer_id = ?", (transfer_id,))
        add_event(conn, transfer_id, "retry", f"{len(mails)} mail(s) queued again by the operator", at=now())
    return len(mails)


def cancel_transfer(db: Database, transfer_id: int, now: Callable[[], float] = time.time) -> None:
    with db.transaction() as conn:
        transfer = conn.execute("SELECT * FROM transfers WHERE id = ?", (transfer_id,)).fetchone()
        if transfer is None:
            raise StateError(f"transfer {transfer_id} is not in the outbox")
        refuse("cancel", transfer["set_id"], transfer["status"])
        conn.execute("UPDATE transfers SET status = ?, error = ?, updated_at = ? WHERE id = ?",
                     (CANCELLED, "cancelled by the operator", now(), transfer_id))
        add_event(conn, transfer_id, "cancelled", "by the operator; mails not yet sent stay unsent", at=now())


def delete_transfer(db: Database, transfer_id: int) -> int:
    """Remove a finished transfer, its records and its outbox mails; return how many files were removed."""
    transfer = db.query("SELECT * FROM transfers WHERE id = ?", (transfer_id,))
    if not transfer:
        raise StateError(f"transfer {transfer_id} is not in the outbox")
    refuse("delete", transfer[0]["set_id"], transfer[0]["status"])
    paths = [Path(r["path"]) for r in db.query("SELECT path FROM outbound_mails WHERE transfer_id = ?",
                                                (transfer_id,))]
    try:
        with db.transaction() as conn:
            conn.execute("DELETE FROM transfers WHERE id = ?", (transfer_id,))
    except sqlite3.IntegrityError as exc:
        raise StateError(
            f"set {transfer[0]['set_id']} is still referenced by other records (e.g. the gateway's): {exc}",
            "keep it; finished transfers do no harm",
        ) from exc
    removed = 0
    for path in paths:
        try:
            path.unlink()
            removed += 1
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise DicommailError(f"cannot remove {path}: {exc.strerror}", "remove it by hand") from exc
    return removed
