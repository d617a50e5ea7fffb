"""Retrievers: fetch new mail from an IMAP or POP3 mailbox into the spool (getmail-style).

Every mail is stored durably (:func:`dicommail.receiver.inbox.store_fetched`)
before anything happens to it on the server; only then is it moved, deleted
or left, and the record marked ``server_done``.  The state database's
``(account, server_uid)`` rows are the memory of what was fetched: a rerun
stores nothing twice and finishes server actions a crash left pending.

Mail that is not DICOM-Mail ("other") is never deleted: it stays where it is
(IMAP fetches with ``BODY.PEEK[]``, so it stays unread) or is moved to
``mailbox.other_mail_folder``.

A mail over ``mailbox.max_message_size`` by the size the server reports
(IMAP ``RFC822.SIZE``, POP3 ``LIST``) is not fetched at all: it stays on the
server untouched and is recorded (status "too-large") so that it is reported
once, not every poll.  Everything else is written to the spool in pieces
(IMAP partial fetches, POP3 line by line), so memory does not grow with the
size of a mail.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import poplib
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, Self, TypeVar

from aioimaplib import aioimaplib

from dicommail.config import Config, MailboxConfig, format_size
from dicommail.errors import AuthenticationError, ConfigError, DicommailError, TransportError
from dicommail.receiver import inbox
from dicommail.receiver.inbox import InboundMail
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database
from dicommail.transport.smtp import is_loopback

log = logging.getLogger("dicommail.receiver")

_T = TypeVar("_T")

#: Kinds of mail that are ours, and so subject to ``after_processing``.
_OURS = frozenset({inbox.DICOM_MAIL, inbox.FRAGMENT, inbox.REPORT})

#: RFC 2177: re-issue IDLE well before the server's 30 minute inactivity timer.
_IDLE_ROUND = 25 * 60.0

#: RFC 5530 / RFC 3206 response codes that mean "try again later", not "wrong password".
_TEMPORARY_LOGIN_CODES = (b"[UNAVAILABLE]", b"[INUSE]", b"[SERVERBUG]", b"[SYS/TEMP]", b"[IN-USE]", b"[LOGIN-DELAY]")

_UIDVALIDITY_RE = re.compile(rb"\[UIDVALIDITY (\d+)\]", re.IGNORECASE)
# BODY[] for a whole fetch, BODY[]<offset> for a partial one.
_FETCH_BODY_RE = re.compile(rb"^\d+ FETCH \(.*BODY\[\](?:<\d+>)? \{(\d+)\}$", re.IGNORECASE)
# A piece past the end of the mail may come as an empty quoted string (or NIL) instead of a literal.
_FETCH_EMPTY_RE = re.compile(rb"^\d+ FETCH \(.*BODY\[\](?:<\d+>)? (?:\"\"|NIL)[ )]", re.IGNORECASE)
_FETCH_SIZE_RE = re.compile(rb"^\d+ FETCH \(.*\bRFC822\.SIZE (\d+)", re.IGNORECASE)
_UID_RE = re.compile(rb"\bUID (\d+)", re.IGNORECASE)

#: Bytes per IMAP partial fetch: what a retriever holds in memory of a mail at a time.
_IMAP_PIECE = 4 * 1024 * 1024

_CREDENTIALS_HINT = "check mailbox.username and mailbox.password_file in the config"


def account_name(config: Config | MailboxConfig) -> str:
    """The account a fetched mail is recorded under: ``imap://user@host:993/INBOX``."""
    box = config.mailbox if isinstance(config, Config) else config
    return f"{box.protocol}://{box.username}@{box.host}:{box.port}/{box.folder}"


@dataclass
class FetchReport:
    """What one :meth:`fetch` did."""

    #: DICOM-Mail stored (whole mails).
    dicom_mail: int = 0
    #: message/partial fragments of DICOM-Mail stored.
    fragments: int = 0
    #: Other mail stored (and left on the server or moved aside).
    other: int = 0
    #: Mails on the server that were fetched before and are not stored again.
    known: int = 0
    #: Server actions a previous run left pending (crash after store), done now.
    completed: int = 0
    #: Mails newly found over ``mailbox.max_message_size``: left on the server, not fetched.
    too_large: int = 0

    @property
    def stored(self) -> int:
        return self.dicom_mail + self.fragments + self.other

    def count(self, mail: InboundMail) -> None:
        if mail.kind == inbox.DICOM_MAIL:
            self.dicom_mail += 1
        elif mail.kind == inbox.FRAGMENT:
            self.fragments += 1
        else:
            self.other += 1


def tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """A context that verifies the chain and the host name (extra CAs from ``ca_file``)."""
    try:
        return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise ConfigError(
            f"cannot load the CA certificates in {ca_file}: {getattr(exc, 'strerror', None) or exc}",
            "mailbox.ca_file must name a readable PEM file of CA certificates",
        ) from exc


