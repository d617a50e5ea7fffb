"""DIN 6868-159 constancy checks, sending side: the jobs of ``dicommail constancy run|list``.

A check sends the test data set as a marked test transfer (the mark travels
inside the encryption), then fetches this site's own mail until the
receiver's signed receipt is processed, and records the result: transfer
time (first mail handed to SMTP until the receipt), completeness, header
entries, image quality.  A failed daily check is retried once (attempt 2);
DIN 6868-159 allows two attempts a working day.
"""

from __future__ import annotations

import logging
import math
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, cast

from dicommail.config import is_mail_address
from dicommail.constancy import store as _s
from dicommail.constancy.store import ConstancyCheck
from dicommail.crypto.keys import own_key
from dicommail.errors import DicommailError, InputError, ReceiverLockedError
from dicommail.site.base import ProgressCallback, ProgressUpdate, SiteBase

# The runner (pydicom, the SMTP client) is imported by the methods that run a
# check: every Site has these methods, few use them.
if TYPE_CHECKING:
    from dicommail.constancy.report import ConstancyReport
    from dicommail.dicom import DicomFile
    from dicommail.site import Site

__all__ = ["Constancy", "ConstancyCheck"]

log = logging.getLogger("dicommail.constancy")

#: Seconds between fetches of this site's mail while a check waits for its receipt.
POLL_SECONDS = 2.0


