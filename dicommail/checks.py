"""``dicommail check``: is this site ready to run?  Config, secrets, keys, mail servers, PACS, gateway, one by one.

Each check gives a :class:`CheckResult`; a failed check never stops the
others, so one run shows everything that needs fixing.  Every check always
gives its row: one that does not apply to this site says "skipped" and which
setting would enable it.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import shlex
import socket
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from dicommail.config import Config, GatewayConfig
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import KeyInfo, find_key, own_key
from dicommail.errors import DicommailError, PassphraseError

#: A key that expires sooner than this is a problem now: peers need time to get the new one.
EXPIRY_MARGIN = timedelta(days=30)

#: "ok" and "warning" pass, "failed" does not; "skipped": the check does not apply to this site.
CheckStatus = Literal["ok", "warning", "failed", "skipped"]

_NOT_CONFIGURED = "not configured"
#: What the test signature signs: no patient data, recognisable if it is ever found on disk.
_TEST_MESSAGE = b"dicommail check: test signature\n"


@dataclass(frozen=True)
class CheckResult:
    """One check of ``dicommail check``: what was checked, how it came out, what was found, what to do.

    ``name`` is for people ("key of a@b.example"); ``id`` is for scripts and
    stays the same across versions and languages: "config", "file-modes",
    "own-key", "signing", "peer-key:<address>" (or "peer-key" when no peer
    is named), "smtp", "mailbox", "pacs", "spool-space", "gateway", "acknowledgements".
    Without an ``id`` the name is the id (as for "config").

    ``status`` is "ok", "warning" (passes, but should be fixed), "failed" or
    "skipped" (does not apply to this site; ``hint`` says which setting would
    enable it).  ``ok`` is False exactly for "failed"; a result made with
    ``ok=False`` alone is "failed".
    """

    name: str
    ok: bool
    detail: str
    hint: str = ""
    id: str = ""
    status: CheckStatus = "ok"

    def __post_init__(self) -> None:
        if not self.id:
            object.__setattr__(self, "id", self.name)
        if not self.ok and self.status == "ok":
            object.__setattr__(self, "status", "failed")
        if self.ok == (self.status == "failed"):
            raise ValueError(f"a check with ok={self.ok} cannot have the status {self.status!r}")

    def to_json(self) -> dict[str, object]:
        """One entry of ``dicommail check --json``'s ``checks`` list: ``id`` for scripts, ``check`` for people."""
        return {"id": self.id, "check": self.name, "status": self.status, "ok": self.ok, "detail": self.detail,
                "hint": self.hint or None}


@dataclass(frozen=True)
class _Outcome:
    """What a check found when it is not a plain pass (which is just its detail text)."""

    status: CheckStatus
    detail: str
    hint: str = ""


def _skipped(check_id: str, name: str, hint: str, detail: str = _NOT_CONFIGURED) -> CheckResult:
    return CheckResult(name, True, detail, hint, id=check_id, status="skipped")


def _run(check_id: str, name: str, check: Callable[[], str | _Outcome]) -> CheckResult:
    try:
        found = check()
    except DicommailError as exc:
        return CheckResult(name, False, exc.message, exc.hint, id=check_id)
    except OSError as exc:
        return CheckResult(name, False, f"{exc.strerror or exc} ({exc.filename or '-'})", "check the path and the disk",
                           id=check_id)
    if isinstance(found, str):
        return CheckResult(name, True, found, id=check_id)
    return CheckResult(name, found.status != "failed", found.detail, found.hint, id=check_id, status=found.status)


