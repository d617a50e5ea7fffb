"""SMTP submission over aiosmtplib: one connection sends a batch of mail files.

Mail files on disk have LF line ends.  aiosmtplib turns every bare LF (and
bare CR) into CRLF, dot-stuffs lines that start with ".", appends the final
CRLF if missing and the terminating ".", and announces the CRLF size with
``SIZE=`` on MAIL FROM, so files are handed over as they are.  They must NOT
be dot-stuffed or converted here: aiosmtplib would stuff the dots twice.

TLS certificates are always verified, host name included.  Errors become
:class:`~dicommail.errors.TransportError` (``temporary`` when trying again
later can help) or :class:`~dicommail.errors.AuthenticationError`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
import ssl
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

import aiosmtplib

from dicommail.config import Config, SmtpConfig
from dicommail.errors import AuthenticationError, ConfigError, InputError, TransportError

log = logging.getLogger("dicommail.sender")

#: The slowest upload we still wait for.  aiosmtplib writes the whole mail to
#: the socket and then waits for one reply, so the reply timeout after DATA
#: must cover the upload, not just the server's think time.
MIN_UPLOAD_RATE = 32 * 1024

_RETRY_HINT = "sending is retried later (dicommail send --pending)"


def is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _reply(code: int, message: str) -> str:
    # Multi-line replies arrive joined by newlines; one line reads better in logs and the DB.
    return f"{code} {' '.join(message.split())}".strip()


def _tls_failure(exc: BaseException) -> ssl.SSLError | None:
    """The TLS error behind ``exc`` (aiosmtplib wraps some), if there is one."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


