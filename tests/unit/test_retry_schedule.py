"""The retry schedule after a temporary SMTP failure follows the configuration (issue 11).

The gateway's first retry waits ``gateway.send_interval``, each further one
twice as long, at most 30 minutes; ``send`` and ``send --pending`` keep a
30 s base.  Driven by an injected clock: nothing here waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path

import pytest

from dicommail.config import parse_config
from dicommail.errors import AuthenticationError, TransportError
from dicommail.gateway import service
from dicommail.sender.outbox import (
    RETRY_BASE,
    RETRY_CAP,
    MailSender,
    next_attempt_due,
    queue_set,
    retry_delay,
    send_pending,
)
from dicommail.store.db import Database
from dicommail.wire.pack import PackedMail, PackedSet

SENDER = "hospital@hospital.test"
RECIPIENT = "dr@practice.test"
T0 = 1_700_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


class Server:
    """A mail server that is down (connecting fails temporarily) until it is brought up."""

    def __init__(self) -> None:
        self.up = False
        self.connects = 0
        self.sent: list[Path] = []
        self.refuse_login = False

    @contextlib.asynccontextmanager
    async def connect(self) -> AsyncIterator[MailSender]:
        self.connects += 1
        if self.refuse_login:
            raise AuthenticationError("535 5.7.8 authentication failed")
        if not self.up:
            raise TransportError("cannot connect to the SMTP server 127.0.0.1:1: Connection refused")
        yield self

    async def send(self, path: Path, sender: str, recipients: Sequence[str]) -> str:
        self.sent.append(path)
        return "250 2.0.0 Ok"


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "state.db")
    yield database
    database.close()


def _queue(db: Database, tmp_path: Path, name: str, clock: Clock) -> int:
    path = tmp_path / f"{name}.eml"
    path.write_bytes(b"Subject: test\n\nbody\n")
    packed = PackedSet(f"2.25.{name}", "1.2.3", RECIPIENT, 1, 100, 1, [PackedMail(path, 1, f"<{name}@h.test>", 100)])
    return queue_set(db, packed, now=clock)


def _due(db: Database) -> float:
    return float(db.query("SELECT next_attempt_at FROM outbound_mails")[0]["next_attempt_at"])


def test_the_delay_starts_at_the_base_and_doubles_up_to_the_cap() -> None:
    assert [retry_delay(n, 2.0) for n in (1, 2, 3, 4, 10, 11, 12, 50)] == [2, 4, 8, 16, 1024, RETRY_CAP, RETRY_CAP,
                                                                            RETRY_CAP]
    assert [retry_delay(n, 60.0) for n in range(1, 9)] == [60, 120, 240, 480, 960, 1800, 1800, 1800]
    # Without a configured interval (send, send --pending): as before.
    assert RETRY_BASE == 30 and [retry_delay(n) for n in (1, 2, 7)] == [30, 60, RETRY_CAP]
    # An interval above the cap: never sooner than the interval.
    assert [retry_delay(n, 3600.0) for n in (1, 2, 5)] == [3600, 3600, 3600]


def test_send_pending_waits_from_the_given_base(db: Database, tmp_path: Path) -> None:
    clock, server = Clock(), Server()
    _queue(db, tmp_path, "a", clock)
    for attempt, wait in enumerate([2, 4, 8], 1):
        (result,) = asyncio.run(send_pending(db, server.connect, sender=SENDER, now=clock, retry_base=2.0))
        assert (result.status, result.next_attempt_at) == ("queued", clock.now + wait), attempt
        clock.now += wait - 0.5
        (early,) = asyncio.run(send_pending(db, server.connect, sender=SENDER, now=clock, retry_base=2.0))
        assert early.sent_now == 0 and server.connects == attempt  # not due yet: not even a connection
        clock.now += 0.5
    server.up = True
    (result,) = asyncio.run(send_pending(db, server.connect, sender=SENDER, now=clock, retry_base=2.0))
    assert result.status == "sent" and len(server.sent) == 1


def test_next_attempt_due_is_the_earliest_ahead(db: Database, tmp_path: Path) -> None:
    clock, server = Clock(), Server()
    first = _queue(db, tmp_path, "a", clock)
    assert next_attempt_due(db, clock.now) is None  # never tried: due already, not ahead
    asyncio.run(send_pending(db, server.connect, sender=SENDER, now=clock, retry_base=5.0))
    second = _queue(db, tmp_path, "b", clock)
    assert next_attempt_due(db, clock.now) == T0 + 5
    assert next_attempt_due(db, clock.now, exclude={first}) is None
    assert next_attempt_due(db, T0 + 5) is None
    assert second != first


def _gateway(tmp_path: Path, db: Database, server: Server, clock: Clock, interval: int) -> service.Gateway:
    config = parse_config({"identity": {"address": SENDER}, "gateway": {"send_interval": interval},
                           "routes": {"DR": {"recipients": [RECIPIENT]}}}, tmp_path)
    gateway = service.Gateway(config, db, keyring=None, client_factory=server.connect,  # type: ignore[arg-type]
                              now=clock)
    gateway._sender = SENDER
    return gateway


def _retry_round(gateway: service.Gateway) -> bool:
    """One tick's retry step, run to its end: whether it started a round."""

    async def tick() -> bool:
        before = gateway._retry_task
        gateway._start_retry()
        task = gateway._retry_task
        if task is None or task is before:
            return False
        await task
        return True

    return asyncio.run(tick())