def run_checks(config: Config, *, now: datetime | None = None) -> list[CheckResult]:
    """Every check, in a fixed order; those that do not apply to this config are "skipped"."""
    now = now or datetime.now(UTC)
    results = [
        CheckResult("config", True, f"{config.config_file} is valid", id="config"),
        _run("file-modes", "file modes", lambda: _check_file_modes(config)),
    ]
    keyring = Keyring(config.gnupg_home)
    try:
        results.append(_run("own-key", "own key", lambda: _check_own_key(config, keyring, now)))
        results.append(_run("signing", "test signature", lambda: _check_signing(config, keyring)))
        peer_keys = {address.lower(): _run(f"peer-key:{address}", f"key of {address}",
                                           functools.partial(_check_recipient, keyring, address, now))
                     for address in _peers(config)}
    finally:
        keyring.close()
    results += peer_keys.values() or [_skipped(
        "peer-key", "peers' keys",
        'name peers in [routes."AETITLE"] recipients, constancy.peers or [peers."ADDRESS"] tables',
        "no peers configured")]
    if "smtp" in config.configured or _sends_quietly(config):
        results.append(_run("smtp", "SMTP login", lambda: _check_smtp(config)))
    else:
        results.append(_skipped("smtp", "SMTP login", "add [smtp] (this site's submission server) to send studies "
                                                      "and acknowledgements"))
    mailbox_name = f"{config.mailbox.protocol.upper()} login"
    if _receives(config):
        results.append(_run("mailbox", mailbox_name, lambda: _check_mailbox(config)))
    else:
        results.append(_skipped("mailbox", mailbox_name, "add [mailbox] (the account this site's mail arrives in) "
                                                         "to receive studies and acknowledgements"))
    results.append(_pacs_result(config))
    results.append(_run("spool-space", "spool free space", lambda: _check_spool_space(config)))
    # `dicommail init` writes a [gateway] table of defaults into every home: only routes or
    # a changed setting say this site means to run one (a receiving site must not fail here).
    if config.routes or config.gateway != GatewayConfig():
        results.append(_run("gateway", "gateway", lambda: _check_gateway(config, peer_keys)))
    else:
        results.append(_skipped("gateway", "gateway", 'add [gateway] and [routes."AETITLE"] tables to send the '
                                                      "studies a PACS pushes"))
    results.append(_run("acknowledgements", "acknowledgements", lambda: _check_acknowledgements(config)))
    return results


def _peers(config: Config) -> list[str]:
    """Every peer address the config names (routes, constancy, [peers]), each once, sorted."""
    named = [r for route in config.routes.values() for r in route.recipients]
    named += [*config.constancy.peers, *(peer.address for peer in config.peers.values())]
    unique = {address.lower(): address for address in reversed(named)}  # the first spelling wins
    return [unique[key] for key in sorted(unique)]


def _receives(config: Config) -> bool:
    return "mailbox" in config.configured or bool(config.mailbox.username)


def _sends(config: Config) -> list[str]:
    """Why this site counts as a sending one (empty if it does not): routes, constancy peers, past transfers."""
    reasons = []
    if config.routes:
        reasons.append("routes " + ", ".join(config.routes))
    if config.constancy.peers:
        reasons.append("constancy.peers")
    if _has_sent(config):
        reasons.append("transfers in its outbox")
    return reasons


def _sends_quietly(config: Config) -> list[str]:
    try:
        return _sends(config)
    except (DicommailError, OSError):
        return []  # an unreadable state.db: the acknowledgements row reports it


def _has_sent(config: Config) -> bool:
    if not config.state_db.exists():
        return False  # opening the database would create it
    from dicommail.store.db import Database

    db = Database(config.state_db)
    try:
        return bool(db.query("SELECT 1 FROM transfers LIMIT 1"))
    finally:
        db.close()


# -- secrets on disk -----------------------------------------------------------------------------------------


def _check_file_modes(config: Config) -> str | _Outcome:
    """Secret files readable or writable by anyone but their owner (gpg and ssh refuse such, we warn).

    The home, its config and keyring need no check: opening the site makes them private.
    """
    wanted: dict[Path, list[str]] = {}  # path -> the settings that name it
    for setting, value in (("identity.passphrase_file", config.identity.passphrase_file),
                           ("smtp.password_file", config.smtp.password_file),
                           ("mailbox.password_file", config.mailbox.password_file)):
        if value:
            wanted.setdefault(config.resolve(value), []).append(setting)
    if not wanted:
        return _Outcome("skipped", _NOT_CONFIGURED,
                        "checked once identity.passphrase_file, smtp.password_file or mailbox.password_file is set")
    loose: list[tuple[Path, int]] = []
    checked: list[str] = []
    for path, settings in wanted.items():
        try:
            mode = stat.S_IMODE(path.stat().st_mode)
        except FileNotFoundError:
            continue  # the check that uses the file says it is missing
        checked += settings
        if mode & 0o077:
            loose.append((path, mode))
    if not checked:
        return _Outcome("skipped", "none of the secret files exists (see the rows that use them)")
    if loose:
        detail = "; ".join(f"{path} is open to {_who(mode)} (mode {mode:04o})" for path, mode in loose)
        return _Outcome("warning", detail, "chmod 600 " + " ".join(shlex.quote(str(path)) for path, _ in loose))
    return f"only the owner can read the files of {', '.join(checked)}"


def _who(mode: int) -> str:
    group, others = bool(mode & 0o070), bool(mode & 0o007)
    return "its group and others" if group and others else "its group" if group else "others"


