"""Running a site for months: retention (``dicommail cleanup``) and statistics (``dicommail stats``).

Retention removes the spool's files of finished work after ``[retention]``'s
days; the records in ``state.db`` stay, so transfers and received sets can
still be listed and counted.  The running receiver and gateway call
:func:`run_cleanup` once an hour; :meth:`Operations.cleanup` is the same job
on demand.  Statistics count sent transfers and received sets per peer,
month or route from ``state.db``.
"""

from __future__ import annotations

import logging
import math
import shutil
import sqlite3
import stat
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from dicommail.config import Config, format_size
from dicommail.errors import InputError
from dicommail.site.base import SiteBase
from dicommail.store.db import Database

__all__ = [
    "CLEANUP_KINDS",
    "STATS_GROUPINGS",
    "CleanupCount",
    "CleanupReport",
    "Operations",
    "StatsFigures",
    "StatsGroup",
    "StatsReport",
    "free_space_short",
    "run_cleanup",
]

log = logging.getLogger("dicommail.retention")

#: The kinds of file :func:`run_cleanup` removes, in the order it reports them.
CLEANUP_KINDS = ("outbox", "inbox", "notifications", "quarantine")

#: What :meth:`Operations.stats` can group by.
STATS_GROUPINGS = ("peer", "month", "route")

#: Seconds between the daemons' clean-ups.
CLEANUP_INTERVAL = 3600.0

_DAY = 86400.0

# Transfer and set states that end a transfer (the others may still need their files).
_OUTBOX_FINISHED = ("delivered", "cancelled")
_SET_FINISHED = ("delivered", "failed", "expired")
_NOTIFICATION_FINISHED = ("sent", "failed", "superseded")
_SENT_FAILURES = ("failed", "expired")
_RECEIVED_FAILURES = ("failed", "expired")


# -- retention --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CleanupCount:
    """What a clean-up removed (or, in a dry run, would remove) of one kind of file.

    ``kind`` is one of :data:`CLEANUP_KINDS`; ``days`` the retention that
    applied (0: that kind is kept for ever, so nothing was removed).
    """

    kind: str
    days: int
    files: int = 0
    bytes: int = 0

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "days": self.days, "files": self.files, "bytes": self.bytes}


@dataclass(frozen=True)
class CleanupReport:
    """The result of :meth:`Operations.cleanup`: files and bytes removed per kind.

    ``dry_run`` reports show what a clean-up would remove now and removed
    nothing.  ``errors`` name files that could not be removed (path and
    reason); they are tried again next time.
    """

    dry_run: bool
    counts: tuple[CleanupCount, ...]
    errors: tuple[str, ...] = ()

    @property
    def files(self) -> int:
        """Files removed, all kinds together."""
        return sum(c.files for c in self.counts)

    @property
    def bytes(self) -> int:
        """Bytes removed, all kinds together."""
        return sum(c.bytes for c in self.counts)

    def count(self, kind: str) -> CleanupCount:
        """The count of one kind (see :data:`CLEANUP_KINDS`)."""
        for item in self.counts:
            if item.kind == kind:
                return item
        raise KeyError(kind)

    def to_json(self) -> dict[str, object]:
        """What ``dicommail cleanup --json`` prints."""
        return {
            "ok": not self.errors,
            "dry_run": self.dry_run,
            "files": self.files,
            "bytes": self.bytes,
            "kinds": [c.to_json() for c in self.counts],
            "errors": list(self.errors),
        }


@dataclass
class _Tally:
    kind: str
    days: int
    files: int = 0
    bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def frozen(self) -> CleanupCount:
        return CleanupCount(self.kind, self.days, self.files, self.bytes)


