"""``dicommail check``: is this site ready to run?  Config, keys, mail servers and PACS, one by one.

Each check gives a :class:`CheckResult`; a failed check never stops the
others, so one run shows everything that needs fixing.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dicommail.config import Config
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import KeyInfo, find_key, own_key
from dicommail.errors import DicommailError

#: A key that expires sooner than this is a problem now: peers need time to get the new one.
EXPIRY_MARGIN = timedelta(days=30)


@dataclass(frozen=True)
class CheckResult:
    """One check of ``dicommail check``: what was checked, whether it passed, what was found, what to do.

    ``name`` is for people ("key of a@b.example"); ``id`` is for scripts and
    stays the same across versions and languages: "config", "own-key",
    "peer-key:<address>", "smtp", "mailbox", "pacs".  Without an ``id`` the
    name is the id (as for "config").
    """

    name: str
    ok: bool
    detail: str
    hint: str = ""
    id: str = ""

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)

    def to_json(self) -> dict[str, object]:
        """One entry of ``dicommail check --json``'s ``checks`` list: ``id`` for scripts, ``check`` for people."""
        return {"id": self.id, "check": self.name, "ok": self.ok, "detail": self.detail,
                "hint": self.hint or None}


def _expiry_problem(key: KeyInfo, now: datetime) -> str:
    if key.expires is None:
        return ""
    expires = key.expires if key.expires.tzinfo else key.expires.replace(tzinfo=UTC)
    if expires <= now:
        return f"expired on {expires:%Y-%m-%d}"
    if expires - now < EXPIRY_MARGIN:
        return f"expires on {expires:%Y-%m-%d}, in less than {EXPIRY_MARGIN.days} days"
    return ""


def _run(check_id: str, name: str, check: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, True, check(), id=check_id)
    except DicommailError as exc:
        return CheckResult(name, False, exc.message, exc.hint, id=check_id)
    except OSError as exc:
        return CheckResult(name, False, f"{exc.strerror or exc} ({exc.filename or '-'})", "check the path and the disk",
                           id=check_id)


def run_checks(config: Config, *, now: datetime | None = None) -> list[CheckResult]:
    """Every check that applies to this config, in a fixed order."""
    now = now or datetime.now(UTC)
    results = [CheckResult("config", True, f"{config.config_file} is valid", id="config")]
    keyring = Keyring(config.gnupg_home)
    try:
        results.append(_run("own-key", "own key", lambda: _check_own_key(config, keyring, now)))
        recipients = sorted({r for route in config.routes.values() for r in route.recipients})
        for recipient in recipients:
            results.append(_run(f"peer-key:{recipient}", f"key of {recipient}",
                                functools.partial(_check_recipient, keyring, recipient, now)))
    finally:
        keyring.close()
    results.append(_run("smtp", "SMTP login", lambda: _check_smtp(config)))
    if config.mailbox.username:
        results.append(_run("mailbox", f"{config.mailbox.protocol.upper()} login", lambda: _check_mailbox(config)))
    if _pacs_configured(config):
        results.append(_run("pacs", "PACS C-ECHO", lambda: _check_pacs(config)))
    return results


def _pacs_configured(config: Config) -> bool:
    # [pacs] matters where this site receives studies (a mailbox) and forwards them to a PACS.
    return config.receiver.destination == "pacs" and bool(config.mailbox.username)


def _check_own_key(config: Config, keyring: Keyring, now: datetime) -> str:
    key = own_key(keyring, config.identity.key)
    problem = _expiry_problem(key, now)
    if problem:
        raise DicommailError(
            f"this site's key {key.fingerprint} {problem}",
            "extend it (`dicommail keys extend`) or make a new one, and send the public key to your peers",
        )
    if config.passphrase() is None and config.identity.passphrase_file:
        raise DicommailError("identity.passphrase_file is empty")
    until = f"until {key.expires:%Y-%m-%d}" if key.expires else "no expiry"
    return f"{key.fingerprint} ({key.email or key.user_id}, {key.algorithm}, {until})"


def _check_recipient(keyring: Keyring, address: str, now: datetime) -> str:
    key = find_key(keyring, address)
    if not key.certified:
        raise DicommailError(
            f"the key {key.fingerprint} of {address} is not certified (validity: {key.validity})",
            f"compare the fingerprint with the peer, then: dicommail keys certify {address}",
        )
    if not key.can_encrypt:
        raise DicommailError(f"the key {key.fingerprint} of {address} cannot encrypt",
                             "ask the peer for a key with an encryption subkey")
    problem = _expiry_problem(key, now)
    if problem:
        raise DicommailError(f"the key {key.fingerprint} of {address} {problem}",
                             "ask the peer for their extended or new key and import it")
    return f"{key.fingerprint}, certified" + (f", until {key.expires:%Y-%m-%d}" if key.expires else "")


def _check_smtp(config: Config) -> str:
    from dicommail.transport.smtp import SmtpClient

    client = SmtpClient.from_config(config)

    async def login() -> None:
        async with client:
            pass

    asyncio.run(login())
    who = f" as {config.smtp.username}" if config.smtp.username else ""
    return f"{client.endpoint} ({config.smtp.security}){who}"


def _check_mailbox(config: Config) -> str:
    from dicommail.receiver.retrievers import make_retriever
    from dicommail.receiver.spool import Spool
    from dicommail.store.db import Database

    db = Database(config.state_db)
    try:
        retriever = make_retriever(config, db, Spool(config.spool))
        asyncio.run(retriever.check_login())
    finally:
        db.close()
    box = config.mailbox
    return f"{box.host}:{box.port} ({box.security}) as {box.username}"


def _check_pacs(config: Config) -> str:
    from dicommail.receiver.destinations import echo

    seconds = echo(config.pacs)
    pacs = config.pacs
    return f"{pacs.called_aet}@{pacs.host}:{pacs.port} from {pacs.calling_aet} in {seconds * 1000:.0f} ms"
