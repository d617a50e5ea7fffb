"""The outbox: packed sets queued in the state database and sent mail by mail.

A transfer is one packed set for one recipient; its mails go out in order
(set part, then fragment).  The moment the server has accepted a mail it is
recorded as sent, durably, before the next one goes out: a crash or an outage
mid-set resumes where it stopped and does not resend what the server took.
Only the one mail in flight at a crash, whose reply never arrived, may go out
twice; receivers ignore duplicates.

Temporary failures (server unreachable, 4xx) are retried with exponential
backoff (:func:`retry_delay`: the caller's ``retry_base``, doubling, at most
:data:`RETRY_CAP`) until ``max_attempts`` tries of one mail have failed; permanent ones
(5xx) fail the transfer with the server's reply.  Login and TLS problems are
configuration problems: they are raised to the caller and count no attempt.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from dicommail.errors import AuthenticationError, DicommailError, StateError, TransportError
from dicommail.store.db import Database
from dicommail.wire.pack import PackedSet

log = logging.getLogger("dicommail.sender")
# The CLI reports outcomes itself; without this, Python's last-resort handler would print warnings twice.
log.addHandler(logging.NullHandler())

QUEUED = "queued"
SENDING = "sending"
SENT = "sent"
FAILED = "failed"

#: The first retry waits this long where no interval is configured (``send``, ``send --pending``,
#: the receiver); the gateway starts from ``gateway.send_interval``.  Each further one waits twice
#: as long, up to the cap.
RETRY_BASE = 30.0
RETRY_CAP = 30 * 60.0


class MailSender(Protocol):
    """What the outbox needs from a transport (e.g. :class:`dicommail.transport.SmtpClient`)."""

    async def send(self, path: Path, sender: str, recipients: Sequence[str]) -> str: ...


#: Opens one connection: ``async with factory() as client: await client.send(...)``.
ClientFactory = Callable[[], AbstractAsyncContextManager[MailSender]]


@dataclass(frozen=True)
class TransferResult:
    """Where one transfer stands after a run."""

    transfer_id: int
    set_id: str
    recipient: str
    status: str  # queued, sending, sent, failed
    set_total: int
    mails: int  # mails of the set, fragments counted singly
    mails_sent: int  # accepted by the server so far
    sent_now: int  # of which in this run
    error: str | None  # the last failure's reason (also of a temporary one)
    next_attempt_at: float | None  # queued/sending: when the next mail is due
    hint: str = ""  # what to do about a failure in this run (not stored)
    #: The set's mails in sending order, with their state (see :func:`with_mails`; empty if not asked for).
    outbound_mails: tuple[OutboundMail, ...] = ()

    @property
    def done(self) -> bool:
        return self.status == SENT

    @property
    def waiting(self) -> bool:
        """Not finished, but will be tried again (``dicommail send --pending``)."""
        return self.status in (QUEUED, SENDING)

    def to_json(self) -> dict[str, Any]:
        """The transfer as ``dicommail send --json`` prints it (one entry of its ``sets`` list)."""
        # Shaped like ``pack --json`` (a "mails" list), plus the sending state.
        return {
            "set_id": self.set_id,
            "recipient": self.recipient,
            "status": self.status,
            "set_total": self.set_total,
            "mails": [m.to_json() for m in self.outbound_mails],
            "mails_sent": self.mails_sent,
            "sent_now": self.sent_now,
            "error": self.error,
            "hint": self.hint or None,
            "next_attempt_at": self.next_attempt_at,
        }


@dataclass(frozen=True)
class OutboundMail:
    """One mail of a transfer as the outbox records it."""

    set_part: int
    fragment: int  # 0: a whole mail
    fragments: int
    message_id: str
    path: Path
    size: int
    status: str  # queued, sent, failed
    attempts: int
    sent_at: float | None
    last_error: str | None

    def to_json(self) -> dict[str, Any]:
        """The mail as ``dicommail send --json`` lists it."""
        return {
            "path": str(self.path),
            "set_part": self.set_part,
            "message_id": self.message_id,
            "size": self.size,
            "fragment": self.fragment,
            "fragments": self.fragments,
            "status": self.status,
            "attempts": self.attempts,
            "sent_at": self.sent_at,
            "error": self.last_error,
        }


def transfer_mails(db: Database, transfer_id: int) -> list[OutboundMail]:
    """A transfer's mails in sending order."""
    rows = db.query("SELECT * FROM outbound_mails WHERE transfer_id = ? ORDER BY set_part, fragment", (transfer_id,))
    return [
        OutboundMail(
            set_part=row["set_part"],
            fragment=row["fragment"],
            fragments=row["fragments"],
            message_id=row["message_id"],
            path=Path(row["path"]),
            size=row["size"],
            status=row["status"],
            attempts=row["attempts"],
            sent_at=row["sent_at"],
            last_error=row["last_error"],
        )
        for row in rows
    ]


