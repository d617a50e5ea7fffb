"""From stored mails to forwarded studies, one durable step at a time.

Each step reads its input from the state database and the spool, and records
its result in one transaction after its files are in place; a crash between
steps repeats at most the interrupted step, and every step tolerates being
repeated (a part that exists already, an instance already forwarded).

    stored mail --(join fragments)--> whole mail --(decrypt, check signer)-->
    set part --(all parts there, manifest checks)--> complete set
    --(destination)--> delivered set

Whatever cannot be processed is copied to the quarantine with its reason.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import uuid
from collections.abc import Callable
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from dicommail.crypto.gpg import Keyring, Verification
from dicommail.dicom import DicomFile
from dicommail.errors import DestinationError, DicommailError, IncompleteSetError, WireFormatError
from dicommail.receiver.inbox import DICOM_MAIL, FRAGMENT, REPORT
from dicommail.receiver.notify import Notifier
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database, now
from dicommail.store.files import atomic_writer, fsync_dir
from dicommail.wire.manifest import Manifest
from dicommail.wire.notifications import ReceivedReport, open_report
from dicommail.wire.partial import FragmentInfo, format_ranges, join_fragments
from dicommail.wire.unpack import ReceivedFile, ReceivedPart, VerifiedSet, open_mail, verify_set

log = logging.getLogger("dicommail.receiver")

#: Backoff between forwarding attempts: doubles up to this many seconds.
MAX_BACKOFF = 1800.0


class Destination(Protocol):
    """Where verified studies go (the PACS, or a folder)."""

    def deliver(self, verified: VerifiedSet, done: set[str], on_stored: Callable[[str], None]) -> None:
        """Deliver the DICOM files of ``verified`` whose SOP Instance UID is not in ``done``.

        Calls ``on_stored(sop_instance_uid)`` after each instance the
        destination has accepted, so that a rerun does not send it again.
        Raises :class:`DestinationError` (``temporary`` or not) on failure.
        """
        ...


class ReportHandler(Protocol):
    """Where notifications (acknowledgements) that arrive go: the sending side's tracking."""

    def on_report(self, mail_id: int, received: ReceivedReport) -> None:
        """Act on (or ignore) one notification; must be idempotent per ``mail_id``."""
        ...


