"""Acknowledgements from the receiving side: what to tell the sender, recorded durably, sent once.

The pipeline calls the ``on_*`` methods inside its own transactions, so a
notification is recorded atomically with the event it reports (a part
verified, a mail quarantined, a set delivered or failed): a crash can neither
lose it nor record it twice (each event has a unique key).  :meth:`send_due`
later builds the mails (signed and encrypted, or plain) and submits them over
SMTP with retries.

A notification goes only to the mail address of the certified key that signed
the set's verified parts, never to an address taken from a header: an error
about a mail that arrived before any part of its set was verified is *held*
until one is, and never sent if none ever is (no backscatter, no
acknowledgement of forged mail).
"""

from __future__ import annotations

import email.utils
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from dicommail.config import Config
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.errors import (
    SETUP_ERRORS,
    AuthenticationError,
    ConfigError,
    DestinationError,
    DicommailError,
    IncompleteSetError,
    PassphraseError,
    StateError,
    TransportError,
)
from dicommail.receiver import inbox
from dicommail.sender.outbox import ClientFactory, retry_delay
from dicommail.store.db import Database
from dicommail.wire import headers as h
from dicommail.wire import notifications as n
from dicommail.wire.unpack import ReceivedPart

log = logging.getLogger("dicommail.receiver")

HELD = "held"
PENDING = "pending"
SENT = "sent"
FAILED = "failed"
SUPERSEDED = "superseded"

#: Errors that are this site's own problem: the sender cannot do anything about them.
_LOCAL_ERRORS = (PassphraseError, ConfigError, StateError)


def reason_code(error: DicommailError) -> str:
    """The reason code sent over mail for an error (never its message, which stays local)."""
    if isinstance(error, DestinationError):
        return "pacs-refused"
    if isinstance(error, IncompleteSetError):
        return "parts-missing"
    return error.code if error.code in n.REASONS else "error"


def iso(timestamp: float | None) -> str | None:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds") if timestamp else None


def address_of(user_id: str) -> str:
    """The mail address in a key's user id (``Name <a@b>``), lower-case; empty if there is none."""
    address = email.utils.parseaddr(user_id)[1]
    return address.lower() if "@" in address else ""