def run_cleanup(config: Config, db: Database, *, dry_run: bool = False, now: float | None = None) -> CleanupReport:
    """Remove the spool files of finished work older than ``[retention]`` says; records stay.

    * outbox: the mails of transfers delivered or cancelled more than
      ``outbox_days`` ago (failed and expired ones keep theirs, for a retry);
    * inbox: fetched mails, processed or quarantined, whose set was delivered,
      failed or expired more than ``inbox_days`` ago (a mail without a set,
      e.g. an acknowledgement, counts from when it was processed);
    * notifications: acknowledgements sent or given up more than
      ``notifications_days`` ago;
    * quarantine: items older than ``receiver.quarantine_days``.

    Only files inside the spool's own folders are touched, whatever a record
    says.  Safe beside a running receiver, gateway or sender: each kind is
    removed inside one write transaction, so nobody changes the records
    (a retry of a cancelled transfer, say) half-way.
    """
    at = time.time() if now is None else now
    retention = config.retention
    spool = config.spool
    tallies = [
        _clean(db, _Tally("outbox", retention.outbox_days), spool / "outbox", dry_run, _OUTBOX_SQL,
               (*_OUTBOX_FINISHED, at - retention.outbox_days * _DAY)),
        _clean(db, _Tally("inbox", retention.inbox_days), spool / "inbox", dry_run, _INBOX_SQL,
               (*_SET_FINISHED, at - retention.inbox_days * _DAY, at - retention.inbox_days * _DAY)),
        _clean(db, _Tally("notifications", retention.notifications_days), spool / "notifications", dry_run,
               _NOTIFICATIONS_SQL, (*_NOTIFICATION_FINISHED, at - retention.notifications_days * _DAY)),
        _clean_quarantine(_Tally("quarantine", config.receiver.quarantine_days), spool / "quarantine", dry_run,
                          at - config.receiver.quarantine_days * _DAY),
    ]
    report = CleanupReport(dry_run, tuple(t.frozen() for t in tallies),
                           tuple(error for t in tallies for error in t.errors))
    if report.files and not dry_run:
        log.info("retention: removed %d file(s), %s (%s)", report.files, format_size(report.bytes),
                 ", ".join(f"{c.kind} {c.files}" for c in report.counts if c.files))
    for error in report.errors[:5]:
        log.error("retention: cannot remove %s; tried again at the next clean-up", error)
    return report


# Each query yields the candidate files (column "path"); a file already gone is skipped.  The
# placeholders take the finished states above and the cut-off time(s).
_OUTBOX_SQL = """
SELECT m.path FROM outbound_mails m JOIN transfers t ON t.id = m.transfer_id
LEFT JOIN transfer_tracking k ON k.transfer_id = t.id
WHERE t.status IN (?, ?) AND COALESCE(k.finished_at, t.updated_at) < ?
ORDER BY m.id
"""

_INBOX_SQL = """
SELECT m.spool_path AS path FROM inbound_mails m LEFT JOIN inbound_sets s ON s.id = m.set_ref
WHERE m.status IN ('processed', 'quarantined') AND m.spool_path != '' AND (
    (s.id IS NOT NULL AND s.status IN (?, ?, ?)
        AND COALESCE(s.delivered_at, s.updated_at) < ?)
    OR (m.set_ref IS NULL AND COALESCE(m.processed_at, m.received_at) < ?))
ORDER BY m.id
"""

_NOTIFICATIONS_SQL = """
SELECT path FROM notifications
WHERE status IN (?, ?, ?) AND path IS NOT NULL AND path != ''
    AND COALESCE(sent_at, created_at) < ?
ORDER BY id
"""


def _clean(db: Database, tally: _Tally, folder: Path, dry_run: bool, sql: str, params: tuple[object, ...]
           ) -> _Tally:
    if tally.days <= 0:
        return tally
    if dry_run:
        for _path, size in _present(folder, db.query(sql, params)):
            tally.files += 1
            tally.bytes += size
        return tally
    touched: set[Path] = set()
    # The write lock keeps the records still while their files go (see run_cleanup).
    with db.transaction() as conn:
        for path, size in _present(folder, conn.execute(sql, params).fetchall()):
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                tally.errors.append(f"{path} ({exc.strerror or exc})")
                continue
            tally.files += 1
            tally.bytes += size
            touched.add(path.parent)
    _remove_empty_dirs(touched, folder)
    return tally


