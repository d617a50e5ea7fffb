"""The long-running services: the receiver (``dicommail receive``) and the gateway (``dicommail gateway``).

Both are coroutines, to be run in the caller's event loop::

    stop = asyncio.Event()
    receiver = asyncio.create_task(site.receive(stop=stop))
    ...
    stop.set()          # finishes the current step, then returns
    await receiver

or, as the ``dicommail`` command does, blocking until SIGTERM/SIGINT::

    asyncio.run(site.receive(handle_signals=True))
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload

from dicommail.errors import InputError
from dicommail.site.base import ProgressCallback, ProgressUpdate, SiteBase

# asyncio and the receiver are imported where they run: a Site that only packs
# or unpacks needs neither (the receiver brings pynetdicom and the mail clients).
if TYPE_CHECKING:
    import asyncio

    from dicommail.receiver.daemon import CycleReport

__all__ = ["Services"]

T = TypeVar("T")

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Services(SiteBase):
    """Methods of :class:`dicommail.Site` that run the receiver and the gateway as coroutines.

    Each holds a lock file in the home while it runs: one receiver and one
    gateway per home (a second raises
    :class:`~dicommail.errors.ReceiverLockedError` or
    :class:`~dicommail.errors.GatewayLockedError`, both
    :class:`~dicommail.errors.LockedError`).  Setting ``stop`` ends a service
    cleanly after its current step; cancelling its task does the same (a
    second cancellation interrupts at once).
    """

    @overload
    async def receive(
        self, *, once: Literal[True], interval: int | None = None, stop: asyncio.Event | None = None,
        handle_signals: bool = False, progress: ProgressCallback | None = None,
    ) -> CycleReport: ...

    @overload
    async def receive(
        self, *, once: Literal[False] = False, interval: int | None = None, stop: asyncio.Event | None = None,
        handle_signals: bool = False, progress: ProgressCallback | None = None,
    ) -> None: ...

    @overload
    async def receive(
        self, *, once: bool, interval: int | None = None, stop: asyncio.Event | None = None,
        handle_signals: bool = False, progress: ProgressCallback | None = None,
    ) -> CycleReport | None: ...

    async def receive(
        self, *, once: bool = False, interval: int | None = None, stop: asyncio.Event | None = None,
        handle_signals: bool = False, progress: ProgressCallback | None = None,
    ) -> CycleReport | None:
        """Fetch mail, verify sets, forward complete studies to the PACS; acknowledge and resend as due.

        With ``once``, one cycle, and its :class:`CycleReport` is returned (a
        failed fetch is in its ``fetch_error``, not raised: what was already
        stored was processed anyway).  Otherwise it polls every ``interval``
        seconds (default ``receiver.interval``; IMAP IDLE wakes it earlier),
        backing off while the mail server fails, until ``stop`` is set, and
        returns None.  ``handle_signals`` makes SIGTERM and SIGINT set the stop
        (main thread only; the handlers are removed again on return).
        ``progress`` gets "forwarding" updates counted in instances, one task
        per set sent to the PACS (from the receiver's worker thread).

        Raises :class:`~dicommail.errors.ReceiverLockedError` if another
        receiver runs for this home, :class:`~dicommail.errors.ConfigError`
        for an unusable mailbox or PACS configuration, and
        :class:`~dicommail.errors.InputError` for an interval below 1.
        """
        import asyncio

        from dicommail.receiver.daemon import Receiver, crash_hook_from_env, receiver_lock
        from dicommail.receiver.destinations import make_destination
        from dicommail.receiver.retrievers import make_retriever
        from dicommail.receiver.spool import Spool

        config = self.config
        if interval is not None:
            if interval < 1:
                raise InputError(f"a polling interval of {interval} s is not possible", "use 1 second or more")
            config = dataclasses.replace(config, receiver=dataclasses.replace(config.receiver, interval=interval))
        stop = stop if stop is not None else asyncio.Event()
        with receiver_lock(config.home), self._database() as db, self._keyring() as keyring:
            retriever = make_retriever(config, db, Spool(config.spool))
            try:
                destination = make_destination(config, _forwarding(progress))
                receiver = Receiver(config, retriever, destination, db, keyring,
                                    crash_hook_from_env(), stop=stop)
                with _signals(receiver.install_signal_handlers if handle_signals else None):
                    if once:
                        return await _stop_on_cancel(receiver.cycle(), stop)
                    await _stop_on_cancel(receiver.run_forever(), stop)
                    return None
            finally:
                await retriever.close()

    async def gateway(self, *, stop: asyncio.Event | None = None, handle_signals: bool = False) -> None:
        """Serve C-STORE and C-ECHO on ``gateway.host:gateway.port``; send each complete study as DICOM-Mail.

        The called AE title picks the route (its recipients); a study is sent
        once nothing arrived for it for ``gateway.study_idle_seconds``.  Runs
        until ``stop`` is set, then stops accepting associations, lets open
        ones finish (briefly) and returns; studies still queued are sent
        after the next start.  ``handle_signals`` as for :meth:`receive`.

        Raises :class:`~dicommail.errors.GatewayLockedError` if another gateway
        runs for this home, and :class:`~dicommail.errors.ConfigError` if no
        routes are configured, ``[smtp]`` is unusable or the port is taken.
        """
        import asyncio

        from dicommail.gateway.service import Gateway, gateway_lock
        from dicommail.receiver.daemon import crash_hook_from_env

        stop = stop if stop is not None else asyncio.Event()
        with gateway_lock(self.home), self._database() as db, self._keyring() as keyring:
            service = Gateway(self.config, db, keyring, crash_hook=crash_hook_from_env(), stop=stop)
            with _signals(service.install_signal_handlers if handle_signals else None):
                await _stop_on_cancel(service.run(), stop)


def _forwarding(progress: ProgressCallback | None) -> Callable[[int, int], None] | None:
    """The destination's ``(stored, total)`` reports as "forwarding" updates."""
    if progress is None:
        return None
    callback = progress

    def report(stored: int, total: int) -> None:
        callback(ProgressUpdate("forwarding", stored, total, "instances"))

    return report


@contextlib.contextmanager
def _signals(install: Callable[[], None] | None) -> Iterator[None]:
    """Run ``install`` (a service's SIGTERM/SIGINT handlers), and remove the handlers again afterwards."""
    if install is None:
        yield
        return
    import asyncio

    install()
    try:
        yield
    finally:
        # The caller's loop may go on running other things; it gets its signals back.
        loop = asyncio.get_running_loop()
        for signum in _STOP_SIGNALS:
            loop.remove_signal_handler(signum)


async def _stop_on_cancel(work: Coroutine[Any, Any, T], stop: asyncio.Event) -> T:
    """Await ``work``; if the caller is cancelled, set ``stop`` and let the current step finish first.

    Without this, a cancellation would close the state database under a
    processing step still running in a worker thread.
    """
    import asyncio

    task = asyncio.ensure_future(work)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        stop.set()
        await task  # a second cancellation lands here and cancels the work itself
        raise