class Notifier:
    """Records and sends the acknowledgements of one receiving home."""

    def __init__(
        self,
        db: Database,
        config: Config,
        keyring: Keyring,
        *,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.db = db
        self.config = config
        self.keyring = keyring
        self.now = now
        self.directory = config.spool / "notifications"
        self._signer: str | None = None
        self._sender = config.identity.address

    # -- recording (inside the pipeline's transactions) ------------------------------------------

    def _record(
        self,
        conn: sqlite3.Connection,
        event: str,
        report: n.StatusReport,
        *,
        recipient: str | None,
        original_message_id: str,
        set_ref: int | None = None,
    ) -> None:
        """One row per method for ``recipient``; one held row (no method) while it is unknown."""
        values = {
            "set_id": report.set_id,
            "set_ref": set_ref,
            "set_part": report.set_part,
            "set_total": report.set_total,
            "scope": report.scope,
            "outcome": report.outcome,
            "reason": report.reason,
            "missing_parts": json.dumps(report.missing_parts) if report.missing_parts else None,
            "report": report.to_json().decode("ascii"),
            "original_message_id": original_message_id or None,
            "created_at": self.now(),
        }
        if recipient is None:
            self._insert(conn, event, values, None, None, HELD)
            return
        for method in self._methods(recipient):
            self._insert(conn, f"{event}/{method}", values, recipient, method, PENDING)

    def _insert(self, conn: sqlite3.Connection, event: str, values: dict[str, Any], recipient: str | None,
                method: str | None, status: str) -> None:
        domain = self._sender or "dicommail.invalid"
        conn.execute(
            """INSERT OR IGNORE INTO notifications (event, set_id, set_ref, set_part, set_total, scope, outcome,
                   reason, missing_parts, report, recipient, method, original_message_id, message_id, status,
                   created_at)
               VALUES (:event, :set_id, :set_ref, :set_part, :set_total, :scope, :outcome, :reason, :missing_parts,
                   :report, :recipient, :method, :original_message_id, :message_id, :status, :created_at)""",
            {**values, "event": event, "recipient": recipient, "method": method, "status": status,
             "message_id": h.new_message_id(domain)},
        )

    def _methods(self, recipient: str) -> list[str]:
        method = self.config.notification_for(recipient)
        return ["pgp", "rfc"] if method == "both" else [method]

    @staticmethod
    def _signer_address(conn: sqlite3.Connection, set_ref: int) -> str | None:
        """The certified address the pipeline recorded for the set's signer (see ``Pipeline._reply_address``)."""
        row = conn.execute("SELECT sender FROM inbound_sets WHERE id = ?", (set_ref,)).fetchone()
        return address_of(row[0] or "") or None if row is not None else None

    @staticmethod
    def _part_verified(conn: sqlite3.Connection, set_ref: int, set_part: int) -> bool:
        return conn.execute("SELECT 1 FROM inbound_parts WHERE set_ref = ? AND set_part = ?",
                            (set_ref, set_part)).fetchone() is not None

    def on_part_verified(self, conn: sqlite3.Connection, part: ReceivedPart, set_ref: int,
                         recipient: str | None) -> None:
        """A set part passed decryption and the trust rule: acknowledge it, release held errors.

        ``recipient``: a certified user ID's address of the signing key (never a header).
        """
        if not recipient:
            log.warning("set %s: the signer's key has no certified mail address; no acknowledgements are sent",
                        part.set_id)
            return
        report = n.StatusReport(
            scope=n.PART, set_id=part.set_id, set_part=part.set_part, set_total=part.set_total,
            status="verified", outcome=n.SUCCESS, reported_at=iso(self.now()),
        )
        self._record(conn, f"{set_ref}/part/{part.set_part}/verified", report, recipient=recipient,
                     original_message_id=part.message_id, set_ref=set_ref)
        # An error about this part is moot now that a good copy arrived.
        conn.execute(
            "UPDATE notifications SET status = ? WHERE set_id = ? AND (set_ref = ? OR set_ref IS NULL) "
            "AND set_part = ? AND scope = ? AND outcome IN (?, ?) AND status IN (?, ?)",
            (SUPERSEDED, part.set_id, set_ref, part.set_part, n.PART, n.ERROR, n.FATAL, HELD, PENDING),
        )
        held = conn.execute(
            "SELECT * FROM notifications WHERE set_id = ? AND status = ?", (part.set_id, HELD)
        ).fetchall()
        for row in held:
            if row["scope"] == n.PART and row["set_part"] is not None and self._part_verified(
                    conn, set_ref, row["set_part"]):
                # A good copy of that part arrived meanwhile: the error (perhaps about a forgery) is moot.
                conn.execute("UPDATE notifications SET status = ? WHERE id = ?", (SUPERSEDED, row["id"]))
                continue
            conn.execute("DELETE FROM notifications WHERE id = ?", (row["id"],))
            report_row = n.StatusReport.from_json(row["report"].encode())
            self._record(conn, row["event"], report_row, recipient=recipient,
                         original_message_id=row["original_message_id"] or "", set_ref=set_ref)
            log.info("set %s: held error notification for part %s released to the set's signer",
                     part.set_id, row["set_part"])

    def on_mail_failed(self, conn: sqlite3.Connection, rows: Sequence[Any], error: DicommailError) -> None:
        """A mail of a set could not be used: report it (now, or once the set's signer is known)."""
        if isinstance(error, _LOCAL_ERRORS):
            return
        first = rows[0]
        if first["kind"] not in (inbox.DICOM_MAIL, inbox.FRAGMENT):
            return  # never notify about notifications or other mail
        set_id, set_part = first["set_id"], first["set_part"]
        if not set_id or not h.is_set_id(set_id) or not set_part:
            log.info("mail %s failed and names no set part: nothing is reported back", first["id"])
            return
        # The set ID comes from an unsigned header: it may name the sets of several signers.
        sets = conn.execute("SELECT id, set_total FROM inbound_sets WHERE set_id = ?", (set_id,)).fetchall()
        set_ref = sets[0]["id"] if len(sets) == 1 else None
        set_total = sets[0]["set_total"] if len(sets) == 1 else None
        if set_total is not None and not 1 <= set_part <= set_total:
            return
        if any(self._part_verified(conn, row["id"], set_part) for row in sets):
            log.info("mail %s failed, but part %d of set %s was verified already: nothing is reported back",
                     first["id"], set_part, set_id)
            return
        report = n.StatusReport(
            scope=n.PART, set_id=set_id, set_part=set_part, set_total=set_total, status="failed",
            outcome=n.ERROR, reason=reason_code(error), reported_at=iso(self.now()),
        )
        recipient = self._signer_address(conn, set_ref) if set_ref is not None else None
        # The set and part of a mail that failed come from headers nobody vouches for: one error report per
        # set part at most (the event key), so a flood of forged mails cannot use up the sender's resends.
        self._record(conn, f"{set_id}/part/{set_part}/failed", report, recipient=recipient,
                     original_message_id=first["message_id"] or "", set_ref=set_ref if recipient else None)
        if recipient is None:
            log.info("set %s part %d failed (%s); the error is held until a part of the set is verified",
                     set_id, set_part, report.reason)

    def on_set_verified(self, conn: sqlite3.Connection, set_ref: int) -> None:
        conn.execute(
            "INSERT INTO set_tracking (set_ref, verified_at) VALUES (?, ?) "
            "ON CONFLICT (set_ref) DO UPDATE SET verified_at = excluded.verified_at",
            (set_ref, self.now()),
        )

    def on_parts_missing(self, conn: sqlite3.Connection, set_ref: int, missing: list[int]) -> bool:
        """The set timed out with parts missing: ask for them once.  True if it may wait again."""
        row = conn.execute("SELECT missing_reported_at FROM set_tracking WHERE set_ref = ?", (set_ref,)).fetchone()
        if row is not None and row[0] is not None:
            return False
        conn.execute(
            "INSERT INTO set_tracking (set_ref, missing_reported_at) VALUES (?, ?) "
            "ON CONFLICT (set_ref) DO UPDATE SET missing_reported_at = excluded.missing_reported_at",
            (set_ref, self.now()),
        )
        report = self._set_report(conn, set_ref, "incomplete", n.ERROR, reason="parts-missing", missing=missing)
        self._record(conn, f"{set_ref}/set/missing", report, recipient=self._signer_address(conn, set_ref),
                     original_message_id=self._first_message_id(conn, set_ref), set_ref=set_ref)
        log.info("set %s: %d part(s) missing after the timeout; the sender is asked to resend them", report.set_id,
                 len(missing))
        return True

    def on_set_finished(
        self,
        conn: sqlite3.Connection,
        set_ref: int,
        status: str,
        error: DicommailError | None = None,
        *,
        files: int | None = None,
        dicom_instances: int | None = None,
        warnings: int = 0,
        constancy: dict[str, object] | None = None,
    ) -> None:
        """The set is delivered, or has definitively failed: the final notification.

        ``constancy``: the results of a test set's constancy check (a delivered test set only).
        """
        if isinstance(error, _LOCAL_ERRORS):
            return
        if status == "delivered":
            outcome = n.WARNING if warnings else n.SUCCESS
            report = self._set_report(conn, set_ref, status, outcome, files=files, dicom_instances=dicom_instances)
            if warnings:
                report.message = f"{warnings} warning(s) while verifying; see the receiving site's log"
            report.constancy = constancy
        else:
            missing = error.missing_parts if isinstance(error, IncompleteSetError) else []
            reason = reason_code(error) if error is not None else "error"
            report = self._set_report(conn, set_ref, status, n.FATAL, reason=reason, missing=missing)
        self._record(conn, f"{set_ref}/set/final", report, recipient=self._signer_address(conn, set_ref),
                     original_message_id=self._first_message_id(conn, set_ref), set_ref=set_ref)

    def _first_message_id(self, conn: sqlite3.Connection, set_ref: int) -> str:
        row = conn.execute(
            "SELECT message_id FROM inbound_mails WHERE set_ref = ? AND status = 'processed' "
            "ORDER BY set_part, id LIMIT 1",
            (set_ref,),
        ).fetchone()
        return str(row[0] or "") if row is not None else ""

    def _set_report(self, conn: sqlite3.Connection, set_ref: int, status: str, outcome: str, *,
                    reason: str | None = None, missing: list[int] | None = None, files: int | None = None,
                    dicom_instances: int | None = None) -> n.StatusReport:
        info = conn.execute("SELECT set_id, set_total, first_seen_at FROM inbound_sets WHERE id = ?",
                            (set_ref,)).fetchone()
        first = conn.execute(
            "SELECT MIN(received_at) FROM inbound_mails WHERE set_ref = ? AND kind IN (?, ?)",
            (set_ref, inbox.DICOM_MAIL, inbox.FRAGMENT),
        ).fetchone()[0]
        tracking = conn.execute("SELECT verified_at FROM set_tracking WHERE set_ref = ?", (set_ref,)).fetchone()
        parts = conn.execute("SELECT COUNT(*) FROM inbound_parts WHERE set_ref = ?", (set_ref,)).fetchone()[0]
        forwarded = conn.execute("SELECT COUNT(*) FROM forwarded_instances WHERE set_ref = ? AND state = 'stored'",
                                 (set_ref,)).fetchone()[0]
        return n.StatusReport(
            scope=n.SET,
            set_id=info["set_id"] if info is not None else "",
            set_total=info["set_total"] if info is not None else None,
            status=status,
            outcome=outcome,
            reason=reason,
            missing_parts=list(missing or []),
            parts_received=parts,
            files=files,
            dicom_instances=dicom_instances,
            instances_forwarded=forwarded,
            first_received_at=iso(first or (info["first_seen_at"] if info is not None else None)),
            verified_at=iso(tracking["verified_at"] if tracking is not None else None),
            forwarded_at=iso(self.now()) if status == "delivered" else None,
            reported_at=iso(self.now()),
        )

    # -- sending ----------------------------------------------------------------------------------

    def due(self) -> list[sqlite3.Row]:
        return self.db.query(
            "SELECT * FROM notifications WHERE status = ? AND next_attempt_at <= ? ORDER BY id",
            (PENDING, self.now()),
        )

    async def send_due(self, client_factory: ClientFactory, *, max_attempts: int = 8) -> int:
        """Build and submit the notifications that are due; return how many the server accepted."""
        rows = self.due()
        if not rows:
            return 0
        sent = 0
        try:
            async with client_factory() as client:
                for row in rows:
                    try:
                        path = self._built(row)
                    except SETUP_ERRORS as exc:
                        # This site's key or passphrase, not the notification: the same for every
                        # row, fixed by the admin.  Nothing is given up; the next cycle tries again.
                        log.error("notifications wait, not sent: %s (%s); tried again in the next cycle",
                                  exc.message, exc.hint)
                        return sent
                    except DicommailError as exc:
                        self._give_up(row, f"cannot build the notification: {exc.message}")
                        continue
                    try:
                        await client.send(path, self._sender_address(), [row["recipient"]])
                    except AuthenticationError:
                        raise
                    except TransportError as exc:
                        self._failed(row, exc, max_attempts)
                        if exc.temporary:
                            return sent  # the connection is probably gone: next cycle
                        continue
                    self._mark_sent(row, path)
                    sent += 1
        except TransportError as exc:
            log.error("sending notifications failed: %s; retried in the next cycle", exc.message)
        return sent

    def _sender_address(self) -> str:
        if not self._sender:
            self._sender = own_key(self.keyring, self.config.identity.key).email
        return self._sender

    def _built(self, row: sqlite3.Row) -> Path:
        if row["path"] and Path(row["path"]).exists():
            return Path(row["path"])
        report = n.StatusReport.from_json(row["report"].encode())
        notification = n.build_notification(
            report,
            original_message_id=row["original_message_id"] or "",
            final_recipient=self._sender_address(),
            reporting_host=self._sender_address().rpartition("@")[2] or "localhost",
        )
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"notification-{row['id']}.eml"
        if row["method"] == "rfc":
            n.write_plain(notification, path, sender=self._sender_address(), recipient=row["recipient"],
                          message_id=row["message_id"])
        else:
            if self._signer is None:
                self._signer = own_key(self.keyring, self.config.identity.key).fingerprint
            n.write_pgp(notification, path, sender=self._sender_address(), recipient=row["recipient"],
                        message_id=row["message_id"], keyring=self.keyring, signer=self._signer,
                        passphrase=self.config.passphrase(), work=self.directory / "work")
        with self.db.transaction() as conn:
            conn.execute("UPDATE notifications SET path = ? WHERE id = ?", (str(path), row["id"]))
        return path

    def _mark_sent(self, row: sqlite3.Row, path: Path) -> None:
        """``path``: the mail as :meth:`_built` made it (``row`` was read before it was built)."""
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE notifications SET status = ?, sent_at = ?, attempts = attempts + 1, last_error = NULL "
                "WHERE id = ?",
                (SENT, self.now(), row["id"]),
            )
        path.unlink(missing_ok=True)
        log.info("set %s: %s notification (%s%s) sent to the sender by %s", row["set_id"], row["outcome"],
                 row["scope"], f" {row['set_part']}" if row["set_part"] else "", row["method"])

    def _failed(self, row: sqlite3.Row, exc: TransportError, max_attempts: int) -> None:
        attempts = row["attempts"] + 1
        if not exc.temporary or attempts >= max_attempts:
            self._give_up(row, exc.message, attempts)
            return
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE notifications SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
                (attempts, self.now() + retry_delay(attempts), exc.message, row["id"]),
            )
        log.warning("set %s: notification not sent yet (attempt %d): %s", row["set_id"], attempts, exc.message)

    def _give_up(self, row: sqlite3.Row, reason: str, attempts: int | None = None) -> None:
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE notifications SET status = ?, attempts = ?, last_error = ? WHERE id = ?",
                (FAILED, attempts if attempts is not None else row["attempts"], reason, row["id"]),
            )
        log.error("set %s: a notification could not be sent: %s", row["set_id"], reason)