class Pipeline:
    def __init__(
        self,
        db: Database,
        spool: Spool,
        keyring: Keyring,
        destination: Destination,
        *,
        max_output: int,
        passphrase: str | None = None,
        set_timeout: float = 86400.0,
        retry_interval: float = 60.0,
        retry_limit: int = 0,
        crash_hook: Callable[[str], None] | None = None,
        notifier: Notifier | None = None,
        report_handler: ReportHandler | None = None,
    ) -> None:
        self.db = db
        # Acknowledgements back to senders (None: none are recorded), and notifications that arrive here.
        self.notifier = notifier
        self.report_handler = report_handler
        self.spool = spool
        self.keyring = keyring
        self.destination = destination
        self.max_output = max_output
        self.passphrase = passphrase
        self.set_timeout = set_timeout
        self.retry_interval = retry_interval
        self.retry_limit = retry_limit
        # Fault-injection point for the crash tests: called with a step name.
        self._crash_hook = crash_hook or (lambda _step: None)

    def run_once(self) -> None:
        """Do all work that is ready: decrypt stored mails, complete sets, forward, expire.

        A file-system failure (disk full) stops this round but loses nothing:
        the interrupted step is repeated next time.
        """
        for stage in (self.process_stored, self.complete_sets, self.forward_ready, self.expire_sets):
            try:
                stage()
            except OSError as exc:
                log.error("%s stopped: %s (%s); it is retried in the next cycle", stage.__name__,
                          exc.strerror or exc, exc.filename or "-")
                return
            except sqlite3.Error as exc:
                log.error("%s stopped: state database error %s; it is retried in the next cycle", stage.__name__, exc)
                return

    # -- stored mails -> parts -----------------------------------------------------

    def process_stored(self) -> None:
        rows = self.db.query(
            "SELECT * FROM inbound_mails WHERE status = 'stored' AND kind IN (?, ?) ORDER BY id", (DICOM_MAIL, FRAGMENT)
        )
        fragments: dict[str, list[Any]] = {}
        for row in rows:
            if row["kind"] == FRAGMENT:
                if row["fragment_id"] is None:
                    self._quarantine_mails(
                        [row], WireFormatError("a message/partial fragment with a malformed header")
                    )
                else:
                    fragments.setdefault(row["fragment_id"], []).append(row)
                continue
            self._open(Path(row["spool_path"]), [row])
        for fragment_id, members in fragments.items():
            self._join(fragment_id, members)
        if self.report_handler is not None:
            for row in self.db.query(
                "SELECT * FROM inbound_mails WHERE status = 'stored' AND kind = ? ORDER BY id", (REPORT,)
            ):
                self._report(row)

    def _report(self, row: Any) -> None:
        """A notification: decrypt and check it (PGP/MIME) or parse it (plain MDN), then hand it on."""
        assert self.report_handler is not None
        work = self.spool.work / uuid.uuid4().hex
        try:
            received = open_report(Path(row["spool_path"]), self.keyring, work, passphrase=self.passphrase)
        except DicommailError as exc:
            self._quarantine_mails([row], exc)
            return
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.report_handler.on_report(row["id"], received)
        with self.db.transaction() as conn:
            conn.execute("UPDATE inbound_mails SET status = 'processed', processed_at = ?, set_id = ? WHERE id = ?",
                         (now(), received.notification.set_id[:128] or None, row["id"]))

    def _join(self, fragment_id: str, members: list[Any]) -> None:
        total = next((m["fragment_total"] for m in members if m["fragment_total"]), None)
        numbers = {m["fragment_number"] for m in members}
        if total is None or any(n not in numbers for n in range(1, total + 1)):
            return  # wait for the rest; expiry reports it if it never comes
        joined = self.spool.inbox / f"joined-{uuid.uuid4().hex}.eml"
        try:
            join_fragments(
                [(FragmentInfo(fragment_id, m["fragment_number"], m["fragment_total"]), Path(m["spool_path"]))
                 for m in members],
                joined,
            )
        except DicommailError as exc:
            self._quarantine_mails(members, exc)
            return
        log.info("joined %d fragments of one mail", total)
        self._open(joined, members)
        joined.unlink(missing_ok=True)

    def _open(self, path: Path, rows: list[Any]) -> None:
        work = self.spool.work / uuid.uuid4().hex
        try:
            part = open_mail(path, self.keyring, work, max_output=self.max_output, passphrase=self.passphrase)
        except DicommailError as exc:
            shutil.rmtree(work, ignore_errors=True)
            self._quarantine_mails(rows, exc)
            return
        except OSError:
            # Not the mail's fault (disk full): leave it stored for the next cycle.
            shutil.rmtree(work, ignore_errors=True)
            raise
        self._crash_hook("after-decrypt")
        target = self.spool.part_dir(part.set_id, part.set_part)
        existing = self.db.query(
            "SELECT 1 FROM inbound_parts WHERE set_id = ? AND set_part = ?", (part.set_id, part.set_part)
        )
        if existing:
            log.info("set %s part %d arrived again; the duplicate is ignored", part.set_id, part.set_part)
            shutil.rmtree(work, ignore_errors=True)
        else:
            _save_part(part, work)
            if target.exists():  # left by a crash before the database row was written
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            work.rename(target)
            fsync_dir(target.parent)
        with self.db.transaction() as conn:
            if not existing:
                conn.execute(
                    "INSERT INTO inbound_parts (set_id, set_part, inbound_id, directory) VALUES (?, ?, ?, ?)",
                    (part.set_id, part.set_part, rows[0]["id"], str(target)),
                )
                conn.execute(
                    """INSERT INTO inbound_sets (set_id, sender, signer, set_total, study_uid, status,
                           first_seen_at, updated_at) VALUES (?, ?, ?, ?, ?, 'collecting', ?, ?)
                       ON CONFLICT (set_id) DO UPDATE SET updated_at = excluded.updated_at""",
                    (part.set_id, part.signer.user_id, part.signer.fingerprint, part.set_total, part.study_uid,
                     now(), now()),
                )
                if self.notifier is not None:
                    self.notifier.on_part_verified(conn, part)
            for row in rows:
                conn.execute(
                    "UPDATE inbound_mails SET status = 'processed', processed_at = ?, set_id = ?, set_part = ? "
                    "WHERE id = ?",
                    (now(), part.set_id, part.set_part, row["id"]),
                )
        log.info("set %s: part %d of %d verified (signer %s)", part.set_id, part.set_part, part.set_total,
                 part.signer.fingerprint)

    def _quarantine_mails(self, rows: list[Any], error: DicommailError) -> None:
        first = Path(rows[0]["spool_path"])
        place = self.spool.quarantine(
            first if len(rows) == 1 else None, error, f"mail-{rows[0]['id']}",
            {"mails": [r["server_uid"] for r in rows], "account": rows[0]["account"]},
        )
        for row in rows[1:]:
            shutil.copy2(row["spool_path"], place / Path(row["spool_path"]).name)
        with self.db.transaction() as conn:
            for row in rows:
                conn.execute(
                    "UPDATE inbound_mails SET status = 'quarantined', error = ?, processed_at = ? WHERE id = ?",
                    (f"{error.code}: {error.message}", now(), row["id"]),
                )
            if self.notifier is not None:
                self.notifier.on_mail_failed(conn, rows, error)
        log.warning("mail %s quarantined in %s: %s", rows[0]["id"], place, error.message)

    # -- parts -> complete sets -----------------------------------------------------------

    def complete_sets(self) -> None:
        rows = self.db.query(
            """SELECT s.set_id, s.set_total, COUNT(p.set_part) AS parts FROM inbound_sets s
               JOIN inbound_parts p ON p.set_id = s.set_id WHERE s.status = 'collecting'
               GROUP BY s.set_id HAVING parts >= s.set_total"""
        )
        for row in rows:
            try:
                verified = self.load_set(row["set_id"])
            except DicommailError as exc:
                self._fail_set(row["set_id"], exc)
                continue
            with self.db.transaction() as conn:
                conn.execute(
                    "UPDATE inbound_sets SET status = 'complete', updated_at = ? WHERE set_id = ?",
                    (now(), row["set_id"]),
                )
                if self.notifier is not None:
                    self.notifier.on_set_verified(conn, row["set_id"])
            log.info("set %s complete: %d DICOM files verified against the manifest", verified.set_id,
                     len(verified.dicom_files))

    def load_set(self, set_id: str) -> VerifiedSet:
        rows = self.db.query("SELECT directory FROM inbound_parts WHERE set_id = ? ORDER BY set_part", (set_id,))
        return verify_set([_load_part(Path(r["directory"])) for r in rows])

    def _fail_set(self, set_id: str, error: DicommailError, status: str = "failed") -> None:
        directory = self.spool.set_dir(set_id)
        place = self.spool.quarantine(directory, error, f"set-{set_id}", {"set_id": set_id})
        shutil.rmtree(directory, ignore_errors=True)
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE inbound_sets SET status = ?, error = ?, updated_at = ? WHERE set_id = ?",
                (status, f"{error.code}: {error.message}", now(), set_id),
            )
            if self.notifier is not None:
                self.notifier.on_set_finished(conn, set_id, status, error)
        log.error("set %s %s: %s (kept in %s)", set_id, status, error.message, place)

    # -- complete sets -> destination ---------------------------------------------------------

    def forward_ready(self) -> None:
        rows = self.db.query(
            "SELECT * FROM inbound_sets WHERE status = 'complete' AND next_attempt_at <= ? ORDER BY first_seen_at",
            (now(),),
        )
        for row in rows:
            self._forward(row)

    def _forward(self, row: Any) -> None:
        set_id = row["set_id"]
        try:
            verified = self.load_set(set_id)
        except DicommailError as exc:
            self._fail_set(set_id, exc)
            return
        done = {r["sop_instance_uid"] for r in self.db.query(
            "SELECT sop_instance_uid FROM forwarded_instances WHERE set_id = ?", (set_id,))}

        def on_stored(sop_instance_uid: str) -> None:
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO forwarded_instances (set_id, sop_instance_uid, forwarded_at) "
                    "VALUES (?, ?, ?)",
                    (set_id, sop_instance_uid, now()),
                )
            self._crash_hook("during-forward")

        try:
            self.destination.deliver(verified, done, on_stored)
        except DestinationError as exc:
            attempts = row["attempts"] + 1
            if not exc.temporary or (self.retry_limit and attempts >= self.retry_limit):
                self._fail_set(set_id, exc)
                return
            delay = min(MAX_BACKOFF, self.retry_interval * 2 ** min(attempts - 1, 10))
            with self.db.transaction() as conn:
                conn.execute(
                    "UPDATE inbound_sets SET attempts = ?, next_attempt_at = ?, error = ?, updated_at = ? "
                    "WHERE set_id = ?",
                    (attempts, now() + delay, f"{exc.code}: {exc.message}", now(), set_id),
                )
            log.warning("set %s not forwarded yet (attempt %d): %s; next try in %.0f s", set_id, attempts,
                        exc.message, delay)
            return
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE inbound_sets SET status = 'delivered', delivered_at = ?, error = NULL, updated_at = ? "
                "WHERE set_id = ?",
                (now(), now(), set_id),
            )
            if self.notifier is not None:
                self.notifier.on_set_finished(conn, set_id, "delivered", files=len(verified.files),
                                              dicom_instances=len(verified.dicom_files),
                                              warnings=len(verified.warnings))
        shutil.rmtree(self.spool.set_dir(set_id), ignore_errors=True)
        log.info("set %s delivered: %d DICOM files", set_id, len(verified.dicom_files))

    # -- incomplete sets -------------------------------------------------------------------

    def expire_sets(self) -> None:
        rows = self.db.query(
            "SELECT * FROM inbound_sets WHERE status = 'collecting' AND first_seen_at < ?",
            (now() - self.set_timeout,),
        )
        for row in rows:
            have = {r["set_part"] for r in self.db.query(
                "SELECT set_part FROM inbound_parts WHERE set_id = ?", (row["set_id"],))}
            missing = [n for n in range(1, row["set_total"] + 1) if n not in have]
            if self.notifier is not None and missing and not self._expires_now(row["set_id"], missing):
                continue
            error = IncompleteSetError(
                f"set {row['set_id']} expired with {len(missing)} of {row['set_total']} parts missing: "
                f"{format_ranges(missing) if missing else '-'}",
                "ask the sender to send the missing parts again",
                missing_parts=missing,
            )
            self._fail_set(row["set_id"], error, status="expired")

    def _expires_now(self, set_id: str, missing: list[int]) -> bool:
        """With acknowledgements, a timed-out set first asks for its missing parts and waits once more."""
        assert self.notifier is not None
        tracking = self.db.query("SELECT missing_reported_at FROM set_tracking WHERE set_id = ?", (set_id,))
        reported = tracking[0]["missing_reported_at"] if tracking else None
        if reported is not None:
            return bool(reported < now() - self.set_timeout)
        with self.db.transaction() as conn:
            asked = self.notifier.on_parts_missing(conn, set_id, missing)
        return not asked



