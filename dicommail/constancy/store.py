"""The sending side's record of constancy checks: the ``constancy_checks`` table of ``state.db``.

A check is a row from the moment it starts: ``pending`` until its receipt is
processed (:func:`record_receipt`, called by the sender's tracking in the
transaction that accepts the test transfer's final set notification) or until
it can no longer pass (:func:`settle`: no receipt within the time limit, or
the test transfer failed).  Then it is ``passed`` or ``failed`` with the
reason, and stays so: the record is the documentation DIN 6868-159 asks for.

Results name header entries by DICOM keyword and instance number only; no
value of a header entry, no patient data, is ever stored, logged or mailed.
"""

from __future__ import annotations

import json
import logging
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

from dicommail.errors import StateError
from dicommail.store.db import Database

__all__ = [
    "FAILED",
    "PASSED",
    "PENDING",
    "ConstancyCheck",
    "attach_transfer",
    "fail_check",
    "get_check",
    "has_pending",
    "list_checks",
    "new_mark_id",
    "next_attempt",
    "prune_checks",
    "record_receipt",
    "settle",
    "start_check",
]

log = logging.getLogger("dicommail.constancy")
log.addHandler(logging.NullHandler())

PASSED = "passed"
FAILED = "failed"
PENDING = "pending"

#: How much of the receiver's list of differing header entries a reason quotes.
_MAX_MISMATCHED = 20
_CONTROL = re.compile(r"[\x00-\x1f\x7f]+")
#: Outcomes of a final set notification that mean "delivered".
_DELIVERED_OUTCOMES = ("success", "warning")


def _when(timestamp: float | None) -> datetime | None:
    """Unix seconds as an aware datetime in the local time zone (ISO 8601 with offset in JSON)."""
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC).astimezone()


def _flag(value: object) -> bool | None:
    return None if value is None else bool(value)


@dataclass(frozen=True)
class ConstancyCheck:
    """One constancy check as the sender recorded it.

    ``result`` is "passed", "failed" or "pending"; ``reason`` says why it
    failed (or, for a receiver that does not know the constancy mark, that
    image quality was not checked).  ``complete``, ``headers_ok`` and
    ``quality_ok`` are None where nothing is known (yet, or at all: a foreign
    receiver checks neither header entries nor quality).  ``transfer_time_s``
    runs from the first mail handed to SMTP until the receipt was processed.
    Times are aware datetimes in the local time zone.
    """

    id: int
    kind: str
    peer: str
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    transfer_time_s: float | None
    limit_s: int
    complete: bool | None
    headers_ok: bool | None
    quality_ok: bool | None
    result: str
    reason: str | None
    #: True if the receiver checked the mark (a dicommail receiver), False if it sent only ordinary acknowledgements.
    receiver_checked: bool | None = None
    transfer_id: int | None = None
    set_id: str | None = None
    #: The check ID the test transfer carried in its mark.
    mark_id: str = ""
    #: DICOM instances and bytes of the test set.
    images: int | None = None
    bytes: int | None = None

    @property
    def passed(self) -> bool:
        return self.result == PASSED

    @property
    def pending(self) -> bool:
        return self.result == PENDING

    def to_json(self) -> dict[str, object]:
        """One entry of ``dicommail constancy list --json``'s ``checks`` list."""
        return {
            "id": self.id,
            "kind": self.kind,
            "peer": self.peer,
            "attempt": self.attempt,
            "started_at": self.started_at.isoformat(timespec="seconds"),
            "finished_at": self.finished_at.isoformat(timespec="seconds") if self.finished_at else None,
            "transfer_time_s": round(self.transfer_time_s, 3) if self.transfer_time_s is not None else None,
            "limit_s": self.limit_s,
            "complete": self.complete,
            "headers_ok": self.headers_ok,
            "quality_ok": self.quality_ok,
            "result": self.result,
            "reason": self.reason,
        }


def _check(row: sqlite3.Row) -> ConstancyCheck:
    started = _when(row["started_at"])
    assert started is not None  # NOT NULL
    return ConstancyCheck(
        id=row["id"], kind=row["kind"], peer=row["peer"], attempt=row["attempt"], started_at=started,
        finished_at=_when(row["finished_at"]), transfer_time_s=row["transfer_time_s"], limit_s=row["limit_s"],
        complete=_flag(row["complete"]), headers_ok=_flag(row["headers_ok"]), quality_ok=_flag(row["quality_ok"]),
        result=row["result"], reason=row["reason"], receiver_checked=_flag(row["receiver_checked"]),
        transfer_id=row["transfer_id"], set_id=row["set_id"], mark_id=row["mark_id"], images=row["images"],
        bytes=row["bytes"],
    )


