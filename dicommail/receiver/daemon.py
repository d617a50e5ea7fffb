"""The receiving loop: fetch, process, forward, wait; until told to stop.

One receiver per home at a time (a lock file), because two would fetch and
forward the same mails.  SIGTERM ends the loop after the current step: every
step leaves the state database consistent, so stopping between steps loses
nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from dicommail.config import Config, format_size
from dicommail.crypto.gpg import Keyring
from dicommail.errors import AuthenticationError, DicommailError, ReceiverLockedError, TransportError
from dicommail.identity import own_addresses
from dicommail.receiver.destinations import FolderDestination
from dicommail.receiver.notify import Notifier
from dicommail.receiver.pipeline import Destination, Pipeline
from dicommail.receiver.spool import Spool
from dicommail.sender.outbox import ClientFactory, MailSender, send_pending, try_sender_lock
from dicommail.sender.tracking import Tracker
from dicommail.store.db import Database
from dicommail.store.files import pid_lock

log = logging.getLogger("dicommail.receiver")

#: Backoff after a failed poll doubles up to this many seconds.
MAX_POLL_BACKOFF = 1800.0
#: Environment variable naming a step at which the process kills itself (tests only).
CRASH_ENV = "DICOMMAIL_TEST_CRASH_AT"


class Retriever(Protocol):
    #: Asked between mails while fetching (the receiver sets it to its stop flag).
    should_stop: Callable[[], bool]

    async def fetch(self) -> object: ...

    async def wait_for_mail(self, timeout: float) -> bool: ...

    async def close(self) -> None: ...


@dataclass
class CycleReport:
    """What one fetch-and-process cycle did (``receive --once``).

    ``sets`` counts this home's received sets by status (all of them, not just
    this cycle's); ``quarantined`` counts the quarantined mails.  A failed
    fetch is not raised but kept in ``fetch_error``: mail already stored was
    still processed and forwarded.
    """

    fetch_error: DicommailError | None = None
    #: A processing stage that stopped for a reason outside any one mail (wrong passphrase, full disk).
    processing_error: DicommailError | None = None
    #: Told to stop (SIGTERM, SIGINT) during the cycle: what was left is the next run's work.
    interrupted: bool = False
    sets: dict[str, int] = field(default_factory=dict)
    quarantined: int = 0
    #: Acknowledgements sent back to senders in this cycle.
    notifications_sent: int = 0
    #: Outbox mails (resends and queued transfers) sent in this cycle.
    mails_sent: int = 0

    @property
    def ok(self) -> bool:
        """True if fetching and every processing stage worked (a bad mail is recorded per set, not here)."""
        return self.fetch_error is None and self.processing_error is None and not self.interrupted

    def to_json(self) -> dict[str, Any]:
        """The document ``dicommail receive --once --json`` prints."""
        return {
            "ok": self.ok,
            "sets": dict(self.sets),
            "quarantined_mails": self.quarantined,
            "fetch_error": self.fetch_error.message if self.fetch_error else None,
            "processing_error": self.processing_error.message if self.processing_error else None,
            "interrupted": self.interrupted,
        }


@contextlib.contextmanager
def receiver_lock(home: Path) -> Iterator[None]:
    """Hold ``<home>/receiver.lock`` exclusively, or fail at once if another receiver does."""
    with pid_lock(home / "receiver.lock") as locked:
        if not locked:
            raise ReceiverLockedError(
                f"another receiver is running for {home}",
                "run one receiver per home and mailbox; stop the other one first",
            )
        yield


def crash_hook_from_env() -> Callable[[str], None]:
    """``DICOMMAIL_TEST_CRASH_AT=step[:n]`` kills this process (SIGKILL) the n-th time ``step`` is reached.

    For the crash tests only: it makes "kill -9 right after decryption"
    reproducible instead of a race.
    """
    spec = os.environ.get(CRASH_ENV, "")
    step, _, count = spec.partition(":")
    remaining = [int(count) if count.isdigit() else 1]

    def hook(reached: str) -> None:
        if step and reached == step:
            remaining[0] -= 1
            if remaining[0] <= 0:
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _smtp_from_config(config: Config) -> ClientFactory | None:
    """An SMTP client factory when the config has an [smtp] section, else None (nothing is sent)."""
    if "smtp" not in config.configured:
        return None
    from dicommail.transport.smtp import SmtpClient

    try:
        client = SmtpClient.from_config(config)
    except DicommailError as exc:
        log.error("[smtp] is unusable, so no acknowledgements or resends are sent: %s", exc.message)
        return None

    def factory() -> contextlib.AbstractAsyncContextManager[MailSender]:
        return client

    return factory


def mailbox_description(config: Config) -> str:
    """The mailbox as a URL for the startup line: ``imap://user@host:port/INBOX with IDLE`` (no password)."""
    box = config.mailbox
    user = urllib.parse.quote(box.username, safe="@") + "@" if box.username else ""
    url = f"{box.protocol}://{user}{box.host}:{box.port}"
    if box.protocol == "imap":
        url += "/" + urllib.parse.quote(box.folder, safe="/") + (" with IDLE" if box.idle else "")
    return url