# -- part.json: a decoded part survives restarts ---------------------------------------------


def _save_part(part: ReceivedPart, directory: Path) -> None:
    data = {
        "set_id": part.set_id,
        "set_part": part.set_part,
        "set_total": part.set_total,
        "study_uid": part.study_uid,
        "message_id": part.message_id,
        "note": part.note,
        "signer": {**asdict(part.signer), "signed_at": part.signer.signed_at.isoformat()},
        "manifest": json.loads(part.manifest.to_json()) if part.manifest else None,
        "files": [
            {
                "content_id": f.content_id,
                "name": f.name,
                "media_type": f.media_type,
                "kind": f.kind,
                "file": f.path.name,
                "size": f.size,
                "sha256": f.sha256,
                "dicom": {k: str(v) if k == "path" else v for k, v in asdict(f.dicom).items()} if f.dicom else None,
            }
            for f in part.files
        ],
    }
    with atomic_writer(directory / "part.json") as handle:
        handle.write(json.dumps(data, indent=1).encode("utf-8"))


def _load_part(directory: Path) -> ReceivedPart:
    try:
        data = json.loads((directory / "part.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WireFormatError(f"the stored part in {directory} is unreadable: {exc}") from exc
    signer = dict(data["signer"])
    signer["signed_at"] = datetime.fromisoformat(signer["signed_at"])
    files = []
    for entry in data["files"]:
        path = directory / entry["file"]
        dicom = None
        if entry["dicom"]:
            dicom = DicomFile(**{**entry["dicom"], "path": path})
        files.append(
            ReceivedFile(entry["content_id"], entry["name"], entry["media_type"], entry["kind"], path, entry["size"],
                         entry["sha256"], dicom)
        )
    manifest = Manifest.from_json(json.dumps(data["manifest"]).encode()) if data["manifest"] else None
    return ReceivedPart(
        set_id=data["set_id"],
        set_part=data["set_part"],
        set_total=data["set_total"],
        study_uid=data["study_uid"],
        message_id=data["message_id"],
        signer=Verification(**signer),
        files=files,
        manifest=manifest,
        note=data["note"],
    )