def _present(folder: Path, rows: Iterable[sqlite3.Row]) -> Iterator[tuple[Path, int]]:
    """The rows' files that exist, are regular files and lie inside ``folder``, with their sizes."""
    try:
        root = folder.resolve(strict=True)
    except OSError:
        return  # the folder was never made: nothing of this kind was ever stored
    seen: set[Path] = set()
    for row in rows:
        path = Path(row["path"])
        if path in seen:
            continue
        seen.add(path)
        try:
            info = path.lstat()
            inside = path.parent.resolve(strict=True).is_relative_to(root)
        except OSError:
            continue  # removed already: the record stays, the file is gone
        if inside and stat.S_ISREG(info.st_mode):  # lstat: a symbolic link is no file of ours
            yield path, info.st_size


def _remove_empty_dirs(directories: set[Path], root: Path) -> None:
    """Folders (e.g. one per outbox transfer) left empty, up to but not including ``root``."""
    for directory in sorted(directories, key=lambda d: len(d.parts), reverse=True):
        current = directory
        while current != root and current.is_relative_to(root):
            try:
                current.rmdir()
            except OSError:
                break  # not empty (or gone): leave it
            current = current.parent


def _clean_quarantine(tally: _Tally, folder: Path, dry_run: bool, before: float) -> _Tally:
    """Quarantined items older than ``receiver.quarantine_days`` (as the receiver's own expiry counts them)."""
    try:
        entries = [e for e in folder.iterdir() if e.is_dir() and not e.is_symlink()]
    except OSError:
        return tally
    for entry in entries:
        reason = entry / "reason.json"
        try:
            made = reason.stat().st_mtime if reason.exists() else entry.stat().st_mtime
            files = [p for p in entry.rglob("*") if p.is_file() and not p.is_symlink()]
            size = sum(p.lstat().st_size for p in files)
        except OSError:
            continue
        if made >= before:
            continue
        if not dry_run:
            try:
                shutil.rmtree(entry)
            except OSError as exc:
                tally.errors.append(f"{entry} ({exc.strerror or exc})")
                continue
        tally.files += len(files)
        tally.bytes += size
    return tally


def free_space(path: Path) -> int:
    """The free bytes on ``path``'s file system; ``path`` may not exist yet: its nearest existing parent counts."""
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def free_space_short(path: Path, minimum: int) -> int | None:
    """The free bytes on ``path``'s file system if they are below ``minimum``, else None (also for 0)."""
    if minimum <= 0:
        return None
    free = free_space(path)
    return free if free < minimum else None


# -- statistics -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatsFigures:
    """One direction's figures of a group: sent transfers, or received sets.

    ``images`` counts DICOM instances (sent: as recorded when packing, else the
    files; received: instances the destination accepted); ``bytes`` the mails
    on the wire.  ``failures`` counts failed and expired ones.  The times are
    those of delivered ones, in seconds: sent, from the first mail handed to
    SMTP until the receiver's final notification; received, from the first
    mail fetched until the set was delivered.  ``p95_seconds`` is the 95th
    percentile, interpolated linearly between the closest ranks (as the median
    is); None without a delivered one.
    """

    transfers: int = 0
    images: int = 0
    bytes: int = 0
    failures: int = 0
    delivered: int = 0
    median_seconds: float | None = None
    p95_seconds: float | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "transfers": self.transfers,
            "images": self.images,
            "bytes": self.bytes,
            "failures": self.failures,
            "delivered": self.delivered,
            "median_seconds": _rounded(self.median_seconds),
            "p95_seconds": _rounded(self.p95_seconds),
        }


@dataclass(frozen=True)
class StatsGroup:
    """One peer, month ("YYYY-MM", local time) or route ("-": not through the gateway) of a :class:`StatsReport`."""

    key: str
    sent: StatsFigures
    received: StatsFigures

    def to_json(self) -> dict[str, object]:
        return {"group": self.key, "sent": self.sent.to_json(), "received": self.received.to_json()}