class SmtpClient:
    """A submission client for one server, used as an async context manager.

    ``async with SmtpClient(config.smtp, password, ca_file) as smtp:`` connects
    (TLS or STARTTLS, then AUTH when a username is configured); each
    :meth:`send` then submits one mail file over the same connection.
    """

    def __init__(self, config: SmtpConfig, password: str | None = None, ca_file: Path | None = None) -> None:
        if config.security == "none" and not is_loopback(config.host):
            raise ConfigError(
                f'smtp.security = "none" is only allowed for a server on this machine, not {config.host}',
                'use "starttls" (port 587) or "tls" (port 465)',
            )
        if config.username and password is None:
            raise ConfigError(
                "smtp.username is set but no password is configured",
                "put the password on the first line of a file and name it in smtp.password_file",
            )
        self.config = config
        self._password = password
        self._ca_file = ca_file
        host = f"[{config.host}]" if ":" in config.host else config.host
        #: ``host:port``, for messages and logs.
        self.endpoint = f"{host}:{config.port}"
        self._smtp: aiosmtplib.SMTP | None = None

    @classmethod
    def from_config(cls, config: Config) -> SmtpClient:
        """A client for ``[smtp]``: the password from smtp.password_file, never from argv."""
        password = config.secret(config.smtp.password_file, "smtp.password_file")
        ca_file = config.resolve(config.smtp.ca_file) if config.smtp.ca_file else None
        return cls(config.smtp, password, ca_file)

    @property
    def connected(self) -> bool:
        return self._smtp is not None and self._smtp.is_connected

    # -- connection -------------------------------------------------------------

    async def __aenter__(self) -> SmtpClient:
        await self.connect()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    def _tls_context(self) -> ssl.SSLContext:
        # The system's CAs plus smtp.ca_file ("extra CA certificates" in the
        # config); verification and the host name check are the defaults.
        context = ssl.create_default_context()
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self._ca_file is not None:
            try:
                context.load_verify_locations(cafile=str(self._ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"cannot load the CA certificates named by smtp.ca_file ({self._ca_file}): {exc}",
                    "smtp.ca_file must name a readable PEM file with the CA that issued the server's certificate",
                ) from exc
        # Already the defaults; said explicitly so that no later edit weakens them unnoticed.
        context.verify_mode = ssl.CERT_REQUIRED
        context.check_hostname = True
        return context

    async def connect(self) -> None:
        """Connect, secure the connection as configured and log in."""
        if self.connected:
            return
        config = self.config
        tls = self._tls_context() if config.security != "none" else None
        smtp = aiosmtplib.SMTP(
            hostname=config.host,
            port=config.port,
            timeout=config.timeout,
            use_tls=config.security == "tls",
            # STARTTLS is driven below, so that a server without it is an error, not plain text.
            start_tls=False,
            tls_context=tls,
        )
        try:
            await smtp.connect()
            if config.security == "starttls":
                await smtp.ehlo()
                if not smtp.supports_extension("starttls"):
                    raise TransportError(
                        f"the SMTP server {self.endpoint} does not offer STARTTLS",
                        'dicommail never sends unencrypted; use smtp.security = "tls" with the server\'s '
                        "implicit-TLS port (usually 465), or enable STARTTLS on the server",
                        temporary=False,
                    )
                await smtp.starttls()
            if config.username:
                await self._login(smtp)
        except BaseException as exc:
            smtp.close()
            if isinstance(exc, TransportError) or not isinstance(exc, Exception):
                raise
            raise self._connect_error(exc) from exc
        self._smtp = smtp
        log.debug("connected to %s (security %s)", self.endpoint, config.security)

    async def _login(self, smtp: aiosmtplib.SMTP) -> None:
        username = self.config.username
        if not smtp.supports_extension("auth"):
            await smtp.ehlo()  # the extension list is reset after STARTTLS
        if not smtp.supports_extension("auth"):
            raise TransportError(
                f"the SMTP server {self.endpoint} does not offer AUTH",
                "check smtp.security and smtp.port (many servers offer AUTH only after TLS), "
                "or leave smtp.username empty if the server needs no login",
                temporary=False,
            )
        try:
            await smtp.login(username, self._password or "")
        except aiosmtplib.SMTPAuthenticationError as exc:
            reply = _reply(exc.code, exc.message)
            if 400 <= exc.code < 500:
                raise TransportError(
                    f"the SMTP server {self.endpoint} could not check the login of {username} now: {reply}",
                    _RETRY_HINT,
                    temporary=True,
                ) from exc
            raise AuthenticationError(
                f"the SMTP server {self.endpoint} refused the login of {username}: {reply}",
                "check smtp.username and the password in the file named by smtp.password_file",
            ) from exc

    def _connect_error(self, exc: Exception) -> TransportError:
        """A TransportError for a failure while connecting, securing or logging in."""
        where = f"the SMTP server {self.endpoint}"
        check = "check smtp.host, smtp.port and smtp.security, and that the server is running and reachable"
        tls = _tls_failure(exc)
        if isinstance(tls, ssl.SSLCertVerificationError):
            return TransportError(
                f"the TLS certificate of {where} could not be verified: {tls.verify_message}",
                "check smtp.host (the certificate must name it) and smtp.ca_file (the CA that issued it)",
                temporary=False,
            )
        if tls is not None:
            return TransportError(
                f"TLS with {where} failed: {tls.reason or tls}",
                'check smtp.security: "tls" for an implicit-TLS port (465), "starttls" for 587',
                temporary=False,
            )
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            reply = _reply(exc.code, exc.message)
            temporary = 400 <= exc.code < 500
            return TransportError(
                f"{where} refused the session: {reply}",
                _RETRY_HINT if temporary else check,
                temporary=temporary,
            )
        if isinstance(exc, TimeoutError):  # aiosmtplib's timeouts derive from it
            # A server that never greets is often a TLS port spoken to in plain text (or the reverse).
            mismatch = ('; a port that expects TLS from the start (465) needs smtp.security = "tls"'
                        if self.config.security != "tls" else
                        '; a port that starts in plain text (587, 25) needs smtp.security = "starttls"')
            return TransportError(
                f"timed out connecting to {where} (after {self.config.timeout} s)",
                f"{check}{mismatch}; {_RETRY_HINT}",
            )
        if isinstance(exc, OSError):
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            if isinstance(cause, socket.gaierror):  # its errno is a resolver code, no errno
                return TransportError(f"cannot connect to {where}: the name {self.config.host} does not resolve "
                                      f"({cause.strerror})", f"check smtp.host and the DNS; {_RETRY_HINT}")
            # asyncio words it "Connect call failed (...)"; the errno says what happened.
            reason = os.strerror(cause.errno) if cause.errno else str(cause)
            return TransportError(f"cannot connect to {where}: {reason}", f"{check}; {_RETRY_HINT}")
        if isinstance(exc, aiosmtplib.SMTPException):
            return TransportError(f"{where} failed: {exc.message}", check, temporary=False)
        raise exc

    async def close(self) -> None:
        """Say QUIT if the connection still stands; close it in any case."""
        smtp, self._smtp = self._smtp, None
        if smtp is None:
            return
        try:
            if smtp.is_connected:
                await smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass  # the mails are handed over already; a failed goodbye changes nothing
        finally:
            smtp.close()

    # -- sending ----------------------------------------------------------------

    async def send(self, path: Path, sender: str, recipients: Sequence[str]) -> str:
        """Submit one mail file; return the server's reply (e.g. ``250 2.0.0 Ok: queued as …``).

        A reply only comes once the server has taken responsibility for the
        mail.  If the connection breaks after the data went out but before the
        reply, the mail may still be delivered: the error is temporary and a
        retry may duplicate it, which receivers tolerate.
        """
        smtp = self._smtp
        if smtp is None or not smtp.is_connected:
            self._smtp = None
            raise TransportError(f"the connection to the SMTP server {self.endpoint} is closed", _RETRY_HINT)
        try:
            data = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise InputError(
                f"cannot read the mail file {path.name}: {exc.strerror}",
                "the outbox spool was changed behind dicommail's back; pack and send the study again",
            ) from exc
        timeout = self.config.timeout + len(data) / MIN_UPLOAD_RATE
        try:
            refused, message = await smtp.sendmail(sender, list(recipients), data, timeout=timeout)
        except Exception as exc:
            raise self._send_error(exc) from exc
        if refused:
            # Some recipients took it, so a retry would duplicate it for them.
            listed = ", ".join(f"{address} ({_reply(*reply)})" for address, reply in refused.items())
            raise TransportError(
                f"the SMTP server {self.endpoint} accepted the mail but refused recipients: {listed}",
                "check the recipient addresses",
                temporary=False,
            )
        return _reply(250, message)

    def _send_error(self, exc: Exception) -> TransportError:
        where = f"the SMTP server {self.endpoint}"
        if isinstance(exc, aiosmtplib.SMTPRecipientsRefused) and exc.recipients:
            first = exc.recipients[0]
            return self._refusal(f"{where} refused the recipient {first.recipient}", first.code, first.message)
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return self._refusal(f"{where} refused the mail", exc.code, exc.message)
        if isinstance(exc, TimeoutError):
            self._smtp = None  # aiosmtplib closed it: the protocol is out of step
            return TransportError(
                f"{where} did not answer within {self.config.timeout} s (plus upload time)", _RETRY_HINT
            )
        if isinstance(exc, OSError):
            self._smtp = None
            return TransportError(f"the connection to {where} broke while sending: {exc}", _RETRY_HINT)
        if isinstance(exc, ValueError):  # aiosmtplib's address check
            return TransportError(f"cannot send to {where}: {exc}", "check the addresses", temporary=False)
        if isinstance(exc, aiosmtplib.SMTPException):
            return TransportError(f"{where} failed: {exc.message}", _RETRY_HINT)
        raise exc

    @staticmethod
    def _refusal(what: str, code: int, message: str) -> TransportError:
        reply = _reply(code, message)
        if 400 <= code < 500:
            return TransportError(f"{what}: {reply}", f"the server asked to try again later; {_RETRY_HINT}")
        hint = "the server will not take this mail as it is"
        if code == 552:
            hint = (
                "the mail is larger than the server accepts: "
                "lower packing.max_mail_size (or the peer's) or pass --max-mail-size"
            )
        elif code in (550, 551, 553):
            hint = "check the sender and recipient addresses and what the server allows this account to send"
        return TransportError(f"{what}: {reply}", hint, temporary=False)
