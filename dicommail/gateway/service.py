"""The gateway's loop: complete idle studies, pack them per recipient into the outbox, send.

Threads and tasks:

* pynetdicom serves each association in its own thread (:mod:`.scp`);
  instances are durable before their success status goes back.
* One asyncio loop (this module) checks twice a second for studies that went
  idle, and runs up to ``gateway.max_parallel_studies`` study jobs at once.
  A job packs the study for each recipient of its route (gpg, in a worker
  thread), queues each set with :func:`~dicommail.sender.outbox.queue_set`
  and sends it with :func:`~dicommail.sender.outbox.send_pending`.
* Every ``gateway.send_interval`` seconds the loop also sends whatever else
  the outbox holds that is due, and it wakes earlier when a failed mail's retry
  falls due: after a temporary SMTP failure a mail waits ``send_interval``
  seconds, then twice as long after each further failure, at most 30 minutes
  (:func:`~dicommail.sender.outbox.retry_delay`), for ``smtp.max_attempts``
  tries.

Crash safety: every state change is one committed transaction, in order
``receiving → complete → packing → queued → sent``.  After a restart,
receiving studies restart their idle time, complete/packing ones are packed
again (recipients whose set was already queued are skipped, their
``gateway_transfers`` row being committed with the set itself), and queued
mails are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import shutil
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from dicommail.config import Config
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.dicom import DicomFile, read_dicom_info
from dicommail.errors import ConfigError, DicommailError, GatewayLockedError, InputError, TransportError
from dicommail.gateway.ingest import (
    COMPLETE,
    FAILED,
    PACKING,
    QUEUED,
    RECEIVING,
    SENT,
    Ingest,
    StudyTracker,
)
from dicommail.gateway.scp import StoreService
from dicommail.sender.outbox import ClientFactory, next_attempt_due, queue_set, retry_delay, send_pending, sender_lock
from dicommail.sender.packing import pack_options, sender_address
from dicommail.sender.tracking import record_study_details
from dicommail.store.db import Database
from dicommail.store.files import pid_lock
from dicommail.transport.smtp import SmtpClient
from dicommail.wire.pack import Packer

log = logging.getLogger("dicommail.gateway")

#: How often the loop looks for idle studies.
TICK = 0.5
#: On SIGTERM, associations in progress get this long to finish before they are aborted.
SHUTDOWN_GRACE = 10.0
#: A study whose objects failed packing this many times in a row is marked failed instead of retried.
MAX_PACK_ATTEMPTS = 5


@contextlib.contextmanager
def gateway_lock(home: Path) -> Iterator[None]:
    """Hold ``<home>/gateway.lock``, or fail at once if another gateway runs for this home."""
    with pid_lock(home / "gateway.lock") as locked:
        if not locked:
            raise GatewayLockedError(
                f"another gateway is running for {home}", "run one gateway per home; stop the other one"
            )
        yield


def recipient_key(recipient: str) -> str:
    """A short, stable, file-name-safe key of a recipient's address (case-insensitive)."""
    return hashlib.sha256(recipient.strip().lower().encode("utf-8")).hexdigest()[:16]


class _OutboxLock:
    """The outbox's cross-process lock, shared by this process's concurrent sends.

    The first send of this process takes :func:`sender_lock` (so a ``dicommail
    send --pending`` from cron never sends the same mails), the last one
    releases it; the sends in between touch disjoint transfers.
    """

    def __init__(self, spool: Path) -> None:
        self._spool = spool
        self._users = 0
        self._held: contextlib.AbstractContextManager[None] | None = None
        self._mutex = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        async with self._mutex:
            if self._users == 0:
                held: contextlib.AbstractContextManager[None] = sender_lock(
                    self._spool, on_wait=lambda: log.info("waiting for another sender to finish")
                )
                await asyncio.to_thread(held.__enter__)
                self._held = held
            self._users += 1
        try:
            yield
        finally:
            async with self._mutex:
                self._users -= 1
                if self._users == 0 and self._held is not None:
                    held, self._held = self._held, None
                    held.__exit__(None, None, None)