#: The columns of :meth:`StatsReport.csv_rows` after the group's own ("peer", "month" or "route").
CSV_FIGURES = ("transfers", "images", "bytes", "failures", "delivered", "median_seconds", "p95_seconds")


@dataclass(frozen=True)
class StatsReport:
    """What :meth:`Operations.stats` counted: one :class:`StatsGroup` per key, and the total.

    ``since`` and ``until`` are the period asked for (None: open), timezone-aware;
    a transfer counts by when it was created, a received set by when its
    first part arrived; ``until`` is exclusive.
    """

    by: str
    since: datetime | None
    until: datetime | None
    groups: tuple[StatsGroup, ...]
    total: StatsGroup

    def to_json(self) -> dict[str, object]:
        """What ``dicommail stats --json`` prints: times in ISO 8601 with offset, None for absent values."""
        return {
            "ok": True,
            "by": self.by,
            "since": self.since.isoformat() if self.since is not None else None,
            "until": self.until.isoformat() if self.until is not None else None,
            "groups": [g.to_json() for g in self.groups],
            "total": self.total.to_json(),
        }

    def csv_header(self) -> list[str]:
        """The header row of ``dicommail stats --csv``."""
        return [self.by, *(f"{side}_{name}" for side in ("sent", "received") for name in CSV_FIGURES)]

    def csv_rows(self) -> list[list[object]]:
        """One row per group (no total), in :meth:`csv_header`'s order; an absent time is ''."""
        rows: list[list[object]] = []
        for group in self.groups:
            row: list[object] = [group.key]
            for figures in (group.sent, group.received):
                data = figures.to_json()
                row.extend("" if data[name] is None else data[name] for name in CSV_FIGURES)
            rows.append(row)
        return rows


@dataclass
class _Item:
    key: str
    images: int
    bytes: int
    failed: bool
    seconds: float | None  # delivered ones only


def percentile(values: Sequence[float], fraction: float) -> float | None:
    """The ``fraction`` quantile of ``values``, interpolated linearly between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _figures(items: Sequence[_Item]) -> StatsFigures:
    times = [i.seconds for i in items if i.seconds is not None]
    return StatsFigures(
        transfers=len(items),
        images=sum(i.images for i in items),
        bytes=sum(i.bytes for i in items),
        failures=sum(1 for i in items if i.failed),
        delivered=len(times),
        median_seconds=percentile(times, 0.5),
        p95_seconds=percentile(times, 0.95),
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _month(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m")  # local time, as the admin reads the calendar


# Constancy check test sets are no studies: they are left out of the statistics.
_SENT_STATS_SQL = """
SELECT t.recipient, t.status, t.created_at, COALESCE(k.images, t.files) AS images, k.transfer_seconds,
       (SELECT COALESCE(SUM(m.size), 0) FROM outbound_mails m WHERE m.transfer_id = t.id) AS wire_bytes,
       (SELECT g.route FROM gateway_transfers gt JOIN gateway_studies g ON g.id = gt.study_id
            WHERE gt.transfer_id = t.id ORDER BY g.id LIMIT 1) AS route
FROM transfers t LEFT JOIN transfer_tracking k ON k.transfer_id = t.id
WHERE NOT EXISTS (SELECT 1 FROM constancy_checks c WHERE c.transfer_id = t.id)
    AND t.created_at >= ? AND t.created_at < ?
"""

_RECEIVED_STATS_SQL = """
SELECT s.sender, s.signer, s.status, s.first_seen_at, s.delivered_at,
       (SELECT COUNT(*) FROM forwarded_instances f WHERE f.set_ref = s.id AND f.state = 'stored') AS images,
       (SELECT COALESCE(SUM(m.size), 0) FROM inbound_mails m WHERE m.set_ref = s.id) AS wire_bytes,
       (SELECT MIN(m.received_at) FROM inbound_mails m WHERE m.set_ref = s.id) AS first_received_at