def _log_finished(check: ConstancyCheck) -> None:
    """One line per finished check: ERROR when it failed (WARNING for a daily first attempt, retried once)."""
    shown = f"{check.transfer_time_s:.1f} s" if check.transfer_time_s is not None else "-"
    if check.passed:
        log.info("constancy check %d (%s, attempt %d) to %s passed: transfer time %s of %d s%s", check.id,
                 check.kind, check.attempt, check.peer, shown, check.limit_s,
                 f"; {check.reason}" if check.reason else "")
        return
    level = logging.WARNING if check.kind == "daily" and check.attempt == 1 else logging.ERROR
    log.log(level, "constancy check %d (%s, attempt %d) to %s FAILED: %s", check.id, check.kind, check.attempt,
            check.peer, check.reason or "no reason recorded")


# -- writing -------------------------------------------------------------------------------------------


def new_mark_id() -> str:
    """A check ID for the mark on the wire: unique across sites, and no information about this one."""
    return uuid.uuid4().hex


def start_check(db: Database, *, kind: str, peer: str, attempt: int, limit_s: int, mark_id: str,
                images: int | None = None, size: int | None = None, started_at: float | None = None) -> int:
    """Record a check as started (pending, no transfer yet); its row id."""
    with db.transaction() as conn:
        cursor = conn.execute(
            "INSERT INTO constancy_checks (kind, peer, attempt, mark_id, images, bytes, started_at, limit_s, result) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (kind, peer.lower(), attempt, mark_id, images, size,
             started_at if started_at is not None else time.time(), limit_s, PENDING),
        )
        assert cursor.lastrowid is not None
        return cursor.lastrowid


def attach_transfer(db: Database, check_id: int, transfer_id: int, set_id: str) -> None:
    """The test set was queued as this transfer: its receipt finishes the check."""
    with db.transaction() as conn:
        conn.execute("UPDATE constancy_checks SET transfer_id = ?, set_id = ? WHERE id = ?",
                     (transfer_id, set_id, check_id))


def fail_check(db: Database, check_id: int, reason: str, at: float | None = None) -> ConstancyCheck:
    """A pending check fails (e.g. its test set could not be sent); a finished one stays as it is."""
    with db.transaction() as conn:
        conn.execute(
            "UPDATE constancy_checks SET result = ?, reason = ?, finished_at = ? WHERE id = ? AND result = ?",
            (FAILED, reason, at if at is not None else time.time(), check_id, PENDING),
        )
        changed = conn.execute("SELECT changes()").fetchone()[0]
        row = conn.execute("SELECT * FROM constancy_checks WHERE id = ?", (check_id,)).fetchone()
    if row is None:
        raise StateError(f"no constancy check {check_id}")
    check = _check(row)
    if changed:
        _log_finished(check)
    return check


def _clean(text: object, limit: int = 200) -> str:
    """A peer's text for a reason: one line, bounded (it is signed by a certified peer, but still its text)."""
    return _CONTROL.sub(" ", str(text)).strip()[:limit]


def _receiver_results(found: object, mark_id: str, kind: str) -> tuple[bool | None, bool | None, bool | None,
                                                                          list[str], str]:
    """(complete, headers_ok, quality_ok, mismatched, problem) from the receipt's ``constancy`` object."""
    if not isinstance(found, Mapping):
        return None, None, None, [], "the receipt's constancy results are malformed"
    if found.get("check_id") != mark_id:
        return None, None, None, [], "the receipt's constancy results name another check"
    if found.get("kind") not in (None, kind):
        return None, None, None, [], "the receipt's constancy results name another kind of check"
    flags = [found.get(key) for key in ("complete", "headers_ok", "quality_ok")]
    if not all(isinstance(flag, bool) for flag in flags):
        return None, None, None, [], "the receipt's constancy results are malformed"
    raw = found.get("mismatched") or []
    mismatched = [_clean(item, 100) for item in raw[:_MAX_MISMATCHED]] if isinstance(raw, list) else []
    more = len(raw) - len(mismatched) if isinstance(raw, list) else 0
    if more > 0:
        mismatched.append(f"and {more} more")
    return flags[0], flags[1], flags[2], mismatched, ""