def with_mails(db: Database, result: TransferResult) -> TransferResult:
    """``result`` with its :attr:`~TransferResult.outbound_mails` read from the outbox."""
    return dataclasses.replace(result, outbound_mails=tuple(transfer_mails(db, result.transfer_id)))


def queued_bytes(db: Database, transfer_ids: Collection[int] | None = None) -> int:
    """Wire bytes still queued in unfinished transfers (all, or those in ``transfer_ids``): a run's most."""
    rows = db.query(
        "SELECT m.transfer_id, m.size FROM outbound_mails m JOIN transfers t ON t.id = m.transfer_id"
        " WHERE m.status = ? AND t.status IN (?, ?)",
        (QUEUED, QUEUED, SENDING),
    )
    return sum(row["size"] for row in rows if transfer_ids is None or row["transfer_id"] in transfer_ids)


def retry_delay(attempts: int, base: float = RETRY_BASE) -> float:
    """Seconds to wait after the ``attempts``-th failed try of a mail: ``base``, twice that, … 30 min.

    A base above the cap is waited as it is: no retry comes sooner than the first.
    """
    return min(base * 2.0 ** max(0, attempts - 1), max(RETRY_CAP, base))


def next_attempt_due(db: Database, after: float, exclude: Collection[int] = ()) -> float | None:
    """The earliest time after ``after`` when an unfinished transfer not in ``exclude`` is due to go on.

    None if no transfer falls due after ``after``.
    """
    # Mails go in order, so a transfer's first queued mail says when it goes on;
    # a transfer without one (a crash before it was finished) is due at once.
    rows = db.query(
        "SELECT t.id, (SELECT m.next_attempt_at FROM outbound_mails m WHERE m.transfer_id = t.id"
        " AND m.status = ? ORDER BY m.set_part, m.fragment LIMIT 1) AS due"
        " FROM transfers t WHERE t.status IN (?, ?)",
        (QUEUED, QUEUED, SENDING),
    )
    due = [row["due"] or 0.0 for row in rows if row["id"] not in exclude]
    return min((at for at in due if at > after), default=None)


def queue_set(
    db: Database,
    packed: PackedSet,
    *,
    now: Callable[[], float] = time.time,
    on_queued: Callable[[sqlite3.Connection, int], None] | None = None,
) -> int:
    """Record a packed set and its mails as queued, in one transaction; return the transfer id.

    ``on_queued(conn, transfer_id)`` runs inside that transaction, so a caller
    can record what the transfer belongs to atomically with it.
    """
    at = now()
    try:
        with db.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO transfers (set_id, recipient, study_uid, files, bytes, set_total, status,"
                " created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    packed.set_id,
                    packed.recipient,
                    packed.study_uid,
                    packed.file_count,
                    packed.byte_count,
                    packed.set_total,
                    QUEUED,
                    at,
                    at,
                ),
            )
            transfer_id = cursor.lastrowid
            assert transfer_id is not None
            conn.executemany(
                "INSERT INTO outbound_mails (transfer_id, set_part, fragment, fragments, message_id, path, size,"
                " status, next_attempt_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        transfer_id,
                        mail.set_part,
                        mail.fragment,
                        mail.fragments,
                        mail.message_id,
                        str(mail.path),
                        mail.size,
                        QUEUED,
                        0.0,
                    )
                    for mail in packed.mails
                ],
            )
            if on_queued is not None:
                on_queued(conn, transfer_id)
    except sqlite3.IntegrityError as exc:
        raise StateError(
            f"set {packed.set_id} is already in the outbox",
            "every packing makes a new set ID; pack the study again",
        ) from exc
    log.info("set %s queued for %s: %d mail(s)", packed.set_id, packed.recipient, len(packed.mails))
    return transfer_id


def transfer_result(db: Database, transfer_id: int, sent_now: int = 0, hint: str = "") -> TransferResult:
    """The current state of one transfer."""
    rows = db.query("SELECT * FROM transfers WHERE id = ?", (transfer_id,))
    if not rows:
        raise StateError(f"transfer {transfer_id} is not in the outbox")
    transfer = rows[0]
    counts = db.query(
        "SELECT COUNT(*) AS mails, SUM(status = 'sent') AS sent FROM outbound_mails WHERE transfer_id = ?",
        (transfer_id,),
    )[0]
    # Mails go in order, so the first queued one decides when the transfer goes on.
    due = db.query(
        "SELECT next_attempt_at FROM outbound_mails WHERE transfer_id = ? AND status = ?"
        " ORDER BY set_part, fragment LIMIT 1",
        (transfer_id, QUEUED),
    )
    waiting = transfer["status"] in (QUEUED, SENDING)
    return TransferResult(
        transfer_id=transfer_id,
        set_id=transfer["set_id"],
        recipient=transfer["recipient"],
        status=transfer["status"],
        set_total=transfer["set_total"],
        mails=counts["mails"],
        mails_sent=counts["sent"] or 0,
        sent_now=sent_now,
        error=transfer["error"],
        next_attempt_at=due[0]["next_attempt_at"] if waiting and due else None,
        hint=hint,
    )


