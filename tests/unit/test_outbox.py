"""The outbox's bookkeeping with a scripted transport, and the SMTP client's bytes on the wire.

The SMTP wire tests run against a minimal SMTP responder on loopback that
records exactly what arrives, so line ends and dot-stuffing are checked at
the byte level (a real server would normalise them before we could look).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from dicommail.config import SmtpConfig
from dicommail.errors import AuthenticationError, ConfigError, InputError, TransportError
from dicommail.sender.outbox import (
    RETRY_CAP,
    MailSender,
    TransferResult,
    queue_set,
    retry_delay,
    send_pending,
    transfer_result,
)
from dicommail.store.db import Database
from dicommail.transport.smtp import SmtpClient
from dicommail.wire.pack import PackedMail, PackedSet

SENDER = "hospital@hospital.test"
RECIPIENT = "practice@practice.test"
T0 = 1_700_000_000.0


# --- the outbox, with a scripted transport ------------------------------------------


@dataclass
class Script:
    """What the fake transport does: fail the n-th send (1-based, counted over the run), or connecting."""

    failures: dict[int, Exception] = field(default_factory=dict)
    connect_error: Exception | None = None
    sent: list[Path] = field(default_factory=list)
    sends: int = 0
    connects: int = 0


class FakeClient:
    def __init__(self, script: Script) -> None:
        self.script = script

    async def __aenter__(self) -> MailSender:
        self.script.connects += 1
        if self.script.connect_error is not None:
            raise self.script.connect_error
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    async def send(self, path: Path, sender: str, recipients: Sequence[str]) -> str:
        assert sender == SENDER and list(recipients) == [RECIPIENT]
        self.script.sends += 1
        failure = self.script.failures.get(self.script.sends)
        if failure is not None:
            raise failure
        self.script.sent.append(path)
        return "250 2.0.0 Ok: queued as FAKE"


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "state.db")
    yield database
    database.close()


def _packed(tmp_path: Path, name: str, parts: int, fragments: int = 0) -> PackedSet:
    """A set of ``parts`` mails (each of ``fragments`` fragments, 0: whole) as files in the spool."""
    mails = []
    for part in range(1, parts + 1):
        for fragment in range(1, fragments + 1) if fragments else [0]:
            path = tmp_path / f"{name}-{part:04d}-{fragment}.eml"
            path.write_bytes(b"Subject: test\n\nbody\n")
            mails.append(PackedMail(path, part, f"<{name}.{part}@hospital.test>", 100, fragment, fragments))
    # Queued in scrambled order: sending must still follow part and fragment numbers.
    mails.reverse()
    return PackedSet(f"2.25.{name}", "1.2.3", RECIPIENT, parts, 1000, parts, mails)


def _run(
    db: Database, script: Script, clock: Clock, *, max_attempts: int = 8, transfer_ids: list[int] | None = None
) -> list[TransferResult]:
    return asyncio.run(
        send_pending(
            db,
            lambda: FakeClient(script),
            sender=SENDER,
            now=clock,
            max_attempts=max_attempts,
            transfer_ids=transfer_ids,
        )
    )


def test_sends_in_order_and_marks_everything(db: Database, tmp_path: Path) -> None:
    clock, script = Clock(), Script()
    transfer = queue_set(db, _packed(tmp_path, "1", 2, fragments=2), now=clock)
    (result,) = _run(db, script, clock)
    assert [p.name for p in script.sent] == ["1-0001-1.eml", "1-0001-2.eml", "1-0002-1.eml", "1-0002-2.eml"]
    assert (result.status, result.mails, result.mails_sent, result.sent_now) == ("sent", 4, 4, 4)
    row = db.query("SELECT * FROM transfers WHERE id = ?", (transfer,))[0]
    assert row["status"] == "sent" and row["first_sent_at"] == T0 and row["sent_at"] == T0 and row["error"] is None
    mails = db.query("SELECT status, attempts, sent_at FROM outbound_mails")
    assert all(tuple(m) == ("sent", 1, T0) for m in mails)
    assert script.connects == 1
    assert _run(db, script, clock) == []  # nothing left


def test_temporary_failure_resumes_without_resending(db: Database, tmp_path: Path) -> None:
    clock = Clock()
    queue_set(db, _packed(tmp_path, "1", 3), now=clock)
    script = Script(failures={2: TransportError("451 4.3.0 try later")})
    (result,) = _run(db, script, clock)
    assert (result.status, result.mails_sent, result.error) == ("sending", 1, "451 4.3.0 try later")
    assert result.next_attempt_at == T0 + 30
    failed = db.query("SELECT * FROM outbound_mails WHERE set_part = 2")[0]
    assert (failed["status"], failed["attempts"], failed["last_error"]) == ("queued", 1, "451 4.3.0 try later")

    clock.now += 10  # not due yet: nothing is tried
    (result,) = _run(db, Script(), clock)
    assert result.sent_now == 0 and result.status == "sending"

    clock.now = T0 + 30
    script = Script()
    (result,) = _run(db, script, clock)
    assert [p.name for p in script.sent] == ["1-0002-0.eml", "1-0003-0.eml"]
    assert (result.status, result.mails_sent, result.sent_now, result.error) == ("sent", 3, 2, None)
    assert db.query("SELECT first_sent_at, sent_at FROM transfers")[0][:] == (T0, T0 + 30)


def test_backoff_doubles_up_to_the_cap_then_gives_up(db: Database, tmp_path: Path) -> None:
    assert [retry_delay(n) for n in (1, 2, 3, 6, 7, 20)] == [30, 60, 120, 960, RETRY_CAP, RETRY_CAP]
    clock = Clock()
    queue_set(db, _packed(tmp_path, "1", 1), now=clock)
    down = TransportError("cannot connect to the SMTP server 127.0.0.1:1: Connection refused")
    for attempt in (1, 2):
        (result,) = _run(db, Script(connect_error=down), clock, max_attempts=3)
        assert result.status == "queued" and result.next_attempt_at == clock.now + retry_delay(attempt)
        clock.now = result.next_attempt_at
    (result,) = _run(db, Script(connect_error=down), clock, max_attempts=3)
    assert result.status == "failed" and result.error is not None
    assert result.error.startswith("gave up after 3 attempts: cannot connect")
    assert db.query("SELECT status, attempts FROM outbound_mails")[0][:] == ("failed", 3)
    assert _run(db, Script(), clock) == []  # failed transfers are not retried


def test_permanent_failure_fails_the_transfer_and_others_go_on(db: Database, tmp_path: Path) -> None:
    clock = Clock()
    first = queue_set(db, _packed(tmp_path, "1", 2), now=clock)
    second = queue_set(db, _packed(tmp_path, "2", 1), now=clock)
    reason = "the SMTP server x:25 refused the mail: 552 5.3.4 Message size exceeds fixed limit"
    script = Script(failures={1: TransportError(reason, "lower it", temporary=False)})
    results = _run(db, script, clock)
    assert [(r.transfer_id, r.status) for r in results] == [(first, "failed"), (second, "sent")]
    assert results[0].error == reason and results[0].hint == "lower it"
    rows = db.query("SELECT status FROM outbound_mails WHERE transfer_id = ? ORDER BY set_part", (first,))
    assert [row["status"] for row in rows] == ["failed", "queued"]


def test_unreachable_server_costs_one_connect_per_run(db: Database, tmp_path: Path) -> None:
    clock = Clock()
    for name in ("1", "2", "3"):
        queue_set(db, _packed(tmp_path, name, 1), now=clock)
    script = Script(connect_error=TransportError("cannot connect"))
    results = _run(db, script, clock)
    assert script.connects == 1
    assert all(r.status == "queued" and r.next_attempt_at == T0 + 30 for r in results)


def test_authentication_error_is_raised_and_counts_no_attempt(db: Database, tmp_path: Path) -> None:
    clock = Clock()
    transfer = queue_set(db, _packed(tmp_path, "1", 1), now=clock)
    with pytest.raises(AuthenticationError):
        _run(db, Script(connect_error=AuthenticationError("535 5.7.8 no")), clock)
    result = transfer_result(db, transfer)
    assert result.status == "queued" and result.next_attempt_at == 0
    assert db.query("SELECT attempts FROM outbound_mails")[0][0] == 0


def test_reconnects_after_a_temporary_failure(db: Database, tmp_path: Path) -> None:
    clock = Clock()
    queue_set(db, _packed(tmp_path, "1", 1), now=clock)
    queue_set(db, _packed(tmp_path, "2", 1), now=clock)
    script = Script(failures={1: TransportError("connection lost")})
    results = _run(db, script, clock)
    assert [r.status for r in results] == ["queued", "sent"] and script.connects == 2


def test_only_the_given_transfers(db: Database, tmp_path: Path) -> None:
    clock = Clock()
    queue_set(db, _packed(tmp_path, "1", 1), now=clock)
    mine = queue_set(db, _packed(tmp_path, "2", 1), now=clock)
    script = Script()
    (result,) = _run(db, script, clock, transfer_ids=[mine])
    assert result.transfer_id == mine and [p.name for p in script.sent] == ["2-0001-0.eml"]


def test_missing_spool_file_fails_the_transfer(db: Database, tmp_path: Path) -> None:
    clock = Clock()
    packed = _packed(tmp_path, "1", 1)
    queue_set(db, packed, now=clock)

    class Reader(FakeClient):
        async def send(self, path: Path, sender: str, recipients: Sequence[str]) -> str:
            raise InputError("cannot read the mail file")

    (result,) = asyncio.run(send_pending(db, lambda: Reader(Script()), sender=SENDER, now=clock))
    assert result.status == "failed" and result.error == "cannot read the mail file"


# --- SMTP on the wire -----------------------------------------------------------------


@dataclass
class Responder:
    """Just enough of an SMTP server to record what a client puts on the wire."""

    replies: dict[bytes, bytes] = field(default_factory=dict)  # command -> reply overriding the default
    commands: list[bytes] = field(default_factory=list)
    data: list[bytes] = field(default_factory=list)
    greeting: bytes = b"220 fake ESMTP"
    extensions: tuple[bytes, ...] = (b"SIZE 1000000", b"8BITMIME")

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(self.greeting + b"\r\n")
        while line := await reader.readline():
            verb = line.split(b" ", 1)[0].split(b":", 1)[0].strip().upper()
            self.commands.append(line)
            if verb == b"EHLO":
                lines = [b"fake", *self.extensions]
                writer.write(b"".join(b"250-" + x + b"\r\n" for x in lines[:-1]) + b"250 " + lines[-1] + b"\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go ahead\r\n")
                await writer.drain()
                self.data.append(await reader.readuntil(b"\r\n.\r\n"))
                writer.write(self.replies.get(b"DATA", b"250 2.0.0 Ok: queued as FAKE1") + b"\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
            else:
                writer.write(self.replies.get(verb, b"250 ok") + b"\r\n")
            await writer.drain()
        writer.close()


@contextlib.asynccontextmanager
async def _responder(responder: Responder) -> AsyncIterator[int]:
    server = await asyncio.start_server(responder.handle, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


def _plain(port: int) -> SmtpConfig:
    return SmtpConfig(host="127.0.0.1", port=port, security="none", timeout=5)


def _with_responder(responder: Responder, body: Callable[[int], Awaitable[None]]) -> None:
    async def main() -> None:
        async with _responder(responder) as port:
            await body(port)

    asyncio.run(main())


def test_lf_mail_goes_out_with_crlf_and_dot_stuffing(tmp_path: Path) -> None:
    mail = tmp_path / "m.eml"
    # LF line ends as on disk, a CRLF line, a lone dot, dotted lines and no final line end.
    mail.write_bytes(b"Subject: dots\n\n.\n..two\n.leading\nmid.dle\r\nlast line\n.")
    responder = Responder()
    replies: list[str] = []

    async def body(port: int) -> None:
        async with SmtpClient(_plain(port)) as smtp:
            replies.append(await smtp.send(mail, SENDER, [RECIPIENT]))
            replies.append(await smtp.send(mail, SENDER, [RECIPIENT]))  # same connection

    _with_responder(responder, body)
    expected = b"Subject: dots\r\n\r\n..\r\n...two\r\n..leading\r\nmid.dle\r\nlast line\r\n..\r\n.\r\n"
    assert responder.data == [expected, expected]
    assert replies == ["250 2.0.0 Ok: queued as FAKE1"] * 2
    mail_from = [c for c in responder.commands if c.upper().startswith(b"MAIL")]
    # SIZE counts the CRLF form (before dot-stuffing), as RFC 1870 asks.
    unstuffed = b"Subject: dots\r\n\r\n.\r\n..two\r\n.leading\r\nmid.dle\r\nlast line\r\n.\r\n"
    assert mail_from[0].rstrip().upper() == f"MAIL FROM:<{SENDER}> SIZE={len(unstuffed)}".upper().encode()
    assert sum(c.upper().startswith(b"EHLO") for c in responder.commands) == 1


@pytest.mark.parametrize(
    ("replies", "temporary", "text"),
    [
        ({b"MAIL": b"552 5.3.4 Message size exceeds fixed limit"}, False, "552 5.3.4 Message size exceeds fixed"),
        ({b"RCPT": b"550 5.1.1 <practice@practice.test>: unknown user"}, False, "550 5.1.1"),
        ({b"DATA": b"451 4.3.0 Error: queue file write error"}, True, "451 4.3.0 Error: queue file write error"),
    ],
)
def test_server_refusals_map_to_transport_errors(
    tmp_path: Path, replies: dict[bytes, bytes], temporary: bool, text: str
) -> None:
    mail = tmp_path / "m.eml"
    mail.write_bytes(b"Subject: x\n\nbody\n")
    errors: list[TransportError] = []

    async def body(port: int) -> None:
        async with SmtpClient(_plain(port)) as smtp:
            with pytest.raises(TransportError) as caught:
                await smtp.send(mail, SENDER, [RECIPIENT])
            errors.append(caught.value)
            assert smtp.connected  # a refused mail leaves the connection usable

    _with_responder(Responder(replies=replies), body)
    (error,) = errors
    assert error.temporary is temporary and text in error.message and "127.0.0.1:" in error.message


def test_starttls_required_and_plain_only_on_loopback(tmp_path: Path) -> None:
    errors: list[TransportError] = []

    async def body(port: int) -> None:
        config = SmtpConfig(host="127.0.0.1", port=port, security="starttls", timeout=5)
        with pytest.raises(TransportError) as caught:
            async with SmtpClient(config):
                pass
        errors.append(caught.value)

    _with_responder(Responder(), body)
    assert not errors[0].temporary and "does not offer STARTTLS" in errors[0].message
    with pytest.raises(ConfigError):
        SmtpClient(SmtpConfig(host="mail.example.org", security="none"))
    with pytest.raises(ConfigError, match="password"):
        SmtpClient(SmtpConfig(host="127.0.0.1", username="someone"))


def test_greeting_421_is_temporary_554_is_not() -> None:
    for greeting, temporary in ((b"421 4.3.2 busy", True), (b"554 5.7.1 go away", False)):
        errors: list[TransportError] = []

        async def body(port: int) -> None:
            with pytest.raises(TransportError) as caught:
                async with SmtpClient(_plain(port)):
                    pass
            errors.append(caught.value)  # noqa: B023

        _with_responder(Responder(greeting=greeting), body)
        assert errors[0].temporary is temporary and greeting.decode() in errors[0].message


def test_a_host_that_does_not_resolve_is_named_so() -> None:
    # os.strerror() of a resolver code printed "Unknown error -2".
    import socket

    client = SmtpClient(_plain(25))
    lookup = OSError("Connect call failed")
    lookup.__cause__ = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    error = client._connect_error(lookup)
    assert "does not resolve (Name or service not known)" in error.message and "Unknown error" not in error.message
    assert error.temporary and "smtp.host" in error.hint
    silent = client._connect_error(TimeoutError())
    assert 'smtp.security = "tls"' in silent.hint  # a plain-text session to an implicit-TLS port waits for ever