# -- keys ----------------------------------------------------------------------------------------------------


def _expiry_problem(key: KeyInfo, now: datetime) -> str:
    if key.expires is None:
        return ""
    expires = key.expires if key.expires.tzinfo else key.expires.replace(tzinfo=UTC)
    if expires <= now:
        return f"expired on {expires:%Y-%m-%d}"
    if expires - now < EXPIRY_MARGIN:
        return f"expires on {expires:%Y-%m-%d}, in less than {EXPIRY_MARGIN.days} days"
    return ""


def _check_own_key(config: Config, keyring: Keyring, now: datetime) -> str:
    key = own_key(keyring, config.identity.key)
    problem = _expiry_problem(key, now)
    if problem:
        raise DicommailError(
            f"this site's key {key.fingerprint} {problem}",
            "extend it (`dicommail keys extend`) or make a new one, and send the public key to your peers",
        )
    until = f"until {key.expires:%Y-%m-%d}" if key.expires else "no expiry"
    return f"{key.fingerprint} ({key.email or key.user_id}, {key.algorithm}, {until})"


def _check_signing(config: Config, keyring: Keyring) -> str | _Outcome:
    """Sign and encrypt a few bytes to our own key and decrypt them, as packer and receiver do.

    A wrong or missing passphrase shows here, not when the first study is packed.
    """
    try:
        key = own_key(keyring, config.identity.key)
    except DicommailError:
        return _Outcome("skipped", "needs this site's key (see own key)")
    passphrase = config.passphrase()
    keyring.forget_passphrases()  # else a passphrase cached by a running receiver or gateway hides a wrong one
    with tempfile.TemporaryDirectory(prefix="dicommail-check-") as scratch:
        plain, signed, back = (Path(scratch) / name for name in ("plain", "signed.asc", "back"))
        plain.write_bytes(_TEST_MESSAGE)
        try:
            keyring.sign_encrypt_file(plain, signed, recipient=key.fingerprint, signer=key.fingerprint,
                                      passphrase=passphrase, compress_level=config.packing.compression_level)
            verification = keyring.decrypt_verify_file(signed, back, max_output=1024 * 1024, passphrase=passphrase)
        except PassphraseError as exc:
            raise PassphraseError(exc.message, _passphrase_hint(config)) from exc
        if verification.fingerprint != key.fingerprint or back.read_bytes() != _TEST_MESSAGE:
            raise DicommailError(f"the test signature did not come back as signed by {key.fingerprint}",
                                 "run `dicommail keys list --secret` and check identity.key")
    source = f"the passphrase in {config.resolve(config.identity.passphrase_file)}" if passphrase else "no passphrase"
    return f"signed, encrypted, decrypted and verified with {source}"


def _passphrase_hint(config: Config) -> str:
    if not config.identity.passphrase_file:
        return "set identity.passphrase_file in dicommail.toml to a file holding the key's passphrase"
    path = config.resolve(config.identity.passphrase_file)
    return f"identity.passphrase_file names {path}: its first line must be the passphrase of this site's key"


def recipient_problem(keyring: Keyring, address: str, now: datetime | None = None) -> DicommailError | None:
    """Why nothing can be encrypted to ``address`` now (no key, not certified, expired...); None if it can."""
    try:
        _check_recipient(keyring, address, now or datetime.now(UTC))
    except DicommailError as exc:
        return exc
    return None


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


# -- servers -------------------------------------------------------------------------------------------------


def _check_smtp(config: Config) -> str:
    # Imported here, like the mail clients: only `dicommail check` talks to the servers.
    import asyncio

    from dicommail.transport.smtp import SmtpClient

    client = SmtpClient.from_config(config)

    async def login() -> None:
        async with client:
            pass

    asyncio.run(login())
    who = f" as {config.smtp.username}" if config.smtp.username else ""
    return f"{client.endpoint} ({config.smtp.security}){who}"


def _check_mailbox(config: Config) -> str:
    import asyncio

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


def _pacs_result(config: Config) -> CheckResult:
    name = "PACS C-ECHO"
    if config.receiver.destination != "pacs":
        return _skipped("pacs", name, "", f'not used: receiver.destination is "{config.receiver.destination}"')
    # [pacs] matters where studies arrive (a mailbox) to go to a PACS, or where it is set up for `dicommail echo`.
    if not _receives(config) and "pacs" not in config.configured:
        return _skipped("pacs", name, "add [mailbox] and [pacs] to receive studies into a PACS")
    return _run("pacs", name, lambda: _check_pacs(config))