@dataclass(frozen=True)
class _Backoff:
    """How a run retries a mail: at most ``max_attempts`` tries, waits from ``base`` seconds up."""

    max_attempts: int
    base: float


class _Link:
    """The one connection of a run: opened when first needed, reopened after a failure.

    When connecting fails temporarily (server down), the remaining transfers
    of the run get the same failure without a new try each: an unreachable
    server would otherwise cost a connect timeout per transfer.
    """

    def __init__(self, factory: ClientFactory) -> None:
        self._factory = factory
        self._stack: AsyncExitStack | None = None
        self._client: MailSender | None = None
        self._down: TransportError | None = None

    async def client(self) -> MailSender:
        if self._down is not None:
            raise self._down
        if self._client is None:
            stack = AsyncExitStack()
            try:
                self._client = await stack.enter_async_context(self._factory())
            except TransportError as exc:
                if exc.temporary:
                    self._down = exc
                raise
            self._stack = stack
        return self._client

    async def reset(self) -> None:
        stack, self._stack, self._client = self._stack, None, None
        if stack is not None:
            await stack.aclose()


async def send_pending(
    db: Database,
    client_factory: ClientFactory,
    *,
    sender: str,
    now: Callable[[], float] = time.time,
    max_attempts: int = 8,
    transfer_ids: Collection[int] | None = None,
    progress: Callable[[int], None] | None = None,
    retry_base: float = RETRY_BASE,
) -> list[TransferResult]:
    """Send the due mails of queued transfers (all, or those in ``transfer_ids``), in order.

    Returns one result per transfer looked at, including those not yet due.
    Raises :class:`AuthenticationError` (and other non-temporary connection
    errors such as an unverifiable TLS certificate) without touching the
    transfers: they are configuration problems.  ``progress`` receives the
    wire size of each mail the server accepted.  A mail that failed temporarily
    is due again after :func:`retry_delay` of its attempts and ``retry_base``.
    Where several processes may send from one home, hold :func:`sender_lock`
    around the call.
    """
    rows = db.query("SELECT id FROM transfers WHERE status IN (?, ?) ORDER BY id", (QUEUED, SENDING))
    wanted = [row["id"] for row in rows if transfer_ids is None or row["id"] in transfer_ids]
    link = _Link(client_factory)
    results: list[TransferResult] = []
    try:
        for transfer_id in wanted:
            sent_now, hint = await _send_transfer(
                db, link, transfer_id, sender, now, _Backoff(max_attempts, retry_base), progress
            )
            results.append(transfer_result(db, transfer_id, sent_now, hint))
    finally:
        await link.reset()
    return results


async def _send_transfer(
    db: Database,
    link: _Link,
    transfer_id: int,
    sender: str,
    now: Callable[[], float],
    backoff: _Backoff,
    progress: Callable[[int], None] | None,
) -> tuple[int, str]:
    """Send one transfer's queued mails until done or a failure: (how many went out, the failure's hint)."""
    transfer = db.query("SELECT * FROM transfers WHERE id = ?", (transfer_id,))[0]
    set_id, recipient = transfer["set_id"], transfer["recipient"]
    mails = db.query(
        "SELECT * FROM outbound_mails WHERE transfer_id = ? AND status = ? ORDER BY set_part, fragment",
        (transfer_id, QUEUED),
    )
    if not mails:
        _finish(db, transfer_id, now())  # a crash hit between the last mail and this record
        return 0, ""
    if mails[0]["next_attempt_at"] > now():
        return 0, ""
    sent_now = 0
    for mail in mails:
        where = _describe(set_id, transfer["set_total"], mail)
        try:
            client = await link.client()
        except TransportError as exc:
            if not exc.temporary:
                raise
            _failed_temporarily(db, transfer_id, mail, exc, now(), backoff, where)
            return sent_now, exc.hint
        try:
            reply = await client.send(Path(mail["path"]), sender, [recipient])
        except AuthenticationError:
            raise
        except TransportError as exc:
            if exc.temporary:
                await link.reset()
                _failed_temporarily(db, transfer_id, mail, exc, now(), backoff, where)
            else:
                _failed_permanently(db, transfer_id, mail, exc, now(), where)
            return sent_now, exc.hint
        except DicommailError as exc:  # e.g. the spooled file is gone: trying again cannot help
            _failed_permanently(db, transfer_id, mail, exc, now(), where)
            return sent_now, exc.hint
        _mark_sent(db, transfer_id, mail["id"], now())
        sent_now += 1
        log.info("%s accepted by the server: %s", where, reply)
        if progress is not None:
            progress(mail["size"])
    _finish(db, transfer_id, now())
    return sent_now, ""