FROM inbound_sets s
WHERE NOT EXISTS (SELECT 1 FROM notifications n WHERE n.set_ref = s.id AND instr(n.report, '"constancy"') > 0)
    AND s.first_seen_at >= ? AND s.first_seen_at < ?
"""


class Operations(SiteBase):
    """Methods of :class:`dicommail.Site` for running it for months: retention and statistics."""

    def cleanup(self, *, dry_run: bool = False) -> CleanupReport:
        """Remove the spool's files of finished work after ``[retention]``'s days (see :func:`run_cleanup`).

        ``dry_run`` removes nothing and reports what would go now.  Records in
        ``state.db`` stay.  The running receiver and gateway do this once an
        hour by themselves.
        """
        with self._database() as db:
            return run_cleanup(self.config, db, dry_run=dry_run)

    def stats(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        by: Literal["peer", "month", "route"] | str = "peer",
    ) -> StatsReport:
        """Transfers sent and sets received, per peer, month or route, with images, bytes, failures and times.

        A sent transfer counts from when it was created, a received set from
        when its first part arrived: at or after ``since``, before ``until``
        (naive datetimes are local time).  Peers are the recipients of sent
        transfers and the (certified) senders of received sets; months are
        local; routes are the gateway's (``"-"`` for transfers sent otherwise,
        and for everything received).  Constancy check test sets are left out.

        Raises :class:`~dicommail.errors.InputError` for an unknown ``by`` or a
        period that ends before it starts.
        """
        if by not in STATS_GROUPINGS:
            raise InputError(f"cannot group statistics by {by!r}", f"use one of: {', '.join(STATS_GROUPINGS)}")
        start = _aware(since)
        end = _aware(until)
        if start is not None and end is not None and end <= start:
            raise InputError("the period ends before it starts", "give an --until later than --since")
        low = start.timestamp() if start is not None else -math.inf
        high = end.timestamp() if end is not None else math.inf
        with self._database() as db:
            sent_rows = db.query(_SENT_STATS_SQL, (low, high))
            received_rows = db.query(_RECEIVED_STATS_SQL, (low, high))
        sent = [_sent_item(row, by) for row in sent_rows]
        received = [_received_item(row, by) for row in received_rows]
        by_key: dict[str, tuple[list[_Item], list[_Item]]] = {}
        for side, items in ((0, sent), (1, received)):
            for item in items:
                by_key.setdefault(item.key, ([], []))[side].append(item)
        groups = tuple(StatsGroup(key, _figures(by_key[key][0]), _figures(by_key[key][1])) for key in sorted(by_key))
        return StatsReport(by, start, end, groups, StatsGroup("total", _figures(sent), _figures(received)))


def _aware(moment: datetime | None) -> datetime | None:
    """A naive datetime is local time; the report shows it with its offset."""
    if moment is None:
        return None
    return moment.astimezone() if moment.tzinfo is None else moment


def _sent_item(row: sqlite3.Row, by: str) -> _Item:
    key = row["recipient"].lower() if by == "peer" else _month(row["created_at"]) if by == "month" else (
        row["route"] or "-")
    delivered = row["status"] == "delivered" and row["transfer_seconds"] is not None
    return _Item(key, row["images"] or 0, row["wire_bytes"] or 0, row["status"] in _SENT_FAILURES,
                 float(row["transfer_seconds"]) if delivered else None)


def _received_item(row: sqlite3.Row, by: str) -> _Item:
    if by == "peer":
        key = (row["sender"] or "").lower() or row["signer"] or "-"
    else:
        key = _month(row["first_seen_at"]) if by == "month" else "-"
    seconds = None
    if row["status"] == "delivered" and row["delivered_at"] is not None:
        began = row["first_received_at"] if row["first_received_at"] is not None else row["first_seen_at"]
        seconds = max(0.0, float(row["delivered_at"]) - float(began))
    return _Item(key, row["images"] or 0, row["wire_bytes"] or 0, row["status"] in _RECEIVED_FAILURES, seconds)