def transport_error(exc: BaseException, where: str, doing: str, timeout: float) -> TransportError:
    """Translate a socket, TLS or protocol failure into a temporary :class:`TransportError`."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return TransportError(
            f"the TLS certificate of {where} was not accepted: {exc.verify_message or exc.reason}",
            "check mailbox.ca_file (the CA that signed the server's certificate) and that mailbox.host "
            "is the name in the certificate",
        )
    if isinstance(exc, ssl.SSLError):
        return TransportError(
            f"TLS with {where} failed while {doing}: {exc.reason or exc}",
            "check mailbox.security against mailbox.port (implicit TLS: 993/995, STARTTLS: 143/110) "
            "and mailbox.ca_file",
        )
    if isinstance(exc, ConnectionRefusedError):
        return TransportError(
            f"connection to {where} refused",
            "check mailbox.host and mailbox.port and that the mail server is running; dicommail retries",
        )
    if isinstance(exc, TimeoutError):
        return TransportError(
            f"no answer from {where} within {timeout:g} s while {doing}",
            "check mailbox.host, mailbox.port and mailbox.security (a server that never greets is often an "
            "implicit-TLS port, 993/995, with security \"starttls\" or \"none\", or the reverse); raise "
            "mailbox.timeout for a slow server",
        )
    if isinstance(exc, socket.gaierror):
        return TransportError(f"cannot resolve the mail server name in {where}: {exc.strerror}", "check mailbox.host")
    if isinstance(exc, OSError):
        return TransportError(
            f"network error with {where} while {doing}: {exc.strerror or exc}",
            "dicommail retries; check the network if this persists",
        )
    # Protocol-level failures (aioimaplib, poplib); their text is server replies, not mail content.
    reply = exc.args[0] if exc.args else None
    text = (reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(exc))[:200] or type(exc).__name__
    return TransportError(f"{where} broke off while {doing}: {text}", "dicommail retries; see the server's log")


def _imap_utf7(name: str) -> str:
    """Modified UTF-7 (RFC 3501 5.1.3), the wire form of IMAP folder names."""
    out: list[str] = []
    pending: list[str] = []

    def flush() -> None:
        if pending:
            encoded = base64.b64encode("".join(pending).encode("utf-16-be")).decode("ascii")
            out.append("&" + encoded.rstrip("=").replace("/", ",") + "-")
            pending.clear()

    for char in name:
        if 0x20 <= ord(char) <= 0x7E:
            flush()
            out.append("&-" if char == "&" else char)
        else:
            pending.append(char)
    flush()
    return "".join(out)


def _quoted(text: str) -> str:
    """An IMAP quoted string (aioimaplib passes arguments through unquoted)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _mailbox(name: str) -> str:
    return _quoted(_imap_utf7(name))


def _reply_text(response: Any) -> str:
    """The tagged reply's text (last line), for error messages."""
    lines = getattr(response, "lines", None) or [b""]
    last = lines[-1]
    return bytes(last).decode("utf-8", "replace")[:200] if isinstance(last, bytes | bytearray) else ""


def _fetched_body(lines: Iterable[Any], uid: int) -> bytes | bytearray | None:
    """The ``BODY[]`` (or ``BODY[]<offset>``) literal for ``uid`` out of aioimaplib's FETCH response lines.

    aioimaplib hands a literal over as a separate ``bytearray`` element right
    after the line announcing it (``* n FETCH (UID u BODY[] {size}``); the
    UID may come before the literal or in the line after it.  Returned as
    it is, not copied: it may be a piece of several MiB.
    """
    items = list(lines)
    for index, line in enumerate(items):
        if not isinstance(line, bytes):
            continue
        match = _FETCH_BODY_RE.match(line)
        if match is None:
            if _FETCH_EMPTY_RE.match(line) and _is_for(uid, line):
                return b""
            continue
        if index + 1 >= len(items):
            continue
        literal = items[index + 1]
        if not isinstance(literal, bytearray | bytes) or len(literal) != int(match.group(1)):
            continue
        trailer = items[index + 2] if index + 2 < len(items) and isinstance(items[index + 2], bytes) else b""
        if not _is_for(uid, line, trailer):
            continue  # an unsolicited response for another message
        return literal
    return None


def _is_for(uid: int, line: bytes, trailer: bytes = b"") -> bool:
    """Whether a FETCH response is about ``uid`` (one without a UID is taken to be)."""
    match = _UID_RE.search(line) or _UID_RE.search(trailer)
    return match is None or int(match.group(1)) == uid


def _fetched_size(lines: Iterable[Any], uid: int) -> int | None:
    """``RFC822.SIZE`` of ``uid`` out of a FETCH response (``None``: the mail is gone)."""
    for line in lines:
        if isinstance(line, bytes):
            match = _FETCH_SIZE_RE.match(line)
            if match is not None and _is_for(uid, line):
                return int(match.group(1))
    return None


def _size_guard(limit: int) -> int:
    """How many bytes of a mail are read before giving up on it, whatever size the server reported.

    Some slack over the limit: a server may report sizes with LF line ends
    and send CRLF.
    """
    return limit + limit // 8 + 64 * 1024


class _Refused(TransportError):
    """The server answered, but will not do what was asked with one mail (move it to a folder)."""