def record_receipt(conn: sqlite3.Connection, transfer_id: int, report_status_json: Mapping[str, object],
                   received_at: float) -> ConstancyCheck | None:
    """Record the final set notification of ``transfer_id`` as its check's receipt; None if no check waits for one.

    A check that already failed (no receipt within its time limit) stays
    failed: a late receipt changes its transfer's state, not the record.

    Called inside the transaction that accepts the notification.
    ``report_status_json`` is the receiver's status JSON (a dicommail receiver
    puts its constancy results in its ``constancy`` object; a foreign one has
    none, and a plain acknowledgement gives just ``outcome``).  Passed iff the
    set is complete, header entries and image quality are as sent (where the
    receiver checked them) and the transfer time is within the limit.
    """
    row = conn.execute(
        "SELECT c.*, t.first_sent_at FROM constancy_checks c LEFT JOIN transfers t ON t.id = c.transfer_id "
        "WHERE c.transfer_id = ? AND c.result = 'pending' ORDER BY c.id DESC LIMIT 1",
        (transfer_id,),
    ).fetchone()
    if row is None:
        return None
    status = report_status_json
    delivered = status.get("outcome") in _DELIVERED_OUTCOMES and status.get("status") in (None, "delivered")
    reasons: list[str] = []
    found = status.get("constancy")
    receiver_checked = found is not None
    complete: bool | None
    headers_ok = quality_ok = None
    if receiver_checked:
        found_complete, headers_ok, quality_ok, mismatched, problem = _receiver_results(found, row["mark_id"],
                                                                                        row["kind"])
        if problem:
            reasons.append(problem)
        if found_complete is False:
            reasons.append("incomplete: not all images arrived as the manifest lists them")
        if headers_ok is False:
            reasons.append("header entries changed: " + (", ".join(mismatched) or "not named by the receiver"))
        if quality_ok is False:
            reasons.append("image quality: pixel data not bit-identical or not decodable")
        # Not delivered is incomplete, whatever the results say; malformed results say nothing.
        complete = (None if delivered else False) if found_complete is None else found_complete and delivered
    else:
        complete = delivered
    if not delivered:
        what = _clean(status.get("status") or status.get("outcome") or "not delivered", 40)
        why = _clean(status.get("reason") or "", 80)
        reasons.insert(0, f"the receiver reports the set {what}" + (f" ({why})" if why else ""))
    seconds = received_at - row["first_sent_at"] if row["first_sent_at"] is not None else None
    limit = row["limit_s"]
    if seconds is None:
        reasons.append("the transfer time is unknown (no mail of the test set was recorded as sent)")
    elif seconds > limit:
        reasons.append(f"transfer time {seconds:.1f} s is above the limit of {limit} s")
    passed = (not reasons and complete is True and headers_ok is not False and quality_ok is not False)
    note = "" if receiver_checked else (
        "image quality and header entries not checked by the receiver (it does not know the constancy mark; "
        "completeness and transfer time are from its final acknowledgement)")
    reason = "; ".join([*reasons, note] if note else reasons) or None
    conn.execute(
        "UPDATE constancy_checks SET receipt_at = ?, finished_at = ?, transfer_time_s = ?, complete = ?, "
        "headers_ok = ?, quality_ok = ?, result = ?, reason = ?, receiver_checked = ? WHERE id = ?",
        (received_at, received_at, seconds, _int(complete), _int(headers_ok), _int(quality_ok),
         PASSED if passed else FAILED, reason, int(receiver_checked), row["id"]),
    )
    check = _check(conn.execute("SELECT * FROM constancy_checks WHERE id = ?", (row["id"],)).fetchone())
    _log_finished(check)
    return check


def _int(value: bool | None) -> int | None:
    return None if value is None else int(value)


_PENDING_SQL = """
SELECT c.id, c.transfer_id, c.limit_s, c.started_at, t.status AS transfer_status, t.first_sent_at,
       t.error AS transfer_error, k.final_report, k.finished_at AS delivered_at
FROM constancy_checks c LEFT JOIN transfers t ON t.id = c.transfer_id
     LEFT JOIN transfer_tracking k ON k.transfer_id = c.transfer_id
WHERE c.result = 'pending'
"""