class Gateway:
    """One gateway for one home: DICOM in, DICOM-Mail out."""

    def __init__(
        self,
        config: Config,
        db: Database,
        keyring: Keyring,
        *,
        client_factory: ClientFactory | None = None,
        crash_hook: Callable[[str], None] | None = None,
        stop: asyncio.Event | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        """``now`` is the clock of the sending schedule (a test's own, or wall-clock time)."""
        if not config.routes:
            raise ConfigError(
                "no routes are configured",
                'add a [routes."AETITLE"] table with the recipients for each DICOM node the PACS sends to',
            )
        self.config = config
        self.db = db
        self.keyring = keyring
        self._crash_hook = crash_hook or (lambda _step: None)
        self._now = now
        if client_factory is None:
            SmtpClient.from_config(config)  # a bad [smtp] section fails at start-up, not at the first study

            def client_factory() -> SmtpClient:
                return SmtpClient.from_config(config)

        self._client_factory = client_factory
        self.tracker = StudyTracker()
        self.ingest = Ingest(db, config.spool, self._crash_hook,
                             duplicate_window=float(config.gateway.duplicate_window),
                             min_free_space=config.retention.min_free_space)
        self.service = StoreService(config.gateway, config.routes, self.ingest, self.tracker)
        #: Set it (a signal handler, or the program that runs this gateway) to stop cleanly.
        self.stop = stop if stop is not None else asyncio.Event()
        self._ready: list[int] = []  # studies to pack, oldest first
        self._jobs: dict[int, asyncio.Task[None]] = {}
        self._not_before: dict[int, float] = {}  # study -> when a failed packing may be tried again
        self._pack_failures: dict[int, int] = {}  # study -> packing attempts that failed in a row
        self._setup_waits: dict[int, int] = {}  # study -> packing attempts that wait for this site (a key, the disk)
        self._sending: set[int] = set()  # transfers a task is sending right now
        self._outbox_lock = _OutboxLock(config.spool / "outbox")
        self._retry_task: asyncio.Task[None] | None = None
        self._next_retry = 0.0  # by self._now, as the outbox's next_attempt_at
        self._cleanup_task: asyncio.Task[None] | None = None
        self._next_cleanup = 0.0  # retention clean-up: at start, then hourly
        self._sender = ""

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until :attr:`stop` is set (SIGTERM), then stop cleanly."""
        self._sender = sender_address(self.config, own_key(self.keyring, self.config.identity.key))
        self._recover()
        try:
            self.service.start()
        except OSError as exc:
            port = self.config.gateway.port
            if exc.errno in (errno.EACCES, errno.EPERM) and port < 1024:
                hint = (f"port {port} is privileged: give the service CAP_NET_BIND_SERVICE (the commented "
                        "AmbientCapabilities= line in examples/systemd/dicommail-gateway.service, see "
                        "docs/install.md), or use a port of 1024 or above, e.g. 11112")
            else:
                hint = "check gateway.host and gateway.port; is another gateway or DICOM node using the port?"
            raise ConfigError(
                f"cannot listen on {self.config.gateway.host}:{port}: {exc.strerror or exc}", hint,
            ) from exc
        gw = self.config.gateway
        log.info("listening on AE %s at %s port %d; routes: %s", gw.aet, gw.host, gw.port,
                 ", ".join(self.config.routes))
        self._warn_unusable_routes()
        try:
            while not self.stop.is_set():
                self._tick()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stop.wait(), timeout=TICK)
        finally:
            await self._shutdown()

    def _warn_unusable_routes(self) -> None:
        """Say at start-up which routes cannot send now: their studies are accepted, then wait."""
        from dicommail.checks import recipient_problem  # check's module; only its key test is needed

        for aet, route in self.config.routes.items():
            for recipient in route.recipients:
                problem = recipient_problem(self.keyring, recipient)
                if problem is not None:
                    log.error("route %s cannot send to %s: %s (%s); its studies are accepted and wait until "
                              "this is fixed", aet, recipient, problem.message, problem.hint)

    def _tick(self) -> None:
        """One round of the loop's work; an error in it (a locked database, a full disk) is logged, not fatal."""
        for step in (self._complete_idle_studies, self._start_jobs, self._start_retry, self._start_cleanup):
            try:
                step()
            except (sqlite3.Error, OSError, DicommailError) as exc:
                detail = exc.message if isinstance(exc, DicommailError) else f"{type(exc).__name__}: {exc}"
                log.error("gateway loop: %s failed: %s; trying again", step.__name__.lstrip("_"), detail)
            except Exception:
                log.exception("gateway loop: %s failed unexpectedly; trying again", step.__name__.lstrip("_"))

    async def _shutdown(self) -> None:
        log.info("stopping: no new associations; finishing the current steps")
        self.service.stop_listening()
        deadline = time.monotonic() + SHUTDOWN_GRACE
        while self.service.active_associations() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self.service.active_associations():
            log.warning("aborting %d association(s) still open; the sender retries what was not confirmed",
                        self.service.active_associations())
            self.service.abort_all()
        tasks = [*self._jobs.values(), *(t for t in (self._retry_task, self._cleanup_task) if t is not None)]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        log.info("gateway stopped")

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, signum)

    def _request_stop(self, signum: int) -> None:
        log.info("received %s: finishing the current step, then stopping", signal.Signals(signum).name)
        self.stop.set()

    # -- start-up ----------------------------------------------------------------------

    def _recover(self) -> None:
        rows = self.db.query("SELECT id, route, study_uid, status FROM gateway_studies WHERE status IN (?, ?, ?, ?)",
                             (RECEIVING, COMPLETE, PACKING, QUEUED))
        receiving = [(row["route"], row["study_uid"]) for row in rows if row["status"] == RECEIVING]
        self.tracker.restart(receiving)
        self._ready = [row["id"] for row in rows if row["status"] in (COMPLETE, PACKING)]
        for row in rows:
            if row["status"] == QUEUED:
                self.ingest.remove_files(row["id"])  # a crash hit between queueing and this clean-up
        if rows:
            log.info("resuming: %d study(s) receiving, %d to pack, %d queued", len(receiving), len(self._ready),
                     sum(1 for row in rows if row["status"] == QUEUED))

    # -- completion ----------------------------------------------------------------------

    def _complete_idle_studies(self) -> None:
        rows = self.db.query("SELECT id, route, study_uid, instances FROM gateway_studies WHERE status = ?",
                             (RECEIVING,))
        idle = float(self.config.gateway.study_idle_seconds)
        for row in rows:
            key = (row["route"], row["study_uid"])
            with self.tracker.lock:
                if not self.tracker.is_idle(key, idle):
                    continue
                at = time.time()
                with self.db.transaction() as conn:
                    if row["instances"] == 0:
                        # Only failed stores (each answered "out of resources"): nothing to send.
                        conn.execute("DELETE FROM gateway_studies WHERE id = ? AND instances = 0", (row["id"],))
                    else:
                        conn.execute(
                            "UPDATE gateway_studies SET status = ?, completed_at = ?, updated_at = ? WHERE id = ?"
                            " AND status = ?",
                            (COMPLETE, at, at, row["id"], RECEIVING),
                        )
                self.tracker.forget(key)
            if row["instances"] == 0:
                self.ingest.remove_files(row["id"])
                continue
            log.info("study %s complete: %d instance(s) for route %s", row["study_uid"], row["instances"],
                     row["route"])
            self._crash_hook("gateway-after-complete")
            self._ready.append(row["id"])

    def _start_jobs(self) -> None:
        now = time.monotonic()
        limit = self.config.gateway.max_parallel_studies
        for study_id in list(self._ready):
            if len(self._jobs) >= limit:
                break
            if self._not_before.get(study_id, 0.0) > now:
                continue
            self._ready.remove(study_id)
            task = asyncio.create_task(self._study_job(study_id), name=f"study-{study_id}")
            self._jobs[study_id] = task
            task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        for study_id, job in list(self._jobs.items()):
            if job is task:
                del self._jobs[study_id]

    # -- one study: pack, queue, send ----------------------------------------------------------

    async def _study_job(self, study_id: int) -> None:
        try:
            transfer_ids = await asyncio.to_thread(self._pack_study, study_id)
        except InputError as exc:
            # The study's own objects (unreadable, damaged): a bounded number of tries.
            failures = self._pack_failures.get(study_id, 0) + 1
            self._pack_failures[study_id] = failures
            if failures >= MAX_PACK_ATTEMPTS:
                log.error("study %d: packing failed %d times, giving up: %s (%s); the study is marked failed",
                          study_id, failures, exc.message, exc.hint)
                if self._pack_failed(study_id, FAILED, f"packing failed {failures} times: {exc.message}"):
                    self._pack_failures.pop(study_id, None)
                    self._setup_waits.pop(study_id, None)
                    self._not_before.pop(study_id, None)
                    return
            retry = float(self.config.gateway.send_interval)
            log.error("study %d: packing failed (%d of %d failures allowed): %s (%s); trying again in %.0f s",
                      study_id, failures, MAX_PACK_ATTEMPTS, exc.message, exc.hint, retry)
            self._retry_packing(study_id, exc.message, retry)
            return
        except Exception as exc:
            # Anything else is this site's to fix or passes by itself: a missing or uncertified key,
            # a wrong passphrase, a full disk (gpg's ENOSPC comes as a CryptoError), the database.
            # The PACS was told "success", so the study is never given up: it waits, retried with
            # the mails' back-off, until the cause is gone.
            known = isinstance(exc, (DicommailError, OSError, sqlite3.Error))
            message = exc.message if isinstance(exc, DicommailError) else (
                (getattr(exc, "strerror", None) or type(exc).__name__) if known else f"{type(exc).__name__}: {exc}")
            hint = exc.hint if isinstance(exc, DicommailError) else "check the spool's disk and the log"
            waits = self._setup_waits.get(study_id, 0) + 1
            self._setup_waits[study_id] = waits
            retry = retry_delay(waits, float(self.config.gateway.send_interval))
            log.error("study %d waits, not sent: %s (%s); it is kept (the PACS was told success) and tried "
                      "again in %.0f s", study_id, message, hint, retry, exc_info=not known)
            self._retry_packing(study_id, message, retry)
            return
        self._pack_failures.pop(study_id, None)
        self._setup_waits.pop(study_id, None)
        self._not_before.pop(study_id, None)
        if self.stop.is_set():
            return  # queued: sent after the restart
        await self._send(transfer_ids)

    def _retry_packing(self, study_id: int, message: str, after: float) -> None:
        self._pack_failed(study_id, COMPLETE, message)
        self._not_before[study_id] = time.monotonic() + after
        self._ready.append(study_id)

    def _pack_failed(self, study_id: int, status: str, message: str) -> bool:
        """Record a failed packing; False if even that failed (the database is locked, say)."""
        try:
            with self.db.transaction() as conn:
                conn.execute("UPDATE gateway_studies SET status = ?, error = ?, updated_at = ? WHERE id = ?",
                             (status, message, time.time(), study_id))
        except (sqlite3.Error, DicommailError) as exc:
            log.error("study %d: cannot record the failed packing: %s", study_id, exc)
            return False
        return True

    def _pack_study(self, study_id: int) -> list[int]:
        """Pack and queue the study for each recipient not yet queued; return all its transfer ids."""
        study = self.db.query("SELECT * FROM gateway_studies WHERE id = ?", (study_id,))[0]
        route = self.config.routes.get(study["route"])
        if route is None:
            raise ConfigError(
                f"study {study_id} arrived for route {study['route']}, which is no longer configured",
                f'add [routes."{study["route"]}"] back to the config',
            )
        with self.db.transaction() as conn:
            conn.execute("UPDATE gateway_studies SET status = ?, updated_at = ? WHERE id = ?",
                         (PACKING, time.time(), study_id))
        done = {row["recipient"] for row in self.db.query(
            "SELECT recipient FROM gateway_transfers WHERE study_id = ?", (study_id,))}
        todo = [r for r in route.recipients if r not in done]
        if todo:
            files = self._study_files(study_id)
            me = own_key(self.keyring, self.config.identity.key)
            for recipient in todo:
                options = pack_options(
                    self.config, me, self._sender, recipient, note=route.note, emergency=route.emergency,
                    max_mail_size=route.max_mail_size,
                )
                # A directory per study and recipient: what an interrupted packing left there is
                # never queued, so it is removed before packing again.
                # Named by the recipient, not its place in the route: reordered recipients keep their folders.
                out_dir = self.config.spool / "outbox" / f"gateway-{study_id:08d}-{recipient_key(recipient)}"
                shutil.rmtree(out_dir, ignore_errors=True)
                packed = Packer(self.keyring, options).pack(files, out_dir)
                self._crash_hook("gateway-after-pack")

                def record(conn: sqlite3.Connection, transfer_id: int, recipient: str = recipient) -> None:
                    conn.execute("INSERT INTO gateway_transfers (study_id, recipient, transfer_id) VALUES (?, ?, ?)",
                                 (study_id, recipient, transfer_id))
                    # Images, patient and study for `status` (--show-patient), as `send` records them.
                    record_study_details(conn, transfer_id, files)

                queue_set(self.db, packed, on_queued=record)
                log.info("study %s: set %s queued for %s (%d mail(s))", study["study_uid"], packed.set_id,
                         recipient, len(packed.mails))
        at = time.time()
        with self.db.transaction() as conn:
            conn.execute("UPDATE gateway_studies SET status = ?, queued_at = ?, error = NULL, updated_at = ?"
                         " WHERE id = ?", (QUEUED, at, at, study_id))
        self._crash_hook("gateway-after-queue")
        self.ingest.remove_files(study_id)
        return [row["transfer_id"] for row in self.db.query(
            "SELECT transfer_id FROM gateway_transfers WHERE study_id = ?", (study_id,))]

    def _study_files(self, study_id: int) -> list[DicomFile]:
        rows = self.db.query("SELECT path, sop_instance_uid FROM gateway_instances WHERE study_id = ?", (study_id,))
        files = [read_dicom_info(Path(row["path"]), f"instance {row['sop_instance_uid']}") for row in rows]
        files.sort(key=lambda f: (f.series_uid, f.instance_number, f.sop_instance_uid))
        return files

    # -- sending ---------------------------------------------------------------------------------

    async def _send(self, transfer_ids: list[int]) -> None:
        wanted = [t for t in transfer_ids if t not in self._sending]
        if not wanted:
            return
        self._sending.update(wanted)
        try:
            async with self._outbox_lock.hold():
                results = await send_pending(
                    self.db, self._client_factory, sender=self._sender, now=self._now,
                    max_attempts=self.config.smtp.max_attempts, transfer_ids=wanted,
                    retry_base=float(self.config.gateway.send_interval),
                )
            for result in results:
                if result.status == "failed":
                    log.error("set %s for %s failed: %s", result.set_id, result.recipient, result.error)
                elif result.waiting and result.sent_now == 0 and result.error and result.hint:
                    # (hint: the try failed in this run; a set not yet due again was logged when it failed)
                    log.warning("set %s for %s waits for a retry: %s", result.set_id, result.recipient, result.error)
        except TransportError as exc:
            log.error("sending failed: %s (%s); the sets stay queued", exc.message, exc.hint)
        except (DicommailError, sqlite3.Error, OSError) as exc:
            log.error("sending failed: %s; the sets stay queued", exc)
        finally:
            self._sending.difference_update(wanted)
            self._update_sent_studies()
            self._plan_retry()

    def _plan_retry(self) -> None:
        """Bring the next retry round forward to when the earliest waiting mail falls due.

        Only to a time still ahead: mails already due that a round did not send (the
        server refused our login, say) wait for the next round, not for the next tick.
        """
        try:
            due = next_attempt_due(self.db, self._now(), exclude=self._sending)
        except (sqlite3.Error, DicommailError) as exc:
            log.error("cannot read the outbox's retry times: %s; retrying every send_interval", exc)
            return
        if due is not None:
            self._next_retry = min(self._next_retry, due)

    def _start_retry(self) -> None:
        """Every send_interval, or when a retry falls due: send what no study job is sending."""
        now, interval = self._now(), float(self.config.gateway.send_interval)
        # A round planned more than an interval ahead means the clock was set back: go now.
        if now < self._next_retry <= now + interval or (self._retry_task is not None and not self._retry_task.done()):
            return
        self._next_retry = now + interval
        rows = self.db.query("SELECT id FROM transfers WHERE status IN ('queued', 'sending') ORDER BY id")
        ids = [row["id"] for row in rows if row["id"] not in self._sending]
        if ids:
            self._retry_task = asyncio.create_task(self._send(ids), name="retry")

    def _start_cleanup(self) -> None:
        """At start and once an hour: remove the spool's files of finished work (``[retention]``)."""
        from dicommail.site.operations import CLEANUP_INTERVAL, run_cleanup  # the site layer imports this module

        now = time.monotonic()
        if now < self._next_cleanup or (self._cleanup_task is not None and not self._cleanup_task.done()):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a tick outside the loop (a test driving it by hand): nothing to run the job in
        self._next_cleanup = now + CLEANUP_INTERVAL

        async def cleanup() -> None:
            try:
                await asyncio.to_thread(run_cleanup, self.config, self.db)
            except Exception as exc:  # housekeeping must never stop the gateway
                log.error("retention clean-up failed: %s; tried again in an hour", exc)

        self._cleanup_task = loop.create_task(cleanup(), name="cleanup")

    def _update_sent_studies(self) -> None:
        """Studies whose sets all went out are sent; one whose set failed for good is failed."""
        at = time.time()
        with self.db.transaction() as conn:
            rows = conn.execute(
                "SELECT g.study_id, MIN(t.status = 'sent') AS all_sent, MAX(t.status = 'failed') AS any_failed"
                " FROM gateway_transfers g JOIN transfers t ON t.id = g.transfer_id"
                " JOIN gateway_studies s ON s.id = g.study_id WHERE s.status = ? GROUP BY g.study_id",
                (QUEUED,),
            ).fetchall()
            for row in rows:
                status = SENT if row["all_sent"] else FAILED if row["any_failed"] else None
                if status is not None:
                    conn.execute("UPDATE gateway_studies SET status = ?, updated_at = ? WHERE id = ?",
                                 (status, at, row["study_id"]))
        for row in rows:
            if row["all_sent"]:
                log.info("study %d sent to all recipients", row["study_id"])