class _Retriever:
    """What IMAP and POP3 retrievers share: settings, state, TLS and the async context."""

    def __init__(
        self, settings: MailboxConfig, password: str, db: Database, spool: Spool, *, ca_file: Path | None = None
    ) -> None:
        if settings.security == "none" and not is_loopback(settings.host):
            # Password and mail (patient data) would cross the network in plain text.
            raise ConfigError(
                f'mailbox.security = "none" is only allowed for a mail server on this machine, not {settings.host}',
                'set mailbox.security = "tls" (IMAPS port 993, POP3S port 995) or "starttls" (ports 143, 110)',
            )
        self.settings = settings
        self.account = account_name(settings)
        self._limit = settings.max_message_size
        self._guard = _size_guard(self._limit)
        self.db = db
        self.spool = spool
        self._password = password
        self._where = f"{settings.host}:{settings.port}"
        self._timeout = float(settings.timeout)
        # Built once so that a bad mailbox.ca_file is reported at start-up, not at the first poll.
        self._ssl = tls_context(ca_file) if settings.security != "none" else None
        self._lock = asyncio.Lock()
        #: Asked between mails: a receiver that is stopping ends the fetch after the current one
        #: (the rest is the next start's; nothing fetched is lost, nothing is fetched twice).
        self.should_stop: Callable[[], bool] = lambda: False

    def _error(self, exc: BaseException, doing: str) -> TransportError:
        return transport_error(exc, self._where, doing, self._timeout)

    def _login_refused(self, reply: bytes) -> TransportError:
        if any(code in reply.upper() for code in _TEMPORARY_LOGIN_CODES):
            return TransportError(
                f"{self._where} cannot log in {self.settings.username} at the moment: "
                f"{reply.decode('utf-8', 'replace')[:200]}",
                "dicommail retries",
            )
        return AuthenticationError(
            f"{self._where} refused the login of {self.settings.username}: {reply.decode('utf-8', 'replace')[:200]}",
            _CREDENTIALS_HINT,
        )

    def _store_failed(self, exc: OSError) -> TransportError:
        # A TransportError (temporary) so that a receiver retries the poll like any failed fetch.
        return TransportError(
            f"cannot store a fetched mail in the spool {self.spool.root}: {exc.strerror or exc}",
            "check free space and permissions there; the mail stays on the server and is fetched again",
        )

    def _incoming(self) -> inbox.IncomingMail:
        try:
            return inbox.IncomingMail(self.spool)
        except OSError as exc:
            raise self._store_failed(exc) from exc

    def _write(self, incoming: inbox.IncomingMail, data: bytes | bytearray) -> None:
        try:
            incoming.write(data)
        except OSError as exc:
            raise self._store_failed(exc) from exc

    def _record(self, incoming: inbox.IncomingMail, server_uid: str) -> InboundMail:
        """Make a fetched mail durable and record it (fsyncs: run it in a thread from async code)."""
        try:
            mail = incoming.record(self.db, self.account, server_uid)
        except OSError as exc:
            raise self._store_failed(exc) from exc
        log.debug("stored mail %s of %s: %s, %d bytes", server_uid, self.account, mail.kind, incoming.size)
        return mail

    def _known(self, server_uid: str) -> InboundMail | None:
        """The record of a mail fetched before; ``None`` also for one left for its size under a lower limit."""
        mail = inbox.known(self.db, self.account, server_uid)
        if mail is not None and mail.status == inbox.TOO_LARGE and mail.size <= self._limit:
            # mailbox.max_message_size was raised since: fetch it now.
            inbox.forget(self.db, mail.id)
            return None
        return mail

    def _too_large(self, server_uid: str, size: int, report: FetchReport, *, reported: bool = True) -> None:
        """Leave a mail over the size limit on the server; record it so that this is said once."""
        inbox.record_too_large(self.db, self.account, server_uid, size)
        report.too_large += 1
        # Only sizes and the server's UID: nothing from the mail itself.
        log.warning(
            "mail %s on %s is %s%s, over mailbox.max_message_size %s; left on the server",
            server_uid,
            self.account,
            "" if reported else "more than ",
            format_size(size),
            format_size(self._limit),
        )

    def _finish_gone(self, pending: dict[str, InboundMail], report: FetchReport) -> None:
        """Pending rows whose mail is no longer in the folder: there is nothing left to do on the server."""
        for mail in pending.values():
            log.warning(
                "mail %s of %s is gone from the server before its server action; nothing left to do",
                mail.server_uid,
                self.account,
            )
            inbox.mark_server_done(self.db, mail.id)
            report.completed += 1

    def _log_report(self, report: FetchReport) -> None:
        level = logging.INFO if report.stored or report.completed or report.too_large else logging.DEBUG
        log.log(
            level,
            "fetched from %s: %d DICOM-Mail, %d fragments, %d other; %d known; %d pending actions completed; "
            "%d too large, left on the server",
            self.account,
            report.dicom_mail,
            report.fragments,
            report.other,
            report.known,
            report.completed,
            report.too_large,
        )

    async def close(self) -> None:
        """Log out and close the connection, if any."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()


class ImapRetriever(_Retriever):
    """Fetches from one IMAP folder; keeps its connection between :meth:`fetch` and :meth:`wait_for_mail`."""

    def __init__(
        self, settings: MailboxConfig, password: str, db: Database, spool: Spool, *, ca_file: Path | None = None
    ) -> None:
        super().__init__(settings, password, db, spool, ca_file=ca_file)
        if settings.after_processing == "move" and (
            not settings.processed_folder or settings.processed_folder == settings.folder
        ):
            # Moving a mail into the folder it came from gives it a new UID: it would be fetched forever.
            raise ConfigError(
                "mailbox.processed_folder must name a folder other than mailbox.folder",
                'set mailbox.processed_folder, or after_processing = "keep" or "delete"',
            )
        self._other_folder = settings.other_mail_folder if settings.other_mail_folder != settings.folder else ""
        self._imap: Any = None
        self._lost = asyncio.Event()
        self._capabilities: frozenset[str] = frozenset()
        self._uidvalidity = ""
        #: Highest UID seen by the last fetch: anything above it is new mail.
        self._highest_uid = 0

    @property
    def connected(self) -> bool:
        return self._imap is not None and not self._lost.is_set()

    @property
    def tls_version(self) -> str | None:
        """The TLS version of the open connection (``None``: not connected, or plain)."""
        if not self.connected:
            return None
        ssl_object = self._imap.protocol.transport.get_extra_info("ssl_object")
        return str(ssl_object.version()) if ssl_object is not None else None

    # --- the public operations ------------------------------------------------

    async def fetch(self) -> FetchReport:
        """Store every new mail of the folder, then move/delete/leave it on the server."""
        async with self._lock:
            report = FetchReport()
            reused = self.connected
            if not reused:
                await self._connect()
            try:
                await self._fetch_all(report)
            except TransportError as exc:
                if not reused or not exc.temporary or self.connected:
                    raise  # not a kept connection that died
                # The kept connection died unnoticed (server restart, NAT timeout): once more, afresh.
                # Safe to repeat: what was stored is recorded and is not stored again.
                log.info("connection to %s was lost (%s); reconnecting", self._where, exc.message)
                await self._connect()
                await self._fetch_all(report)
            self._log_report(report)
            return report

    async def wait_for_mail(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for new mail; ``True`` when the server announced some.

        Uses IDLE where the server offers it (and ``mailbox.idle`` is on);
        otherwise just sleeps and returns ``False``.  Callers fetch after
        every wait either way.
        """
        async with self._lock:
            if not self.settings.idle:
                await asyncio.sleep(timeout)
                return False
            reused = self.connected
            if not reused:
                await self._connect()
            try:
                if await self._mail_since_last_fetch():
                    return True
            except TransportError as exc:
                if not reused or not exc.temporary or self.connected:
                    raise  # not a kept connection that died
                log.info("connection to %s was lost (%s); reconnecting", self._where, exc.message)
                await self._connect()
                if await self._mail_since_last_fetch():
                    return True
            if "IDLE" not in self._capabilities:
                await asyncio.sleep(timeout)
                return False
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            while (remaining := deadline - loop.time()) > 0:
                if await self._idle_once(min(remaining, _IDLE_ROUND)):
                    return True
            return False

    async def close(self) -> None:
        imap, self._imap = self._imap, None
        if imap is None:
            return
        if not self._lost.is_set() and not self._lock.locked():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(imap.logout(), min(self._timeout, 5.0))
        self._close_transport(imap)

    # --- connection -------------------------------------------------------------

    async def _connect(self) -> None:
        """Open, secure and log in a fresh connection (dropping any old one)."""
        self._drop()
        lost = asyncio.Event()
        security = self.settings.security
        try:
            imap = aioimaplib.IMAP4(
                self.settings.host,
                self.settings.port,
                timeout=self._timeout,
                # Implicit TLS through IMAP4 itself: IMAP4_SSL does not pass conn_lost_cb on.
                conn_lost_cb=lambda _exc: lost.set(),
                ssl_context=self._ssl if security == "tls" else None,
            )
        except OSError as exc:
            raise self._error(exc, "connecting") from exc
        doing = "connecting"
        try:
            await imap.wait_hello_from_server()
            if security == "starttls":
                doing = "starting TLS"
                await self._starttls(imap)
            doing = "logging in"
            await self._login(imap)
            # The capabilities change after login and the ones aioimaplib gleans from the
            # LOGIN reply can be garbled ("[CAPABILITY ... MOVE]"): ask explicitly.
            await asyncio.wait_for(imap.protocol.capability(), self._timeout)
        except (OSError, aioimaplib.AioImapException, ValueError) as exc:
            self._close_transport(imap)
            raise self._error(exc, doing) from exc
        except BaseException:  # our own errors, cancellation
            self._close_transport(imap)
            raise
        self._imap, self._lost = imap, lost
        self._capabilities = frozenset(str(c).upper() for c in imap.protocol.capabilities)
        log.debug("connected to %s as %s (%s)", self._where, self.settings.username, self.tls_version or "no TLS")

    async def check_login(self) -> None:
        """Connect, secure and log in, then log out: for ``dicommail check``."""
        async with self._lock:
            await self._connect()
        await self.close()

    async def _starttls(self, imap: Any) -> None:
        """Upgrade the plain connection (aioimaplib knows the command but has no method for it)."""
        protocol = imap.protocol
        if "STARTTLS" not in {str(c).upper() for c in protocol.capabilities}:
            # Never fall back to plain text: that is what an attacker stripping STARTTLS wants.
            raise TransportError(
                f"{self._where} does not offer STARTTLS",
                'use mailbox.security = "tls" with the server\'s IMAPS port (usually 993)',
                temporary=False,
            )
        command = aioimaplib.Command("STARTTLS", protocol.new_tag(), loop=protocol.loop)
        response = await asyncio.wait_for(protocol.execute(command), self._timeout)
        if response.result != "OK":
            raise TransportError(f"{self._where} refused STARTTLS: {_reply_text(response)}", "dicommail retries")
        assert self._ssl is not None
        transport = await protocol.loop.start_tls(
            protocol.transport,
            protocol,
            self._ssl,
            server_hostname=self.settings.host,
            ssl_handshake_timeout=self._timeout,
        )
        protocol.transport = transport
        # Capabilities from before TLS must not be trusted (RFC 3501 6.2.1).
        await asyncio.wait_for(protocol.capability(), self._timeout)

    async def _login(self, imap: Any) -> None:
        if "LOGINDISABLED" in {str(c).upper() for c in imap.protocol.capabilities}:
            raise TransportError(
                f"{self._where} does not allow logging in without TLS",
                'set mailbox.security = "tls" or "starttls"',
                temporary=False,
            )
        # aioimaplib quotes the password but sends the user name as is.
        response = await imap.login(_quoted(self.settings.username), self._password)
        if response.result != "OK":
            raise self._login_refused(_reply_text(response).encode())

    def _drop(self) -> None:
        """Forget the connection; it is closed, and the next operation reconnects."""
        imap, self._imap = self._imap, None
        if imap is not None:
            self._close_transport(imap)

    @staticmethod
    def _close_transport(imap: Any) -> None:
        transport = getattr(imap.protocol, "transport", None)
        if transport is not None:
            transport.close()

    async def _call(self, doing: str, operation: Awaitable[_T], *, limited: bool = True) -> _T:
        """Run one aioimaplib operation, failing fast if the connection is lost meanwhile.

        aioimaplib never fails a pending command when the connection drops
        (it waits out its timeout; IDLE waits forever), and ``uid()`` has no
        timeout except for FETCH, whose timer restarts with every chunk of
        data (hence ``limited=False`` for fetching a mail of any size).  A
        failure or cancellation leaves the protocol state unknown, so the
        connection is dropped.
        """
        task = asyncio.ensure_future(operation)
        lost = asyncio.ensure_future(self._lost.wait())
        try:
            done, _ = await asyncio.wait(
                {task, lost}, timeout=self._timeout if limited else None, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            self._drop()
            raise
        finally:
            lost.cancel()
            if not task.done():
                task.cancel()
        if task not in done:
            self._drop()
            if lost in done:
                raise TransportError(
                    f"connection to {self._where} lost while {doing}", "dicommail reconnects and retries"
                )
            raise self._error(TimeoutError(), doing)
        try:
            return task.result()
        except (OSError, aioimaplib.AioImapException) as exc:
            self._drop()
            raise self._error(exc, doing) from exc

    async def _checked(self, doing: str, operation: Awaitable[Any]) -> Any:
        response = await self._call(doing, operation)
        if response.result != "OK":
            raise TransportError(f"{self._where} refused {doing}: {_reply_text(response)}", "dicommail retries")
        return response

    # --- fetching ---------------------------------------------------------------

    async def _select(self) -> str:
        """SELECT the folder; return its UIDVALIDITY."""
        folder = self.settings.folder
        response = await self._call(f"opening folder {folder}", self._imap.select(_mailbox(folder)))
        if response.result != "OK":
            self._drop()
            raise TransportError(
                f"{self._where} cannot open the folder {folder!r}: {_reply_text(response)}",
                "check mailbox.folder",
                temporary=False,
            )
        for line in response.lines:
            match = _UIDVALIDITY_RE.search(bytes(line)) if isinstance(line, bytes | bytearray) else None
            if match:
                return match.group(1).decode()
        self._drop()
        raise TransportError(f"{self._where} did not report the UIDVALIDITY of {folder!r}", "see the server's log")

    async def _search(self, criteria: str) -> list[int]:
        response = await self._checked("listing mails", self._imap.uid_search(criteria, charset=None))
        # Every line but the last (the tagged reply's text) carries UIDs.
        return sorted({int(t) for line in response.lines[:-1] for t in bytes(line).split() if t.isdigit()})

    async def _mail_since_last_fetch(self) -> bool:
        """Whether the folder has mail the last fetch did not see.

        Such mail may have been announced in the reply to one of our earlier
        commands, where aioimaplib drops unsolicited EXISTS: IDLE would not
        tell us about it again.
        """
        if await self._select() != self._uidvalidity:
            return True
        uids = await self._search(f"UID {self._highest_uid + 1}:*")
        # "n:*" always matches the last message, even when its UID is below n.
        return any(uid > self._highest_uid for uid in uids)

    async def _fetch_all(self, report: FetchReport) -> None:
        uidvalidity = await self._select()
        uids = await self._search("ALL")
        pending = {m.server_uid: m for m in inbox.pending_server_actions(self.db, self.account)}
        refused: list[TransportError] = []  # moves the server refused: the mails are stored, fetching goes on
        for uid in uids:
            if self.should_stop():
                log.info("stopping: the rest of %s is fetched at the next start", self.account)
                return
            server_uid = f"{uidvalidity}:{uid}"
            mail = self._known(server_uid)
            if mail is None:
                mail = await self._download(uid, server_uid, report)
                if mail is None:
                    continue  # gone, or too large: nothing to do on the server
                report.count(mail)
            elif mail.server_done:
                report.known += 1
                continue
            else:
                log.info("completing the server action left pending for mail %s of %s", server_uid, self.account)
                report.completed += 1
            try:
                await self._server_action(uid, mail)
            except _Refused as exc:
                # One folder the server will not take (a bad name, a full quota) must not keep every
                # later mail from being fetched: this one stays pending and is tried again next time.
                refused.append(exc)
                pending.pop(server_uid, None)
                continue
            inbox.mark_server_done(self.db, mail.id)
            pending.pop(server_uid, None)
        self._finish_gone(pending, report)
        self._uidvalidity = uidvalidity
        self._highest_uid = uids[-1] if uids else 0
        if refused:
            first = refused[0]
            raise TransportError(f"{first.message} ({len(refused)} mail(s) stored but left where they are; "
                                 "tried again at the next fetch)", first.hint)

    async def _download(self, uid: int, server_uid: str, report: FetchReport) -> InboundMail | None:
        """Fetch one mail into the spool in pieces and record it; ``None`` if it is gone or too large."""
        asking = self._imap.uid("fetch", str(uid), "RFC822.SIZE")
        response = await self._checked("asking for the size of a mail", asking)
        size = _fetched_size(response.lines, uid)
        if size is None:
            log.debug("mail %s of %s vanished before it could be fetched", server_uid, self.account)
            return None
        if size > self._limit:
            self._too_large(server_uid, size, report)
            return None
        with self._incoming() as incoming:
            while True:
                # BODY.PEEK: other mail stays unread.  Pieces of a fixed size until a short one:
                # RFC822.SIZE is not trusted to be exact.
                piece_request = f"BODY.PEEK[]<{incoming.size}.{_IMAP_PIECE}>"
                response = await self._call(
                    "fetching a mail", self._imap.uid("fetch", str(uid), piece_request), limited=False
                )
                if response.result != "OK":
                    raise TransportError(
                        f"{self._where} refused fetching a mail: {_reply_text(response)}", "dicommail retries"
                    )
                piece = _fetched_body(response.lines, uid)
                del response
                if piece is None:
                    log.debug("mail %s of %s vanished while it was fetched", server_uid, self.account)
                    return None
                if len(piece) > _IMAP_PIECE and incoming.size:
                    # Appending a second whole mail would corrupt the stored one.
                    raise TransportError(
                        f"{self._where} answered a partial fetch (BODY[]<offset.length>) with more than was asked",
                        "the server does not follow RFC 3501 6.4.5; dicommail retries",
                    )
                self._write(incoming, piece)
                if incoming.size > self._guard:
                    incoming.discard()
                    self._too_large(server_uid, incoming.size, report, reported=False)
                    return None
                if len(piece) != _IMAP_PIECE:
                    break  # the last piece (or, from a server ignoring <offset.length>, the whole mail)
                del piece
            # fsyncs take a while: keep the event loop free meanwhile.
            return await asyncio.to_thread(self._record, incoming, server_uid)

    async def _server_action(self, uid: int, mail: InboundMail) -> None:
        if mail.kind not in _OURS:
            if self._other_folder:
                await self._move(uid, self._other_folder)
            return  # other mail is never deleted
        action = self.settings.after_processing
        if action == "move":
            await self._move(uid, self.settings.processed_folder)
        elif action == "delete":
            await self._delete(uid)

    async def _move(self, uid: int, folder: str) -> None:
        target = _mailbox(folder)
        command = "move" if "MOVE" in self._capabilities else "copy"
        for attempt in range(2):
            response = await self._call(f"moving a mail to {folder}", self._imap.uid(command, str(uid), target))
            if response.result == "OK":
                break
            if attempt == 0 and "TRYCREATE" in _reply_text(response).upper():
                await self._create(folder)
                continue
            raise _Refused(
                f"{self._where} refused to {command} a mail to {folder!r}: {_reply_text(response)}",
                "check mailbox.processed_folder / mailbox.other_mail_folder and the account's quota",
            )
        if command == "copy":
            await self._delete(uid)

    async def _create(self, folder: str) -> None:
        response = await self._call(f"creating folder {folder}", self._imap.create(_mailbox(folder)))
        # Another client may have created it in between.
        if response.result != "OK" and "ALREADYEXISTS" not in _reply_text(response).upper():
            raise _Refused(
                f"{self._where} cannot create the folder {folder!r}: {_reply_text(response)}",
                "create it by hand, or check mailbox.processed_folder / mailbox.other_mail_folder",
                temporary=False,
            )
        log.info("created folder %s on %s", folder, self._where)

    async def _delete(self, uid: int) -> None:
        flag = self._imap.uid("store", str(uid), "+FLAGS.SILENT", r"(\Deleted)")
        await self._checked("flagging a mail deleted", flag)
        if "UIDPLUS" in self._capabilities:
            await self._checked("expunging a mail", self._imap.uid("expunge", str(uid)))
        else:
            # Without UIDPLUS this also expunges what other clients flagged \Deleted; no way around it.
            await self._checked("expunging a mail", self._imap.expunge())

    # --- IDLE -------------------------------------------------------------------

    async def _idle_once(self, timeout: float) -> bool:
        """One IDLE command of at most ``timeout`` seconds; ``True`` if new mail was announced."""
        imap = self._imap
        queue: asyncio.Queue[Any] = imap.protocol.idle_queue
        _drain(queue)  # pushes left over from an earlier IDLE are stale
        idle_task = await self._call("starting IDLE", imap.idle_start(timeout=timeout + 60.0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        pushed = False
        try:
            while not pushed and (remaining := deadline - loop.time()) > 0:
                getter = asyncio.ensure_future(queue.get())
                lost = asyncio.ensure_future(self._lost.wait())
                try:
                    done, _ = await asyncio.wait({getter, lost}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    # A cancelled get leaves its item in the queue.
                    getter.cancel()
                    lost.cancel()
                if getter in done:
                    pushed = _announces_mail(getter.result())
                elif lost in done:
                    break
        except asyncio.CancelledError:
            self._drop()
            raise
        finally:
            if self.connected:
                imap.idle_done()
        if not self.connected:
            self._drop()
            raise TransportError(
                f"connection to {self._where} lost while waiting for mail", "dicommail reconnects and retries"
            )
        response = await self._call("ending IDLE", idle_task)
        if response.result != "OK":
            self._drop()
            raise TransportError(
                f"{self._where} ended IDLE with an error: {_reply_text(response)}", "dicommail retries"
            )
        # EXISTS may also arrive between DONE and the tagged reply.
        return _announces_mail(_drain(queue)) or pushed


def _drain(queue: asyncio.Queue[Any]) -> list[Any]:
    items: list[Any] = []
    while not queue.empty():
        items.extend(queue.get_nowait())
    return items


def _announces_mail(lines: Iterable[Any]) -> bool:
    for line in lines:
        if isinstance(line, bytes | bytearray):
            words = bytes(line).upper().split()
            if len(words) == 2 and words[0].isdigit() and words[1] in (b"EXISTS", b"RECENT"):
                return True
    return False


# --- POP3 -----------------------------------------------------------------------

#: poplib refuses lines over 2048 bytes; one such (non-conforming) mail would block the mailbox.
_POP3_MAX_LINE = 1024 * 1024


class _LongLines:
    """poplib's line reader with a larger limit, and RETR that does not collect the mail."""

    file: BinaryIO
    sock: socket.socket

    def retr_lines(self, which: str) -> Iterator[bytes]:
        """RETR ``which``: its lines one at a time, dot-unstuffed, without line ends.

        poplib's ``retr`` builds a list of every line: several times the
        mail's size in memory.  Read to the end, or the session is unusable.
        """
        self.sock.sendall(f"RETR {which}\r\n".encode("ascii"))
        status, _ = self._getline()
        if not status.startswith(b"+"):
            raise poplib.error_proto(status)
        while True:
            line, _ = self._getline()
            if line == b".":
                return
            yield line[1:] if line.startswith(b"..") else line

    def _getline(self) -> tuple[bytes, int]:
        line = self.file.readline(_POP3_MAX_LINE + 1)
        if len(line) > _POP3_MAX_LINE:
            raise poplib.error_proto("line too long")
        if not line:
            raise poplib.error_proto("-ERR EOF")
        octets = len(line)
        if line[-2:] == b"\r\n":
            return line[:-2], octets
        if line[:1] == b"\r":
            return line[1:-1], octets
        return line[:-1], octets


class _Pop3(_LongLines, poplib.POP3):
    pass


class _Pop3Ssl(_LongLines, poplib.POP3_SSL):
    pass


def _close_quietly(pop: poplib.POP3) -> None:
    # After a failed STLS handshake poplib's socket is already detached: close() raises EBADF.
    with contextlib.suppress(OSError):
        pop.close()


class Pop3Retriever(_Retriever):
    """Fetches from a POP3 mailbox, one session per fetch (deletions take effect at QUIT)."""

    def __init__(
        self, settings: MailboxConfig, password: str, db: Database, spool: Spool, *, ca_file: Path | None = None
    ) -> None:
        super().__init__(settings, password, db, spool, ca_file=ca_file)
        self._delete = settings.after_processing == "delete"
        if settings.after_processing == "move":
            log.warning(
                "POP3 has no folders: DICOM-Mail stays on %s (after_processing = move works as keep)", self._where
            )

    async def fetch(self) -> FetchReport:
        """Store every new mail; DELE DICOM-Mail if configured; QUIT to commit."""
        async with self._lock:
            report = await asyncio.to_thread(self._fetch_blocking)
            self._log_report(report)
            return report

    async def wait_for_mail(self, timeout: float) -> bool:
        """POP3 cannot announce mail: sleep ``timeout`` seconds and return ``False``."""
        await asyncio.sleep(timeout)
        return False

    async def check_login(self) -> None:
        """Connect, secure and log in, then quit: for ``dicommail check``."""
        pop = await asyncio.to_thread(self._open)
        await asyncio.to_thread(_close_quietly, pop)

    def _open(self) -> _Pop3 | _Pop3Ssl:
        doing = "connecting"
        pop: _Pop3 | _Pop3Ssl | None = None
        try:
            if self.settings.security == "tls":
                pop = _Pop3Ssl(self.settings.host, self.settings.port, timeout=self._timeout, context=self._ssl)
            else:
                pop = _Pop3(self.settings.host, self.settings.port, timeout=self._timeout)
            if self.settings.security == "starttls":
                doing = "starting TLS"
                if "STLS" not in pop.capa():
                    raise TransportError(
                        f"{self._where} does not offer STLS",
                        'use mailbox.security = "tls" with the server\'s POP3S port (usually 995)',
                        temporary=False,
                    )
                pop.stls(self._ssl)
            doing = "logging in"
            try:
                pop.user(self.settings.username)
                pop.pass_(self._password)
            except poplib.error_proto as exc:
                reply = exc.args[0] if exc.args and isinstance(exc.args[0], bytes) else str(exc).encode()
                raise self._login_refused(reply) from exc
        except DicommailError:
            if pop is not None:
                _close_quietly(pop)
            raise
        except (OSError, poplib.error_proto) as exc:
            if pop is not None:
                _close_quietly(pop)
            raise self._error(exc, doing) from exc
        return pop

    def _fetch_blocking(self) -> FetchReport:
        report = FetchReport()
        pop = self._open()
        committed = False
        try:
            _, listing, _ = pop.uidl()
            sizes = _pop3_sizes(pop.list()[1])
            pending = {m.server_uid: m for m in inbox.pending_server_actions(self.db, self.account)}
            deleted: list[int] = []
            stopped = False
            for entry in listing:
                if self.should_stop():
                    log.info("stopping: the rest of %s is fetched at the next start", self.account)
                    stopped = True
                    break  # QUIT still commits the DELEs of the mails done
                number, _, server_uid = entry.decode("ascii", "replace").strip().partition(" ")
                mail = self._known(server_uid)
                if mail is None:
                    size = sizes.get(number)
                    if size is not None and size > self._limit:
                        self._too_large(server_uid, size, report)
                        continue
                    mail = self._retrieve(pop, number, server_uid, report)
                    if mail is None:
                        continue
                    report.count(mail)
                elif mail.server_done:
                    report.known += 1
                    continue
                else:
                    report.completed += 1
                pending.pop(server_uid, None)
                if self._delete and mail.kind in _OURS:
                    pop.dele(number)
                    deleted.append(mail.id)
                else:
                    inbox.mark_server_done(self.db, mail.id)
            pop.quit()  # the server deletes only now; without QUIT it forgets the DELEs
            committed = True
            for mail_id in deleted:
                inbox.mark_server_done(self.db, mail_id)
            if not stopped:  # (mails not reached yet are not gone)
                self._finish_gone(pending, report)
        except (OSError, poplib.error_proto) as exc:
            # Rows stay pending: the next fetch repeats the DELEs, nothing is stored twice.
            raise self._error(exc, "fetching mail") from exc
        finally:
            if not committed:
                _close_quietly(pop)
        return report

    def _retrieve(self, pop: _Pop3 | _Pop3Ssl, number: str, server_uid: str, report: FetchReport) -> InboundMail | None:
        """RETR one mail into the spool line by line and record it; ``None`` if it was too large after all."""
        with self._incoming() as incoming:
            seen = 0
            for line in pop.retr_lines(number):
                seen += len(line) + 2
                if seen > self._guard:
                    incoming.discard()  # and read on to the end of the mail, discarding it
                    continue
                # Line ends as poplib.retr gave them joined: CRLF.
                self._write(incoming, line + b"\r\n")
            if seen > self._guard:
                self._too_large(server_uid, seen, report, reported=False)
                return None
            return self._record(incoming, server_uid)


def _pop3_sizes(listing: Iterable[bytes]) -> dict[str, int]:
    """Message number to size, from the lines of a LIST reply (``"1 1234"``)."""
    sizes: dict[str, int] = {}
    for entry in listing:
        number, _, size = entry.decode("ascii", "replace").strip().partition(" ")
        size = size.split(" ", 1)[0]
        if size.isdigit():
            sizes[number] = int(size)
    return sizes


def make_retriever(config: Config, db: Database, spool: Spool) -> ImapRetriever | Pop3Retriever:
    """The retriever for ``[mailbox]`` in the config (password read from mailbox.password_file)."""
    box = config.mailbox
    if not box.username:
        raise ConfigError("mailbox.username is not set", "set the mail account's login name in [mailbox]")
    password = config.secret(box.password_file, "mailbox.password_file")
    if password is None:
        raise ConfigError(
            "mailbox.password_file is not set",
            "name a file (relative to the dicommail home) holding the mailbox password on its first line",
        )
    ca_file = config.resolve(box.ca_file) if box.ca_file else None
    retriever = ImapRetriever if box.protocol == "imap" else Pop3Retriever
    return retriever(box, password, db, spool, ca_file=ca_file)