def settle(db: Database, now: Callable[[], float] = time.time) -> list[ConstancyCheck]:
    """Finish the pending checks that can be finished now; return them.

    A delivered test transfer whose receipt was not recorded with it (it came
    before the check knew its transfer) is recorded from its final report; a
    failed or cancelled test transfer fails its check; so does a check without
    a receipt within its time limit of the first mail handed to SMTP (of the
    check's start while nothing was sent).
    """
    finished: list[ConstancyCheck] = []
    at = now()
    for row in db.query(_PENDING_SQL):
        if row["transfer_status"] == "delivered":
            # A plain MDN leaves no report: the delivery itself is all the receiver said.
            report: object = {"scope": "set", "outcome": "success"}
            if row["final_report"]:
                try:
                    report = json.loads(row["final_report"])
                except ValueError:
                    report = {}
            with db.transaction() as conn:
                check = record_receipt(conn, row["transfer_id"], report if isinstance(report, dict) else {},
                                       row["delivered_at"] or at)
            if check is not None:
                finished.append(check)
            continue
        reason = ""
        if row["transfer_status"] in ("failed", "cancelled", "expired"):
            error = f": {_clean(row['transfer_error'])}" if row["transfer_error"] else ""
            reason = f"the test transfer {row['transfer_status']}{error}"
        elif at > (row["first_sent_at"] or row["started_at"]) + row["limit_s"]:
            if row["first_sent_at"] is not None:
                reason = f"no receipt within the time limit of {row['limit_s']} s"
            elif row["transfer_id"] is not None:
                error = f" ({_clean(row['transfer_error'])})" if row["transfer_error"] else ""
                reason = f"the test set was not sent within the time limit of {row['limit_s']} s{error}"
            else:
                reason = "the check never sent its test set"
        if reason:
            check = fail_check(db, row["id"], reason, at)
            if check.result == FAILED:
                finished.append(check)
    return finished


def prune_checks(db: Database, retention_years: int, now: Callable[[], float] = time.time) -> int:
    """Remove finished checks older than ``retention_years``; how many."""
    cutoff = now() - retention_years * 365.25 * 86400
    with db.transaction() as conn:
        conn.execute("DELETE FROM constancy_checks WHERE started_at < ? AND result != ?", (cutoff, PENDING))
        removed: int = conn.execute("SELECT changes()").fetchone()[0]
    return removed


# -- reading -------------------------------------------------------------------------------------------


def get_check(db: Database, check_id: int) -> ConstancyCheck:
    rows = db.query("SELECT * FROM constancy_checks WHERE id = ?", (check_id,))
    if not rows:
        raise StateError(f"no constancy check {check_id}", "see `dicommail constancy list`")
    return _check(rows[0])


def list_checks(db: Database, *, since: float | None = None, until: float | None = None,
                peer: str | None = None) -> list[ConstancyCheck]:
    """Checks started in ``[since, until)`` (Unix seconds; None: unbounded), to ``peer`` if given, oldest first."""
    where: list[str] = []
    params: list[object] = []
    if since is not None:
        where.append("started_at >= ?")
        params.append(since)
    if until is not None:
        where.append("started_at < ?")
        params.append(until)
    if peer:
        where.append("peer = ?")
        params.append(peer.lower())
    # Only the fixed conditions above are joined; every value is a parameter.
    sql = "SELECT * FROM constancy_checks" + (" WHERE " + " AND ".join(where) if where else "")  # noqa: S608
    return [_check(r) for r in db.query(sql + " ORDER BY started_at, id", tuple(params))]


def has_pending(db: Database) -> bool:
    """Whether a check waits for its receipt."""
    return bool(db.query("SELECT 1 FROM constancy_checks WHERE result = ? LIMIT 1", (PENDING,)))


def next_attempt(db: Database, kind: str, peer: str, now: Callable[[], float] = time.time) -> int:
    """2 if this is the retry of today's failed first daily check to ``peer``, else 1.

    DIN 6868-159 allows two attempts a working day; a check run later on the
    same day after a failed first attempt (e.g. from a timer with ``--wait
    0``, whose first attempt ran out of time) is the second.
    """
    if kind != "daily":
        return 1
    today = datetime.fromtimestamp(now()).replace(hour=0, minute=0, second=0, microsecond=0).timestamp()
    rows = db.query(
        "SELECT attempt, result FROM constancy_checks WHERE kind = 'daily' AND peer = ? AND started_at >= ? "
        "ORDER BY started_at DESC, id DESC LIMIT 1",
        (peer.lower(), today),
    )
    return 2 if rows and rows[0]["attempt"] == 1 and rows[0]["result"] == FAILED else 1


@dataclass(frozen=True)
class ConstancyReport:
    """What :func:`dicommail.constancy.report.write_report` wrote and counted: a month's documentation."""

    pdf: Path
    signature: Path
    """The detached, ASCII-armored signature by this site's key (``pdf`` + ``.asc``)."""
    month: str
    peers: tuple[str, ...]
    checks: int
    passed: int
    failed: int
    pending: int
    working_days: int
    days_without_passed_daily: tuple[date, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {
            "pdf": str(self.pdf),
            "signature": str(self.signature),
            "month": self.month,
            "peers": list(self.peers),
            "checks": self.checks,
            "passed": self.passed,
            "failed": self.failed,
            "pending": self.pending,
            "working_days": self.working_days,
            "days_without_passed_daily": [day.isoformat() for day in self.days_without_passed_daily],
        }