class Receiver:
    """Ties the stages together for one home."""

    def __init__(
        self,
        config: Config,
        retriever: Retriever,
        destination: Destination,
        db: Database,
        keyring: Keyring,
        crash_hook: Callable[[str], None] | None = None,
        smtp: ClientFactory | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        self.config = config
        self.retriever = retriever
        self.db = db
        self._crash_hook = crash_hook or (lambda _step: None)
        # Mail goes out (acknowledgements, resends) only where [smtp] is set up.
        self._smtp = smtp if smtp is not None else _smtp_from_config(config)
        self.notifier = Notifier(db, config, keyring) if config.tracking.notifications else None
        self.tracker = Tracker(db, config, keyring)
        self.pipeline = Pipeline(
            db,
            Spool(config.spool),
            keyring,
            destination,
            max_output=config.unpacking.max_decrypted_size,
            passphrase=config.passphrase(),
            set_timeout=config.receiver.set_timeout,
            retry_interval=config.receiver.interval,
            retry_limit=config.receiver.retry_limit,
            crash_hook=self._crash_hook,
            notifier=self.notifier,
            report_handler=self.tracker,
            own_addresses=own_addresses(config, keyring),
            quarantine_days=config.receiver.quarantine_days,
            in_flight_check=config.pacs.in_flight_check != "none",
            test_destination=FolderDestination(config.resolve(config.constancy.test_destination))
            if config.constancy.test_destination else None,
            forward=config.receiver.forward,
            forward_emergency=config.receiver.forward_emergency,
        )
        #: Set it (a signal handler, or the program that runs this receiver) to stop after the current step.
        self.stop = stop if stop is not None else asyncio.Event()
        self.pipeline.should_stop = self.stop.is_set
        self.retriever.should_stop = self.stop.is_set
        self._next_cleanup = 0.0  # monotonic time of the next retention clean-up: at start, then hourly
        # Forwarding to the PACS runs beside fetching and decrypting (one run at a time);
        # intake that stores new work while it runs asks for another round.
        self._forwarding: asyncio.Future[None] | None = None
        self._forward_again = False
        # Acknowledgements and the outbox are sent by the cycle and by background forwarding.
        self._outgoing = asyncio.Lock()

    async def _cleanup_if_due(self) -> None:
        """Remove the spool's files of finished work (``[retention]``), at start and once an hour."""
        from dicommail.site.operations import CLEANUP_INTERVAL, run_cleanup  # the site layer imports this module

        if time.monotonic() < self._next_cleanup:
            return
        self._next_cleanup = time.monotonic() + CLEANUP_INTERVAL
        try:
            await asyncio.to_thread(run_cleanup, self.config, self.db)
        except Exception as exc:  # housekeeping must never stop the receiver
            log.error("retention clean-up failed: %s; tried again in an hour", exc)

    def _check_free_space(self) -> None:
        """Fetching stops while the spool's file system is below ``retention.min_free_space``."""
        from dicommail.site.operations import free_space_short

        minimum = self.config.retention.min_free_space
        free = free_space_short(self.config.spool, minimum)
        if free is not None:
            raise TransportError(
                f"the spool's file system has {format_size(free)} free, below retention.min_free_space "
                f"({format_size(minimum)}): nothing is fetched, mails stay on the server",
                "free disk space for the spool (see `dicommail cleanup --dry-run`); stored mails are still processed",
            )

    async def cycle(self, *, wait_for_forwarding: bool = True) -> CycleReport:
        """Fetch what is new, then do all processing that is ready.

        Forwarding to the destination runs in a second thread; with
        ``wait_for_forwarding`` (``receive --once``) the cycle ends after it,
        else (the daemon) the next cycle may fetch and decrypt meanwhile.
        """
        report = CycleReport()
        await self._cleanup_if_due()
        try:
            self._check_free_space()
            await self.retriever.fetch()
        except TransportError as exc:
            # Mail already stored still gets processed and forwarded.
            report.fetch_error = exc
            log.error("fetching mail failed: %s", exc.message)
        except OSError as exc:
            report.fetch_error = TransportError(
                f"storing fetched mail failed: {exc.strerror or exc} ({exc.filename or '-'})",
                "free disk space for the spool; mails stay on the server until they are stored",
            )
            log.error("%s", report.fetch_error.message)
        except (DicommailError, sqlite3.Error) as exc:
            # Whatever one mail or the state database did, the loop goes on.
            report.fetch_error = TransportError(f"fetching mail failed: {exc}", "see the log; retried next cycle")
            log.error("%s", report.fetch_error.message)
        except Exception as exc:
            # A server answer nobody foresaw (or a bug) must not end the daemon either.
            report.fetch_error = TransportError(
                f"fetching mail failed unexpectedly ({type(exc).__name__})", "see the log; retried next cycle"
            )
            log.error("%s", report.fetch_error.message)
            log.debug("fetch failed", exc_info=exc)
        else:
            self._crash_hook("after-fetch")
        background = not wait_for_forwarding
        loop = asyncio.get_running_loop()
        # The first verified part starts forwarding while intake decrypts the rest.

        def ready() -> None:
            # A stored part must never fail for want of a loop to tell (one closed by a double cancel).
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._start_forwarding, background)

        self.pipeline.on_ready = ready
        try:
            await asyncio.to_thread(self.pipeline.run_intake)
        finally:
            self.pipeline.on_ready = lambda: None
        self._start_forwarding(background)
        if wait_for_forwarding:
            await self.finish_forwarding()
        await self._send_outgoing(report)
        # (In the daemon a forwarding round may still run: what it stops for comes with the next cycle.)
        stopped = self.pipeline.take_stage_errors()
        report.processing_error = stopped[0] if stopped else None
        report.interrupted = self.stop.is_set()
        for row in self.db.query("SELECT status, COUNT(*) AS n FROM inbound_sets GROUP BY status"):
            report.sets[row["status"]] = row["n"]
        report.quarantined = self.db.query(
            "SELECT COUNT(*) AS n FROM inbound_mails WHERE status = 'quarantined'"
        )[0]["n"]
        return report

    def _start_forwarding(self, background: bool) -> None:
        if self._forwarding is not None and not self._forwarding.done():
            self._forward_again = True  # the running round may have looked before this intake stored its parts
            return
        self._forwarding = asyncio.ensure_future(self._forward_until_done(background))

    async def _forward_until_done(self, background: bool) -> None:
        try:
            while True:
                self._forward_again = False
                worked = await asyncio.to_thread(self.pipeline.run_forwarding)
                if worked and background:
                    # A set delivered while the daemon waits for mail is acknowledged now, not at the next poll.
                    await self._send_outgoing(CycleReport())
                if not self._forward_again or self.stop.is_set():
                    return
        except Exception as exc:
            # Nobody awaits a background round: its failure is logged here, and the next cycle starts another.
            log.error("forwarding failed unexpectedly (%s); it is retried in the next cycle", type(exc).__name__)
            log.debug("forwarding failed", exc_info=exc)

    async def finish_forwarding(self) -> None:
        """Wait for the forwarding round under way, if any (it stops between items once :attr:`stop` is set)."""
        if self._forwarding is not None:
            await self._forwarding

    async def _send_outgoing(self, report: CycleReport) -> None:
        """Acknowledgements to senders, and this site's outbox (resends asked for by receivers)."""
        async with self._outgoing:
            await self._send_outgoing_now(report)

    async def _send_outgoing_now(self, report: CycleReport) -> None:
        try:
            self.tracker.expire_overdue()
            if self._smtp is None:
                return
            if self.notifier is not None:
                report.notifications_sent = await self.notifier.send_due(
                    self._smtp, max_attempts=self.config.smtp.max_attempts
                )
            with try_sender_lock(self.config.spool / "outbox") as locked:
                if not locked:
                    log.info("another process is sending from this home; the outbox is left to it this cycle")
                    return
                sender = self.config.identity.address or self.notifier_sender()
                results = await send_pending(self.db, self._smtp, sender=sender,
                                             max_attempts=self.config.smtp.max_attempts)
                report.mails_sent = sum(r.sent_now for r in results)
            self.tracker.after_sending()
        except DicommailError as exc:
            log.error("sending mail failed: %s", exc.message)
        except (OSError, sqlite3.Error) as exc:
            # Disk full or a locked database: nothing is marked sent, so it is retried next cycle.
            log.error("sending mail failed: %s; retried next cycle", exc)
        except Exception as exc:
            # A reply nobody foresaw (or a bug) must not end the daemon, nor a forwarding round.
            log.error("sending mail failed unexpectedly (%s); retried next cycle", type(exc).__name__)
            log.debug("sending failed", exc_info=exc)

    def notifier_sender(self) -> str:
        from dicommail.crypto.keys import own_key

        return own_key(self.pipeline.keyring, self.config.identity.key).email

    async def run_forever(self) -> None:
        """Poll until :attr:`stop` is set; back off while the mail server fails."""
        interval = float(self.config.receiver.interval)
        log.info("polling %s every %d s", mailbox_description(self.config), self.config.receiver.interval)
        try:
            await self._poll(interval)
        finally:
            await self.finish_forwarding()

    async def _poll(self, interval: float) -> None:
        backoff = interval
        while not self.stop.is_set():
            report = await self.cycle(wait_for_forwarding=False)
            if self.stop.is_set():
                break
            if report.fetch_error is not None:
                if isinstance(report.fetch_error, AuthenticationError):
                    log.error("the mail server refused our login; retrying in %.0f s", backoff)
                await self._sleep(backoff)
                backoff = min(MAX_POLL_BACKOFF, backoff * 2)
                continue
            backoff = interval
            await self._wait(interval)

    async def _wait(self, interval: float) -> None:
        """Wait for new mail (IDLE) or the interval, whichever comes first; wake on stop."""
        idle = asyncio.ensure_future(self.retriever.wait_for_mail(interval))
        stopped = asyncio.ensure_future(self.stop.wait())
        done, pending = await asyncio.wait({idle, stopped}, timeout=interval + 5,
                                           return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        for task in done:
            if task is idle and task.exception() is not None:
                log.warning("waiting for new mail failed: %s", task.exception())

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._request_stop, signum)

    def _request_stop(self, signum: int) -> None:
        log.info("received %s: finishing the current step, then stopping", signal.Signals(signum).name)
        self.stop.set()