class Constancy(SiteBase):
    """Methods of :class:`dicommail.Site` that run and list DIN 6868-159 constancy checks."""

    def constancy_run(
        self,
        to: str,
        *,
        kind: str = "daily",
        dataset: Path | None = None,
        wait: float | None = None,
        progress: ProgressCallback | None = None,
    ) -> ConstancyCheck:
        """Run one constancy check to ``to``: send the test set, wait for the receipt, record the result.

        ``kind`` is "daily", "monthly" or "acceptance"; ``dataset`` a folder with
        one study (default ``constancy.dataset``, else a synthetic CT made once).
        Waits up to ``wait`` seconds (default ``constancy.time_limit``) for the
        receipt, fetching this site's mail meanwhile (or leaving that to a
        running ``dicommail receive``); a check still without a result then is
        returned "pending": a later run, :meth:`constancy_checks` or the daemon
        finishes it.  A failed daily first attempt is retried at once (attempt
        2), and so is a run on the day of a failed first attempt.  A check that
        fails is logged as an ERROR and, if ``constancy.admin_address`` is set,
        mailed there.  ``progress`` gets "packing" and "sending" updates (bytes),
        then "waiting" updates in seconds.

        Returns the last attempt.  Raises :class:`~dicommail.errors.InputError`
        for a bad address, kind, wait or test set (nothing is recorded then) and
        :class:`~dicommail.errors.ConfigError` for an unusable ``[smtp]`` or
        ``[mailbox]``.  Failures to send the test set are recorded as a failed
        check, not raised.
        """
        from dicommail.constancy import runner
        from dicommail.constancy.values import KINDS

        if not is_mail_address(to):
            raise InputError(f"--to {to!r} is not a mail address")
        if kind not in KINDS:
            raise InputError(f"{kind!r} is no kind of constancy check", f"use one of {', '.join(KINDS)}")
        limit = self.config.constancy.time_limit
        wait = float(limit) if wait is None else wait
        if not math.isfinite(wait) or wait < 0:
            raise InputError(f"cannot wait {wait} seconds for a receipt", "use 0 or more seconds")
        files = runner.load_test_set(self.config, dataset)
        with self._database() as db:
            _s.prune_checks(db, self.config.constancy.retention_years)
            _s.settle(db)
            pending = _s.has_pending(db)
        if pending:
            self._fetch_mail()  # receipts of earlier checks (run with a short --wait) may wait in the mailbox
        with self._database() as db:
            _s.settle(db)
            attempt = _s.next_attempt(db, kind, to)
        check = self._attempt(to, kind, attempt, files, wait, progress)
        if check.result == _s.FAILED and kind == "daily" and attempt == 1:
            check = self._attempt(to, kind, 2, files, wait, progress)
        if check.result == _s.FAILED:
            self._alert(check)
        return check

    def constancy_checks(self, *, since: datetime | None = None, to: str | None = None) -> list[ConstancyCheck]:
        """The recorded checks, oldest first: started on or after ``since`` (naive: local time), to ``to``.

        Pending checks that can be finished are finished first (no receipt
        within the time limit, or a receipt the daemon recorded for the
        transfer).  Reads this site's state only; it fetches no mail.
        """
        with self._database() as db:
            _s.settle(db)
            return _s.list_checks(db, since=since.timestamp() if since is not None else None, peer=to)

    def constancy_report(self, month: str, out: Path, *, to: str | None = None) -> ConstancyReport:
        """The month's documentation (``YYYY-MM``) as a PDF at ``out``, with ``out.asc`` signed by this site's key.

        Finishes what can be finished first (see :meth:`constancy_checks`), so
        the record is current.  Raises :class:`~dicommail.errors.InvalidArgumentError`
        for a bad month and :class:`~dicommail.errors.CryptoError` (or
        :class:`~dicommail.errors.PassphraseError`) if the site key cannot sign.
        """
        from dicommail.constancy.report import write_report  # matplotlib and fpdf2 load slowly

        self.constancy_checks()
        return write_report(self, month, out, peer=to)

    # -- steps ------------------------------------------------------------------------------------

    def _attempt(self, to: str, kind: str, attempt: int, files: list[DicomFile], wait: float,
                 progress: ProgressCallback | None) -> ConstancyCheck:
        from dicommail.constancy import runner

        config = self.config
        site = cast("Site", self)
        mark_id = _s.new_mark_id()
        mark = runner.build_mark(mark_id, kind, files, config.constancy.header_entries)
        with self._database() as db:
            check_id = _s.start_check(db, kind=kind, peer=to, attempt=attempt, limit_s=config.constancy.time_limit,
                                      mark_id=mark_id, images=len(files), size=sum(f.size for f in files))
        log.info("constancy check %d (%s, attempt %d) to %s: sending %d image(s)", check_id, kind, attempt, to,
                 len(files))
        try:
            results = site.send([f.path for f in files], to, progress=progress, constancy=mark)
        except DicommailError as exc:
            with self._database() as db:
                queued = getattr(exc, "queued_transfers", ())
                if queued:
                    _s.attach_transfer(db, check_id, queued[0], "")
                return _s.fail_check(db, check_id, f"the test set could not be sent: {exc.message}")
        (result,) = results  # the test set is one study
        with self._database() as db:
            _s.attach_transfer(db, check_id, result.transfer_id, result.set_id)
            if result.status == "failed":
                return _s.fail_check(db, check_id, f"the test set could not be sent: {result.error or 'SMTP error'}")
        return self._wait(check_id, wait, progress)

    def _wait(self, check_id: int, wait: float, progress: ProgressCallback | None) -> ConstancyCheck:
        """Fetch mail until the check has a result or ``wait`` seconds are over; the check as it then is."""
        start = time.monotonic()
        while True:
            # Measured before settling: once the wait is over, so is the time limit it defaults to.
            elapsed = time.monotonic() - start
            with self._database() as db:
                _s.settle(db)
                check = _s.get_check(db, check_id)
            if progress is not None:
                progress(ProgressUpdate("waiting", int(min(elapsed, wait)), int(wait), unit="seconds"))
            if not check.pending or elapsed >= wait:
                return check
            time.sleep(min(POLL_SECONDS, wait - elapsed))
            self._fetch_mail()

    def _fetch_mail(self) -> None:
        """One receiver cycle (fetch, process: the Tracker records receipts); the daemon's job if it runs."""
        import asyncio

        site = cast("Site", self)
        try:
            report = asyncio.run(site.receive(once=True))
        except ReceiverLockedError:
            return  # `dicommail receive` runs for this home and records receipts as they arrive
        if report.fetch_error is not None:
            log.warning("constancy: fetching mail failed: %s", report.fetch_error.message)

    def _alert(self, check: ConstancyCheck) -> None:
        """Mail a failed check to constancy.admin_address; a failure to do so is logged, not raised."""
        from dicommail.constancy import runner

        admin = self.config.constancy.admin_address
        if not admin:
            return
        sender = self.config.identity.address
        try:
            if not sender:
                with self._keyring() as keyring:
                    sender = own_key(keyring, self.config.identity.key).email
            runner.alert_admin(self.config, sender, check)
        except DicommailError as exc:
            log.error("constancy check %d: could not mail %s about the failure: %s", check.id, admin, exc.message)
            return
        log.info("constancy check %d: failure mailed to %s", check.id, admin)
