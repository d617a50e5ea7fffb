"""Durable reception: each pushed instance is on disk and in ``state.db`` before the PACS hears "success".

An instance is written as a DICOM Part 10 file exactly as it arrived (the
encoded data set the PACS sent, behind a File Meta header), through a
temporary file that is fsynced and renamed into ``spool/gateway/<study>/``;
only then is its row committed.  A file without a row is an orphan of a crash
and is never used; a row always names a complete file.

Instances are grouped into studies per route (the called AE title): the
instances of one Study Instance UID pushed to one route collect in one
"receiving" study until it goes quiet (see :class:`StudyTracker`); a later
push of the same study opens a new one and is sent again -- except for
instances already accepted for that route within ``gateway.duplicate_window``
with the same content (SHA-256 of the data set): the PACS repeats a C-STORE
whose "success" a crash lost, and is told "success" again without the
instance travelling twice.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from dicommail.errors import InputError
from dicommail.store.db import Database
from dicommail.store.files import atomic_writer
from dicommail.wire.headers import is_uid

log = logging.getLogger("dicommail.gateway")

RECEIVING = "receiving"
COMPLETE = "complete"
PACKING = "packing"
QUEUED = "queued"
SENT = "sent"
FAILED = "failed"


@dataclass(frozen=True)
class Instance:
    """One received C-STORE: identifiers and the Part 10 bytes to keep."""

    route: str
    calling_aet: str
    peer: str
    study_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    data: bytes


@dataclass(frozen=True)
class Stored:
    study_id: int
    duplicate: bool  # the study already had this instance: nothing was written
    #: For an instance accepted before within the duplicate window: when (it is not sent again).
    accepted_before: float | None = None


def content_sha256(part10: bytes) -> str:
    """SHA-256 (hex) of a Part 10 object's data set: the bytes after its file meta information.

    The file meta information is the gateway's own wrapping (it names the
    calling node, the implementation): the same image pushed again by
    another node or through another gateway version has the same digest.
    """
    start = 0
    # Preamble, "DICM", then (0002,0000) UL with the group's length (always written first).
    if len(part10) >= 144 and part10[128:136] == b"DICM\x02\x00\x00\x00":
        start = 144 + int.from_bytes(part10[140:144], "little")
    return hashlib.sha256(memoryview(part10)[start:]).hexdigest()  # a view: no copy of a large image


StudyKey = tuple[str, str]  # (route, study UID)


class StudyTracker:
    """Which receiving studies are still busy: an open association carries them, or one did recently.

    A study counts as complete once no association that carried it is open
    and nothing arrived for it for ``idle_seconds``: PACSs often send one study
    over several associations, one after the other.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.lock = threading.Lock()
        self._clock = clock
        self._open: dict[StudyKey, set[int]] = {}
        self._last: dict[StudyKey, float] = {}

    def begin(self, key: StudyKey, association: int) -> None:
        """An association is about to store an instance of ``key``: the study stays open while it lasts."""
        with self.lock:
            self._open.setdefault(key, set()).add(association)
            self._last[key] = self._clock()

    def end_association(self, association: int) -> None:
        """An association ended (released, aborted or dropped): its studies' idle time starts now."""
        with self.lock:
            now = self._clock()
            for key, carriers in list(self._open.items()):
                if association in carriers:
                    carriers.discard(association)
                    self._last[key] = now
                    if not carriers:
                        del self._open[key]

    def restart(self, keys: Iterable[StudyKey]) -> None:
        """After a restart: the idle time of studies still receiving starts anew."""
        with self.lock:
            now = self._clock()
            for key in keys:
                self._last[key] = now

    def is_idle(self, key: StudyKey, idle_seconds: float) -> bool:
        """Call with :attr:`lock` held, and mark the study complete before releasing it."""
        if self._open.get(key):
            return False
        last = self._last.get(key)
        return last is None or self._clock() - last >= idle_seconds

    def forget(self, key: StudyKey) -> None:
        """Call with :attr:`lock` held, once the study is no longer receiving."""
        self._last.pop(key, None)