def _describe(set_id: str, set_total: int, mail: sqlite3.Row) -> str:
    text = f"set {set_id} part {mail['set_part']}/{set_total}"
    if mail["fragment"]:
        text += f" fragment {mail['fragment']}/{mail['fragments']}"
    return text


def _mark_sent(db: Database, transfer_id: int, mail_id: int, at: float) -> None:
    # Committed (synchronous=FULL) before the next mail goes out: the resume point.
    with db.transaction() as conn:
        conn.execute(
            "UPDATE outbound_mails SET status = ?, sent_at = ?, attempts = attempts + 1, last_error = NULL"
            " WHERE id = ?",
            (SENT, at, mail_id),
        )
        conn.execute(
            "UPDATE transfers SET status = ?, first_sent_at = COALESCE(first_sent_at, ?), updated_at = ? WHERE id = ?",
            (SENDING, at, at, transfer_id),
        )


def _finish(db: Database, transfer_id: int, at: float) -> None:
    with db.transaction() as conn:
        failed = conn.execute(
            "SELECT COUNT(*) FROM outbound_mails WHERE transfer_id = ? AND status = ?", (transfer_id, FAILED)
        ).fetchone()[0]
        if failed:
            conn.execute("UPDATE transfers SET status = ?, updated_at = ? WHERE id = ?", (FAILED, at, transfer_id))
            return
        conn.execute(
            "UPDATE transfers SET status = ?, sent_at = ?, error = NULL, updated_at = ? WHERE id = ?",
            (SENT, at, at, transfer_id),
        )
    set_id = db.query("SELECT set_id FROM transfers WHERE id = ?", (transfer_id,))[0]["set_id"]
    log.info("set %s sent completely", set_id)


def _failed_temporarily(
    db: Database,
    transfer_id: int,
    mail: sqlite3.Row,
    exc: TransportError,
    at: float,
    backoff: _Backoff,
    where: str,
) -> None:
    attempts, max_attempts = mail["attempts"] + 1, backoff.max_attempts
    if attempts >= max_attempts:
        reason = f"gave up after {attempts} attempts: {exc.message}"
        _record_failure(db, transfer_id, mail["id"], attempts, reason, at)
        log.error("%s: %s", where, reason)
        return
    retry_at = at + retry_delay(attempts, backoff.base)
    with db.transaction() as conn:
        conn.execute(
            "UPDATE outbound_mails SET attempts = ?, next_attempt_at = ?, last_error = ? WHERE id = ?",
            (attempts, retry_at, exc.message, mail["id"]),
        )
        any_sent = conn.execute(
            "SELECT COUNT(*) FROM outbound_mails WHERE transfer_id = ? AND status = ?", (transfer_id, SENT)
        ).fetchone()[0]
        conn.execute(
            "UPDATE transfers SET status = ?, error = ?, updated_at = ? WHERE id = ?",
            (SENDING if any_sent else QUEUED, exc.message, at, transfer_id),
        )
    log.warning("%s: %s (attempt %d of %d; next in %.0f s)", where, exc.message, attempts, max_attempts, retry_at - at)


def _failed_permanently(
    db: Database, transfer_id: int, mail: sqlite3.Row, exc: DicommailError, at: float, where: str
) -> None:
    _record_failure(db, transfer_id, mail["id"], mail["attempts"] + 1, exc.message, at)
    log.error("%s: %s", where, exc.message)


def _record_failure(db: Database, transfer_id: int, mail_id: int, attempts: int, reason: str, at: float) -> None:
    with db.transaction() as conn:
        conn.execute(
            "UPDATE outbound_mails SET status = ?, attempts = ?, last_error = ? WHERE id = ?",
            (FAILED, attempts, reason, mail_id),
        )
        conn.execute(
            "UPDATE transfers SET status = ?, error = ?, updated_at = ? WHERE id = ?",
            (FAILED, reason, at, transfer_id),
        )


@contextlib.contextmanager
def try_sender_lock(spool: Path) -> Iterator[bool]:
    """Like :func:`sender_lock`, but without waiting: yields False if another process is sending."""
    spool.mkdir(parents=True, exist_ok=True)
    with (spool / ".send.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def sender_lock(spool: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold the outbox's lock while sending, so two runs (cron and a user) never send the same mail.

    ``on_wait`` is called before waiting for another process that holds it.
    """
    spool.mkdir(parents=True, exist_ok=True)
    with (spool / ".send.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
