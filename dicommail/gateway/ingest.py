"""Durable reception: each pushed instance is on disk and in ``state.db`` before the PACS hears "success".

An instance is written as a DICOM Part 10 file exactly as it arrived (the
encoded data set the PACS sent, behind a File Meta header) under its final
name in ``spool/gateway/received/`` and fsynced; only then is its row
committed.  That is the one durable step per instance: one file fsync, one
journal commit -- no temporary name, rename and folder fsync (see
:func:`~dicommail.store.files.write_durable`).  A row always names a complete
file.  A file without a row was never confirmed -- the PACS was not told
"success" and sends it again -- and may be half-written: it is never packed,
and :meth:`Ingest.recover` removes it before the gateway listens again.

The file's name does not depend on the study (``<SOP Instance UID>.<random>.dcm``),
so its write and fsync can start before the object is read: :meth:`Ingest.write`
runs them in a worker thread while the association's thread hashes the
object, checks it and finds its study; :meth:`Ingest.store` then waits for
the fsync and commits.  Rows of concurrent associations share one commit
(:class:`_GroupCommit`).

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

import contextlib
import hashlib
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dicommail.errors import InputError, StateError
from dicommail.store.db import Database
from dicommail.store.files import write_durable
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
    duplicate: bool  # the study already had this instance: nothing of it is kept
    #: For an instance accepted before within the duplicate window: when (it is not sent again).
    accepted_before: float | None = None
    #: A duplicate whose content differs from the copy kept (a corrected object sent too soon).
    changed: bool = False


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


class _Job:
    def __init__(self, work: Callable[[sqlite3.Connection], Stored | None]) -> None:
        self.work = work
        self.done = False
        self.result: Stored | None = None
        self.error: BaseException | None = None


class _GroupCommit:
    """Commits the rows of concurrent stores together: one transaction, one journal fsync for all.

    Each caller returns only once the transaction holding its row is
    committed, so "fsync before success" holds for every instance; while one
    commit is under way, the rows of other associations collect for the next.
    Each row goes in a savepoint of its own: one that fails (the same instance
    from two associations at once) leaves the others alone.
    """

    def __init__(self, db: Database) -> None:
        self._db = db
        self._changed = threading.Condition()
        self._pending: list[_Job] = []
        self._committing = False

    def run(self, work: Callable[[sqlite3.Connection], Stored | None]) -> Stored | None:
        """``work`` executed and committed; what it returned, or what it (or the commit) raised."""
        job = _Job(work)
        with self._changed:
            self._pending.append(job)
            while self._committing and not job.done:
                self._changed.wait()
            lead = not job.done  # then this thread commits what is pending, its own row included
            if lead:
                batch, self._pending = self._pending, []
                self._committing = True
        if lead:
            try:
                self._commit(batch)
            finally:
                with self._changed:
                    self._committing = False
                    self._changed.notify_all()
        if job.error is not None:
            raise job.error
        return job.result

    def _commit(self, batch: list[_Job]) -> None:
        alone = len(batch) == 1  # the common case: its failure may undo the whole transaction
        try:
            with self._db.transaction() as conn:
                for job in batch:
                    if alone:
                        job.result = job.work(conn)
                        continue
                    conn.execute("SAVEPOINT instance")
                    try:
                        job.result = job.work(conn)
                    except Exception as exc:
                        conn.execute("ROLLBACK TO instance")
                        job.error = exc
                    conn.execute("RELEASE instance")
        except BaseException as exc:  # nothing of the batch was committed
            for job in batch:
                job.result, job.error = None, job.error or exc
            raise
        finally:
            for job in batch:
                job.done = True


class Written:
    """An instance's file being written and fsynced (:meth:`Ingest.write`), and its content's digest."""

    def __init__(self, path: Path, done: Future[None], digest: str) -> None:
        self.path = path
        self._done = done
        self.digest = digest

    def wait(self) -> None:
        """Return once the file is durable; raises what writing it raised (``OSError``)."""
        self._done.result()

    def discard(self) -> None:
        """The instance is not kept: remove its file (once written, or failed)."""
        with contextlib.suppress(Exception):
            self._done.result()
        self.path.unlink(missing_ok=True)


#: Worker threads writing and fsyncing instance files (one per association at most is busy).
WRITERS = 16
#: Receiving studies whose ids are remembered (a stale one costs one more query, never a wrong row).
KNOWN_STUDIES = 1024


class Ingest:
    """Stores instances in the spool and the state database."""

    def __init__(self, db: Database, spool: Path, crash_hook: Callable[[str], None] | None = None,
                 duplicate_window: float = 0.0, min_free_space: int = 0) -> None:
        self.db = db
        self.root = spool / "gateway"
        self.received = self.root / "received"
        self._crash_hook = crash_hook or (lambda _step: None)
        self.duplicate_window = duplicate_window
        #: ``retention.min_free_space``: below it nothing more is accepted (0: no guard).
        self.min_free_space = min_free_space
        self._writers = ThreadPoolExecutor(max_workers=WRITERS, thread_name_prefix="gateway-writer")
        self._commits = _GroupCommit(db)
        # (route, study UID) -> id of its receiving study, as last seen; checked by each commit.
        self._studies: OrderedDict[StudyKey, int] = OrderedDict()
        self._studies_lock = threading.Lock()

    def space_short(self) -> int | None:
        """The free bytes of the spool's file system if below :attr:`min_free_space`, else None."""
        from dicommail.site.operations import free_space_short  # the site layer imports the gateway

        return free_space_short(self.root, self.min_free_space)

    def study_dir(self, study_id: int) -> Path:
        """Where older versions kept a study's files (one folder per study)."""
        return self.root / f"{study_id:08d}"

    def write(self, sop_instance_uid: str, data: bytes) -> Written:
        """Start writing ``data`` (Part 10 bytes) durably, in a worker thread; pass the result to :meth:`store`.

        ``sop_instance_uid`` names the file: :class:`InputError` if it is no valid UID.
        """
        if not is_uid(sop_instance_uid):
            raise InputError("the instance has no valid SOP Instance UID",
                             "the sending node produced a malformed object")
        self._crash_hook("gateway-before-store")
        path = self.received / f"{sop_instance_uid}.{secrets.token_hex(6)}.dcm"
        done = self._writers.submit(write_durable, path, data)
        # Hashing lets go of the GIL: the writer gets it to start its syscalls, and its fsync
        # then runs while the caller reads the object (pure Python, which would hold the GIL).
        return Written(path, done, content_sha256(data))

    def store(self, item: Instance, now: Callable[[], float] = time.time, written: Written | None = None) -> Stored:
        """Record ``item`` once its file is durable; a repeated SOP Instance UID is not stored twice.

        ``written`` is the file :meth:`write` started for ``item.data``;
        without it the file is written here.  Not stored either: the same
        instance (UID and content) accepted for the same route within the
        duplicate window, in a study that did not fail.  Whatever is not
        stored, its file is removed.

        Raises ``OSError`` (disk full, permissions) or a database error: the
        caller answers "out of resources" and the PACS tries again later.
        """
        try:
            for name, uid in (("SOP Instance UID", item.sop_instance_uid), ("Study Instance UID", item.study_uid)):
                if not is_uid(uid):
                    raise InputError(f"the instance has no valid {name}",
                                     "the sending node produced a malformed object")
            if written is None:
                written = self.write(item.sop_instance_uid, item.data)
            at = now()
            stored = self._store(item, at, written)
        except BaseException:
            if written is not None:
                written.discard()
            raise
        if stored.duplicate:
            written.discard()
            if stored.accepted_before is not None:
                log.info("instance %s already accepted %.0f s ago (gateway study %d), same content: answered "
                         "success, not stored or sent again", item.sop_instance_uid,
                         at - stored.accepted_before, stored.study_id)
        else:
            self._crash_hook("gateway-after-store")
        return stored

    def _store(self, item: Instance, at: float, written: Written) -> Stored:
        digest = written.digest
        key = (item.route, item.study_uid)
        study_id = self._receiving_study(item, at)
        written.wait()  # durable before any row names it
        self._crash_hook("gateway-after-write")
        # A study found receiving may be completed before the row is committed (only when no
        # tracker holds it open, as in tests): the row then goes into a new study.
        for _attempt in range(3):

            def record(conn: sqlite3.Connection, study_id: int = study_id) -> Stored | None:
                return self._record(conn, item, study_id, written.path, digest, at)

            try:
                stored = self._commits.run(record)
            except sqlite3.IntegrityError:
                # The study has this instance already (a repeat, or two associations at once): the first stands.
                kept = self.db.query("SELECT sha256 FROM gateway_instances WHERE study_id = ? AND sop_instance_uid = ?",
                                     (study_id, item.sop_instance_uid))
                return Stored(study_id, duplicate=True, changed=bool(kept) and kept[0]["sha256"] != digest)
            if stored is not None:
                return stored
            with self._studies_lock:
                self._studies.pop(key, None)
            study_id = self._receiving_study(item, at)
        raise StateError(f"the gateway study of instance {item.sop_instance_uid} kept closing while it was stored",
                         "the PACS sends it again; report this if it persists")

    def _record(self, conn: sqlite3.Connection, item: Instance, study_id: int, path: Path, digest: str,
                at: float) -> Stored | None:
        """Within the commit: the instance's row, unless accepted before; None if the study no longer receives.

        Raises ``sqlite3.IntegrityError`` if the study has the instance already.
        """
        earlier = self._accepted_before(conn, item, digest, at)
        if earlier is not None:
            return Stored(earlier[0], duplicate=True, accepted_before=earlier[1])
        counted = conn.execute(
            "UPDATE gateway_studies SET instances = instances + 1, bytes = bytes + ?, last_received_at = ?,"
            " updated_at = ? WHERE id = ? AND status = ?",
            (len(item.data), at, at, study_id, RECEIVING),
        ).rowcount
        if not counted:
            return None
        conn.execute(
            "INSERT INTO gateway_instances (study_id, sop_instance_uid, sop_class_uid, transfer_syntax,"
            " path, size, received_at, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (study_id, item.sop_instance_uid, item.sop_class_uid, item.transfer_syntax, str(path),
             len(item.data), at, digest),
        )
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

    def _receiving_study(self, item: Instance, at: float) -> int:
        """The id of the study receiving ``item`` (as last seen), opened if there is none."""
        key = (item.route, item.study_uid)
        with self._studies_lock:
            study_id = self._studies.get(key)
            if study_id is not None:
                self._studies.move_to_end(key)
                return study_id
        opened = False
        with self.db.transaction() as conn:
            row = conn.execute("SELECT id FROM gateway_studies WHERE route = ? AND study_uid = ? AND status = ?",
                               (item.route, item.study_uid, RECEIVING)).fetchone()
            if row is not None:
                study_id = int(row["id"])
            else:
                cursor = conn.execute(
                    "INSERT INTO gateway_studies (route, study_uid, status, calling_aet, peer, first_received_at,"
                    " last_received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (item.route, item.study_uid, RECEIVING, item.calling_aet, item.peer, at, at, at),
                )
                assert cursor.lastrowid is not None
                study_id, opened = cursor.lastrowid, True
        if opened:
            log.info("study %s: receiving for route %s from %s (%s)", item.study_uid, item.route, item.calling_aet,
                     item.peer)
        with self._studies_lock:
            self._studies[key] = study_id
            while len(self._studies) > KNOWN_STUDIES:
                self._studies.popitem(last=False)
        return study_id

    def remove_files(self, study_id: int) -> None:
        """Delete a queued study's received files: its sets carry them now."""
        for row in self.db.query("SELECT path FROM gateway_instances WHERE study_id = ?", (study_id,)):
            Path(row["path"]).unlink(missing_ok=True)
        shutil.rmtree(self.study_dir(study_id), ignore_errors=True)

    def recover(self) -> None:
        """At start-up, before listening: make the spool agree with the rows.

        Removes the files that no row names (written when a crash came, never
        confirmed to the PACS).  A row of a study still to be sent whose file
        is missing or of another size -- only a file system that lost a
        completed fsync does that -- is dropped with an error in the log, so
        that the rest of its study can still go out.
        """
        rows = self.db.query(
            "SELECT i.study_id, i.sop_instance_uid, i.path, i.size, s.status FROM gateway_instances i"
            " JOIN gateway_studies s ON s.id = i.study_id WHERE s.status != ?", (SENT,))
        named = {Path(row["path"]).name for row in rows}
        orphans = []
        if self.received.is_dir():
            orphans = [Path(entry.path) for entry in os.scandir(self.received)
                       if entry.name not in named and not entry.is_dir(follow_symlinks=False)]
        for orphan in orphans:
            orphan.unlink(missing_ok=True)
        if orphans:
            log.info("removed %d instance file(s) received but never confirmed (a crash came between)", len(orphans))
        lost: dict[int, list[sqlite3.Row]] = {}
        for row in rows:
            if row["status"] in (RECEIVING, COMPLETE, PACKING) and _size(Path(row["path"])) != row["size"]:
                lost.setdefault(int(row["study_id"]), []).append(row)
        for study_id, missing in lost.items():
            self._drop_lost(study_id, str(missing[0]["status"]), missing)

    def _drop_lost(self, study_id: int, status: str, lost: list[sqlite3.Row]) -> None:
        for row in lost:
            log.error("gateway study %d: the file of instance %s, confirmed to the PACS, is missing or "
                      "incomplete (the file system lost it); the study goes out without it: send it again "
                      "from the PACS", study_id, row["sop_instance_uid"])
        at = time.time()
        with self.db.transaction() as conn:
            conn.executemany("DELETE FROM gateway_instances WHERE study_id = ? AND sop_instance_uid = ?",
                             [(study_id, row["sop_instance_uid"]) for row in lost])
            conn.execute("UPDATE gateway_studies SET instances = instances - ?, bytes = bytes - ?, updated_at = ?"
                         " WHERE id = ?", (len(lost), sum(int(row["size"]) for row in lost), at, study_id))
            if status != RECEIVING:  # a receiving study left empty is removed when it goes idle
                conn.execute("UPDATE gateway_studies SET status = ?, error = ? WHERE id = ? AND instances <= 0",
                             (FAILED, "its received files were lost", study_id))


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None