class Ingest:
    """Stores instances in the spool and the state database."""

    def __init__(self, db: Database, spool: Path, crash_hook: Callable[[str], None] | None = None,
                 duplicate_window: float = 0.0, min_free_space: int = 0) -> None:
        self.db = db
        self.root = spool / "gateway"
        self._crash_hook = crash_hook or (lambda _step: None)
        self.duplicate_window = duplicate_window
        #: ``retention.min_free_space``: below it nothing more is accepted (0: no guard).
        self.min_free_space = min_free_space

    def space_short(self) -> int | None:
        """The free bytes of the spool's file system if below :attr:`min_free_space`, else None."""
        from dicommail.site.operations import free_space_short  # the site layer imports the gateway

        return free_space_short(self.root, self.min_free_space)

    def study_dir(self, study_id: int) -> Path:
        return self.root / f"{study_id:08d}"

    def store(self, item: Instance, now: Callable[[], float] = time.time) -> Stored:
        """Write ``item`` durably and record it; a repeated SOP Instance UID is not stored twice.

        Not stored either: the same instance (UID and content) accepted for the
        same route within the duplicate window, in a study that did not fail.

        Raises ``OSError`` (disk full, permissions) or a database error: the
        caller answers "out of resources" and the PACS tries again later.
        """
        for name, uid in (("SOP Instance UID", item.sop_instance_uid), ("Study Instance UID", item.study_uid)):
            if not is_uid(uid):
                raise InputError(f"the instance has no valid {name}", "the sending node produced a malformed object")
        at = now()
        digest = content_sha256(item.data)
        with self.db.transaction() as conn:
            earlier = self._accepted_before(conn, item, digest, at)
            if earlier is not None:
                study_id, accepted_at = earlier
                log.info("instance %s already accepted %.0f s ago (gateway study %d), same content: answered "
                         "success, not stored or sent again", item.sop_instance_uid, at - accepted_at, study_id)
                return Stored(study_id, duplicate=True, accepted_before=accepted_at)
            study_id = self._receiving_study(conn, item, at)
            known = conn.execute(
                "SELECT 1 FROM gateway_instances WHERE study_id = ? AND sop_instance_uid = ?",
                (study_id, item.sop_instance_uid),
            ).fetchone()
        if known:
            return Stored(study_id, duplicate=True)
        path = self.study_dir(study_id) / f"{item.sop_instance_uid}.dcm"
        self._crash_hook("gateway-before-store")
        with atomic_writer(path) as handle:
            handle.write(item.data)
        with self.db.transaction() as conn:
            try:
                conn.execute(
                    "INSERT INTO gateway_instances (study_id, sop_instance_uid, sop_class_uid, transfer_syntax,"
                    " path, size, received_at, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (study_id, item.sop_instance_uid, item.sop_class_uid, item.transfer_syntax, str(path),
                     len(item.data), at, digest),
                )
            except sqlite3.IntegrityError:
                # The same instance arrived twice at once (two associations): the first row stands.
                return Stored(study_id, duplicate=True)
            conn.execute(
                "UPDATE gateway_studies SET instances = instances + 1, bytes = bytes + ?, last_received_at = ?,"
                " updated_at = ? WHERE id = ?",
                (len(item.data), at, at, study_id),
            )
        self._crash_hook("gateway-after-store")
        return Stored(study_id, duplicate=False)

    def _accepted_before(self, conn: sqlite3.Connection, item: Instance, digest: str, at: float
                         ) -> tuple[int, float] | None:
        """(study id, time) of the same instance accepted for this route within the window, if any.

        A study that failed never left: what it held may come again and go out.
        The study still receiving is left to :meth:`store`'s own check (any
        repeat of a UID there is tolerated, whatever its content).
        """
        if self.duplicate_window <= 0:
            return None
        row = conn.execute(
            "SELECT i.study_id, i.received_at FROM gateway_instances i JOIN gateway_studies s ON s.id = i.study_id"
            " WHERE i.sop_instance_uid = ? AND i.sha256 = ? AND s.route = ? AND s.status NOT IN (?, ?)"
            " AND i.received_at >= ? ORDER BY i.received_at DESC LIMIT 1",
            (item.sop_instance_uid, digest, item.route, FAILED, RECEIVING, at - self.duplicate_window),
        ).fetchone()
        return None if row is None else (int(row["study_id"]), float(row["received_at"]))

    def _receiving_study(self, conn: sqlite3.Connection, item: Instance, at: float) -> int:
        row = conn.execute(
            "SELECT id FROM gateway_studies WHERE route = ? AND study_uid = ? AND status = ?",
            (item.route, item.study_uid, RECEIVING),
        ).fetchone()
        if row is not None:
            return int(row["id"])
        cursor = conn.execute(
            "INSERT INTO gateway_studies (route, study_uid, status, calling_aet, peer, first_received_at,"
            " last_received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (item.route, item.study_uid, RECEIVING, item.calling_aet, item.peer, at, at, at),
        )
        assert cursor.lastrowid is not None
        log.info("study %s: receiving for route %s from %s (%s)", item.study_uid, item.route, item.calling_aet,
                 item.peer)
        return cursor.lastrowid

    def remove_files(self, study_id: int) -> None:
        """Delete a queued study's received files: its sets carry them now."""
        shutil.rmtree(self.study_dir(study_id), ignore_errors=True)