def test_the_gateway_retries_after_send_interval_doubling(db: Database, tmp_path: Path) -> None:
    clock, server = Clock(), Server()
    gateway = _gateway(tmp_path, db, server, clock, interval=2)
    transfer = _queue(db, tmp_path, "a", clock)
    asyncio.run(gateway._send([transfer]))  # the study job's own try: the server is down
    assert _due(db) == T0 + 2  # send_interval, not 30 s
    tries = [clock.now]
    for wait in (2, 4, 8, 16):
        clock.now += wait - 0.5
        _retry_round(gateway)
        assert server.connects == len(tries)  # not due yet: not even a connection
        clock.now += 0.5
        assert _retry_round(gateway)
        tries.append(clock.now)
        assert server.connects == len(tries) and _due(db) == clock.now + 2 * wait
    assert [b - a for a, b in itertools.pairwise(tries)] == [2, 4, 8, 16]
    server.up = True
    clock.now = _due(db)
    assert _retry_round(gateway)
    assert len(server.sent) == 1
    row = db.query("SELECT status, attempts FROM outbound_mails")[0]
    assert tuple(row) == ("sent", 6)


def test_a_retry_falling_due_before_the_next_round_brings_it_forward(db: Database, tmp_path: Path) -> None:
    clock, server = Clock(), Server()
    gateway = _gateway(tmp_path, db, server, clock, interval=600)
    assert not _retry_round(gateway)  # an empty outbox: nothing to send, next round in 600 s
    transfer = _queue(db, tmp_path, "a", clock)
    clock.now += 10
    asyncio.run(gateway._send([transfer]))
    assert _due(db) == T0 + 10 + 600
    # The round planned at T0 + 600 comes first; the retry is not due then.
    clock.now = T0 + 600
    assert _retry_round(gateway) and server.connects == 1
    clock.now = T0 + 610
    assert _retry_round(gateway) and server.connects == 2  # brought forward from T0 + 1200
    assert _due(db) == T0 + 610 + 1200


def test_a_refused_login_waits_for_the_next_round_not_the_next_tick(db: Database, tmp_path: Path) -> None:
    clock, server = Clock(), Server()
    server.refuse_login = True
    gateway = _gateway(tmp_path, db, server, clock, interval=60)
    _queue(db, tmp_path, "a", clock)
    assert _retry_round(gateway) and server.connects == 1
    clock.now += 30
    assert not _retry_round(gateway)
    clock.now += 30
    assert _retry_round(gateway) and server.connects == 2


def test_a_clock_set_back_does_not_stop_the_rounds(db: Database, tmp_path: Path) -> None:
    clock, server = Clock(), Server()
    gateway = _gateway(tmp_path, db, server, clock, interval=60)
    assert not _retry_round(gateway)  # next round planned for T0 + 60
    _queue(db, tmp_path, "a", clock)
    clock.now = T0 - 3600  # the system clock was an hour fast and is corrected
    assert _retry_round(gateway) and server.connects == 1
    clock.now += 30
    assert not _retry_round(gateway)  # and the rounds go on from the new time