def _check_pacs(config: Config) -> str:
    from dicommail.receiver.destinations import echo

    seconds = echo(config.pacs)
    pacs = config.pacs
    return f"{pacs.called_aet}@{pacs.host}:{pacs.port} from {pacs.calling_aet} in {seconds * 1000:.0f} ms"


def _check_spool_space(config: Config) -> str | _Outcome:
    """Below retention.min_free_space the gateway refuses every instance and the receiver fetches nothing."""
    from dicommail.config import format_size
    from dicommail.site.operations import free_space, free_space_short

    minimum = config.retention.min_free_space
    short = free_space_short(config.spool, minimum)
    if short is not None:
        return _Outcome("failed", f"the spool's file system has {format_size(short)} free, below "
                                  f"retention.min_free_space ({format_size(minimum)}): the gateway answers every "
                                  "instance 'out of resources' and the receiver fetches no mail",
                        f"free disk space (see `dicommail --home {shlex.quote(str(config.home))} cleanup "
                        "--dry-run`) or lower retention.min_free_space")
    free = format_size(free_space(config.spool))
    return f"{free} free" + (f" (at least {format_size(minimum)} kept free)" if minimum else "")


# -- gateway -------------------------------------------------------------------------------------------------


def _check_gateway(config: Config, peer_keys: dict[str, CheckResult]) -> str | _Outcome:
    """The port can be had (or this home's gateway has it), and every route leads to a usable key."""
    port = _gateway_port(config)
    problems = [port] if port.status == "failed" else []
    if not config.routes:
        problems.append(_Outcome("failed", "no routes are configured",
                                 'add a [routes."AETITLE"] table with the recipients for each DICOM node the PACS '
                                 "sends to"))
    for aet, route in config.routes.items():
        unusable = [r for r in route.recipients if not peer_keys[r.lower()].ok]
        if unusable:
            problems.append(_Outcome("failed", f"route {aet}: no usable key for {', '.join(unusable)}",
                                     "see the rows of those keys"))
    if problems:
        return _Outcome("failed", "; ".join(p.detail for p in problems),
                        "; ".join(dict.fromkeys(p.hint for p in problems if p.hint)))
    # AE titles were checked when the config was read: an invalid one is a config error.
    routes = f"AE {config.gateway.aet}, routes {', '.join(config.routes)}"
    studies = _gateway_studies(config)
    if studies is not None and (studies.status == "failed" or port.status == "ok"):
        return studies
    if studies is not None:  # both warnings: the port's and the studies'
        return _Outcome("warning", f"{port.detail}; {studies.detail}", f"{port.hint}; {studies.hint}")
    return _Outcome(port.status, f"{port.detail}; {routes}", port.hint)


#: A failed gateway study is reported by `check` for this long (it needs the PACS to send it again).
_FAILED_STUDY_DAYS = 7


def _gateway_studies(config: Config) -> _Outcome | None:
    """Studies the PACS was told "success" for that wait (a key, a full disk) or failed lately; None if none."""
    if not config.state_db.exists():
        return None
    import time

    from dicommail.store.db import Database

    db = Database(config.state_db)
    try:
        waiting = db.query("SELECT id, error FROM gateway_studies WHERE status = 'complete' AND error IS NOT NULL"
                           " ORDER BY id")
        # Not one the PACS has sent again since (a later study of that UID and route went out or is
        # going), nor one whose failed transfers were all retried (`transfers retry`).
        failed = db.query(
            "SELECT id, error FROM gateway_studies f WHERE status = 'failed' AND updated_at >= ? AND NOT EXISTS"
            " (SELECT 1 FROM gateway_studies g WHERE g.route = f.route AND g.study_uid = f.study_uid"
            " AND g.id > f.id AND g.status != 'failed')"
            " AND (NOT EXISTS (SELECT 1 FROM gateway_transfers gt WHERE gt.study_id = f.id) OR EXISTS"
            " (SELECT 1 FROM gateway_transfers gt JOIN transfers t ON t.id = gt.transfer_id WHERE gt.study_id = f.id"
            " AND t.status IN ('failed', 'expired', 'cancelled'))) ORDER BY id",
            (time.time() - _FAILED_STUDY_DAYS * 86400,))
    finally:
        db.close()
    if failed:
        return _Outcome("failed", f"{len(failed)} gateway stud{'y' if len(failed) == 1 else 'ies'} failed in the "
                                  f"last {_FAILED_STUDY_DAYS} days (study {failed[0]['id']}: "
                                  f"{failed[0]['error'] or 'its transfer failed'})",
                        "send them again from the PACS; `dicommail logs` says why they failed")
    if waiting:
        return _Outcome("warning", f"{len(waiting)} gateway stud{'y' if len(waiting) == 1 else 'ies'} wait to be "
                                   f"sent (study {waiting[0]['id']}: {waiting[0]['error']})",
                        "fix the cause; the gateway tries again by itself")
    return None


def _gateway_port(config: Config) -> _Outcome:
    gateway = config.gateway
    where = f"{gateway.host}:{gateway.port}"
    holder = _running_gateway(config.home)
    try:
        family, kind, proto, _, address = socket.getaddrinfo(gateway.host, gateway.port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        return _Outcome("failed", f"gateway.host {gateway.host!r} cannot be resolved: {exc.strerror}",
                        "set gateway.host to an address of this machine, or 0.0.0.0 for all")
    with socket.socket(family, kind, proto) as probe:
        # As the gateway's server does: a closed connection's TIME_WAIT does not block the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            return _port_problem(exc, config, holder)
    if holder is not None:
        return _Outcome("warning", f"this home's gateway ({holder}) runs, but not on {where}",
                        "restart it to apply the changed [gateway] settings")
    return _Outcome("ok", f"{where} is free")


def _port_problem(exc: OSError, config: Config, holder: str | None) -> _Outcome:
    gateway = config.gateway
    where = f"{gateway.host}:{gateway.port}"
    if exc.errno == errno.EADDRINUSE:
        if holder is not None:
            return _Outcome("ok", f"{where} in use by this home's gateway ({holder})")
        return _Outcome("failed", f"{where} is in use by another program",
                        f"stop it or set gateway.port to a free port; `ss -ltnp 'sport = :{gateway.port}'` shows "
                        "which program holds it")
    if exc.errno == errno.EADDRNOTAVAIL:
        return _Outcome("failed", f"gateway.host {gateway.host} is no address of this machine",
                        "set gateway.host to an address of this machine, or 0.0.0.0 for all")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return _Outcome("failed", f"listening on port {gateway.port} needs privileges",
                        "use a port above 1023 (the DICOM default is 11112) or give the service "
                        "CAP_NET_BIND_SERVICE")
    return _Outcome("failed", f"cannot listen on {where}: {exc.strerror}", "check gateway.host and gateway.port")


def _running_gateway(home: Path) -> str | None:
    """``"PID n"`` of the gateway running for ``home`` (it holds ``gateway.lock``), or None."""
    try:
        # Read-only: the lock file (see gateway_lock) is never created or changed here.
        handle = (home / "gateway.lock").open(encoding="ascii", errors="replace")
    except FileNotFoundError:
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = handle.read().strip()
            return f"PID {pid}" if pid.isdigit() else "PID unknown"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


# -- acknowledgements ----------------------------------------------------------------------------------------


def _check_acknowledgements(config: Config) -> str | _Outcome:
    """Acknowledgements need a way back: a sending site a mailbox, a receiving site SMTP."""
    sends, receives = _sends(config), _receives(config)
    if not sends and not receives:
        return _Outcome("skipped", _NOT_CONFIGURED, "configure [mailbox] to receive studies, or routes to send them")
    address = config.identity.address or "identity.address"
    if sends and not receives:
        return _Outcome("failed", f"this site sends ({'; '.join(sends)}) but has no [mailbox]: acknowledgements "
                                  "cannot reach it, so its transfers never show as delivered",
                        f"add [mailbox] with the account mail to {address} arrives in")
    if receives and "smtp" not in config.configured:
        return _Outcome("failed", "this site receives studies ([mailbox]) but has no [smtp]: their senders get "
                                  "no acknowledgements",
                        "add [smtp] with the submission server for this site's mail")
    if not config.tracking.notifications:
        return _Outcome("warning", "tracking.notifications is false: senders get no acknowledgements",
                        "set tracking.notifications = true unless the senders expect none")
    login = config.mailbox.username.lower()
    if sends and "@" in login and config.identity.address and login != config.identity.address.lower():
        return _Outcome("warning", f"acknowledgements go to {config.identity.address}, but [mailbox] logs in "
                                   f"as {config.mailbox.username}",
                        f"make sure mail to {config.identity.address} reaches that mailbox")
    ways = ["received through [mailbox]" if sends else "", "sent through [smtp]" if receives else ""]
    return "acknowledgements " + " and ".join(w for w in ways if w)
