"""Configuration: one TOML file in the dicommail home, validated on load.

The home directory (``--home``, ``$DICOMMAIL_HOME`` or ``~/.dicommail``)
holds ``dicommail.toml``, the GnuPG keyring (``gnupg/``), the state database
and the spool.  Every setting has a documented default, so a missing file or
section means "defaults"; unknown keys are errors because a typo in a
teleradiology config must not be silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dicommail.constancy.values import DEFAULT_HEADER_ENTRIES, check_entries
from dicommail.errors import ConfigError, InputError

CONFIG_NAME = "dicommail.toml"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UID_ROOT_RE = re.compile(r"^[1-9]\d*(\.(0|[1-9]\d*))*$")
_ADDRESS_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+$")
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")

#: The smallest mail we allow: smaller makes no sense on today's mail servers.
MIN_MAIL_SIZE = 64 * 1024


def parse_size(value: str | int) -> int:
    """Parse ``10M``, ``512K``, ``1G``, ``1.5MiB`` or a plain byte count (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"size must be positive, got {value}")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 10M, 512K, 1G)")
    number, unit = float(match.group(1)), (match.group(2) or "B")[:1].upper()
    factor = {"B": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[unit]
    size = int(number * factor)
    if size <= 0:
        raise ValueError(f"size must be positive, got {value!r}")
    return size


_FREE_SPACE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[Tt](?:i?B)?\s*$")


def parse_free_space(value: str | int) -> int:
    """A free-space threshold: a size as :func:`parse_size` takes it, also in T (TiB); 0 or "0" turns it off."""
    if value == 0 or (isinstance(value, str) and value.strip() == "0"):
        return 0
    match = _FREE_SPACE_RE.match(value) if isinstance(value, str) else None
    if match:
        return int(float(match.group(1)) * 1024**4)
    return parse_size(value)


def format_size(size: int) -> str:
    """Render a byte count for humans (binary units)."""
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def is_mail_address(value: str) -> bool:
    return bool(_ADDRESS_RE.match(value))


def _setting(default: Any, *, kind: str = "", choices: tuple[str, ...] = (), low: int | None = None,
             high: int | None = None) -> Any:
    """A config field with what validation it needs (``kind="size"`` takes 10M etc.)."""
    return field(default=default, metadata={"kind": kind, "choices": choices, "low": low, "high": high})


@dataclass(frozen=True)
class IdentityConfig:
    address: str = _setting("", kind="address")
    key: str = ""
    passphrase_file: str = ""


@dataclass(frozen=True)
class PackingConfig:
    max_mail_size: int = _setting(10 * 1024**2, kind="size", low=MIN_MAIL_SIZE)
    compression_level: int = _setting(1, low=0, high=9)
    uid_root: str = _setting("", kind="uid_root")
    workers: int = _setting(2, low=1, high=64)


@dataclass(frozen=True)
class UnpackingConfig:
    max_decrypted_size: int = _setting(1024**3, kind="size", low=MIN_MAIL_SIZE)


@dataclass(frozen=True)
class SmtpConfig:
    host: str = "localhost"
    port: int = _setting(587, low=1, high=65535)
    security: str = _setting("starttls", choices=("starttls", "tls", "none"))
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    timeout: int = _setting(60, low=1, high=3600)
    max_attempts: int = _setting(8, low=1, high=100)


@dataclass(frozen=True)
class MailboxConfig:
    protocol: str = _setting("imap", choices=("imap", "pop3"))
    host: str = "localhost"
    port: int = _setting(993, low=1, high=65535)
    security: str = _setting("tls", choices=("tls", "starttls", "none"))
    username: str = ""
    password_file: str = ""
    ca_file: str = ""
    folder: str = "INBOX"
    after_processing: str = _setting("move", choices=("move", "delete", "keep"))
    processed_folder: str = "DICOM-Mail/Processed"
    other_mail_folder: str = ""
    idle: bool = True
    timeout: int = _setting(60, low=1, high=3600)
    max_message_size: int = _setting(64 * 1024**2, kind="size", low=MIN_MAIL_SIZE)


@dataclass(frozen=True)
class ReceiverConfig:
    interval: int = _setting(60, low=1, high=86400)
    set_timeout: int = _setting(24 * 3600, low=60, high=90 * 86400)
    destination: str = _setting("pacs", choices=("pacs", "folder"))
    folder: str = ""
    retry_limit: int = _setting(0, low=0, high=1000)
    quarantine_days: int = _setting(30, low=1, high=3650)
    forward: str = _setting("complete", choices=("complete", "progressive"))
    forward_emergency: str = _setting("progressive", choices=("complete", "progressive"))


@dataclass(frozen=True)
class PacsConfig:
    host: str = "localhost"
    port: int = _setting(104, low=1, high=65535)
    called_aet: str = _setting("PACS", kind="aet")
    calling_aet: str = _setting("DICOMMAIL", kind="aet")
    timeout: int = _setting(30, low=1, high=3600)
    in_flight_check: str = _setting("c-find", choices=("c-find", "none"))


@dataclass(frozen=True)
class GatewayConfig:
    """``[gateway]``: the C-STORE service a PACS pushes studies to (``dicommail gateway``)."""

    aet: str = _setting("DICOMMAIL", kind="aet")
    host: str = "127.0.0.1"
    port: int = _setting(11112, low=1, high=65535)
    study_idle_seconds: int = _setting(30, low=1, high=86400)
    max_parallel_studies: int = _setting(2, low=1, high=64)
    allowed_calling_aets: tuple[str, ...] = _setting((), kind="aet_list")
    allowed_addresses: tuple[str, ...] = _setting((), kind="ip_list")
    default_route: str = ""
    send_interval: int = _setting(60, low=1, high=86400)
    duplicate_window: int = _setting(7 * 86400, low=0, high=90 * 86400)


@dataclass(frozen=True)
class RouteConfig:
    """``[routes."AETITLE"]``: where a study pushed to that called AE title goes."""

    aet: str
    recipients: tuple[str, ...] = _setting((), kind="mail_list")
    note: str = ""
    emergency: bool = False
    max_mail_size: int | None = _setting(None, kind="size", low=MIN_MAIL_SIZE)


@dataclass(frozen=True)
class RetentionConfig:
    """``[retention]``: how long the spool keeps the files of finished work, and the free space it leaves.

    Only files go; the records in ``state.db`` stay.  0 days keeps that kind
    of file for ever.  The quarantine keeps its own ``receiver.quarantine_days``.
    """

    #: Days the outbox keeps the mails of a delivered or cancelled transfer (failed ones stay until deleted).
    outbox_days: int = _setting(30, low=0, high=36500)
    #: Days the spool's inbox keeps a processed or quarantined mail once its set is delivered, failed or expired.
    inbox_days: int = _setting(30, low=0, high=36500)
    #: Days the spool keeps a built acknowledgement after it was sent (or given up).
    notifications_days: int = _setting(7, low=0, high=36500)
    #: Below this free space on the spool's file system the gateway refuses C-STORE (0xA700) and the
    #: receiver does not fetch; 0: no guard.
    min_free_space: int = _setting(1024**3, kind="free_space")


@dataclass(frozen=True)
class TrackingConfig:
    ack_timeout: int = _setting(24 * 3600, low=1, high=90 * 86400)
    resend_limit: int = _setting(3, low=0, high=100)
    notifications: bool = True


@dataclass(frozen=True)
class ConstancyConfig:
    """``[constancy]``: DIN 6868-159 constancy checks (``dicommail constancy``)."""

    #: A folder with the test data set (one study); empty: a synthetic CT made once in spool/constancy/dataset.
    dataset: str = ""
    #: Size of the synthetic test set in MiB (512x512 16-bit CT slices of 512 KiB each).
    dataset_mib: int = _setting(20, low=1, high=4096)
    #: DICOM keywords whose values the receiver compares with the sender's.
    header_entries: tuple[str, ...] = _setting(DEFAULT_HEADER_ENTRIES, kind="keyword_list")
    #: Seconds from the first mail handed to SMTP until the receipt; DIN 6868-159 allows at most 900.
    time_limit: int = _setting(900, low=1, high=900)
    #: Peers checked when ``--to`` is not given (and by the example timers).
    peers: tuple[str, ...] = _setting((), kind="mail_list")
    #: Where a failed check is reported by mail (through [smtp]); empty: the log and the exit code only.
    admin_address: str = _setting("", kind="address")
    #: Receiving side: a folder for received test sets (never the clinical PACS); empty: kept nowhere.
    test_destination: str = ""
    #: Years the check records are kept in state.db (separate from the transfers' records).
    retention_years: int = _setting(10, low=1, high=100)


#: How acknowledgements go back to a peer: signed+encrypted, plain RFC 8098 MDN, or both.
NOTIFICATION_METHODS = ("pgp", "rfc", "both")


@dataclass(frozen=True)
class PeerConfig:
    address: str
    max_mail_size: int | None = None
    notification: str = "pgp"


@dataclass(frozen=True)
class Config:
    home: Path
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    unpacking: UnpackingConfig = field(default_factory=UnpackingConfig)
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    mailbox: MailboxConfig = field(default_factory=MailboxConfig)
    receiver: ReceiverConfig = field(default_factory=ReceiverConfig)
    pacs: PacsConfig = field(default_factory=PacsConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    peers: dict[str, PeerConfig] = field(default_factory=dict)
    #: The sections the config file names (e.g. whether [smtp] was set up at all).
    configured: frozenset[str] = frozenset()
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    constancy: ConstancyConfig = field(default_factory=ConstancyConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)

    @property
    def gnupg_home(self) -> Path:
        return self.home / "gnupg"

    @property
    def config_file(self) -> Path:
        return self.home / CONFIG_NAME

    @property
    def state_db(self) -> Path:
        return self.home / "state.db"

    @property
    def spool(self) -> Path:
        return self.home / "spool"

    def max_mail_size_for(self, address: str) -> int:
        peer = self.peers.get(address.lower())
        if peer and peer.max_mail_size:
            return peer.max_mail_size
        return self.packing.max_mail_size

    def notification_for(self, address: str) -> str:
        """How acknowledgements go to ``address``: "pgp" (default), "rfc" or "both"."""
        peer = self.peers.get(address.lower())
        return peer.notification if peer else "pgp"

    def passphrase(self) -> str | None:
        """Our key's passphrase, read from the configured file (never from argv)."""
        return self.secret(self.identity.passphrase_file, "identity.passphrase_file")

    def secret(self, file_name: str, setting: str) -> str | None:
        """The first line of a secret file named by a setting, or ``None`` when unset."""
        if not file_name:
            return None
        path = self.resolve(file_name)
        try:
            return path.read_text(encoding="utf-8").splitlines()[0] if path.stat().st_size else ""
        except OSError as exc:
            raise ConfigError(
                f"cannot read the file {path} named by {setting}: {exc.strerror}",
                f"check {setting} in the config and the file's permissions",
            ) from exc

    def resolve(self, value: str) -> Path:
        """A path from the config: relative paths are relative to the home directory."""
        path = Path(value).expanduser()
        return path if path.is_absolute() else self.home / path


def default_home() -> Path:
    env = os.environ.get("DICOMMAIL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".dicommail"


def load_config(home: Path | None = None) -> Config:
    """Load ``dicommail.toml`` from ``home``; a missing file means all defaults."""
    home = (home or default_home()).expanduser().absolute()
    path = home / CONFIG_NAME
    if not path.exists():
        return Config(home=home)
    try:
        with path.open("rb") as handle:
            raw = tomllib.load(handle)
    except tomllib.TOMLDecodeError as exc:
        # tomllib ends its message with "(at line L, column C)": put it in front, as compilers do.
        position = re.search(r"\s*\(at line (\d+), column (\d+)\)$", str(exc))
        where = f"{path}:{position[1]}:{position[2]}" if position else str(path)
        detail = str(exc)[: position.start()] if position else str(exc)
        raise ConfigError(f"{where}: not valid TOML: {detail}", "fix the syntax error at the position shown") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_config(raw, home, source=str(path))


_SECTIONS: dict[str, type] = {
    "identity": IdentityConfig,
    "packing": PackingConfig,
    "unpacking": UnpackingConfig,
    "smtp": SmtpConfig,
    "mailbox": MailboxConfig,
    "receiver": ReceiverConfig,
    "pacs": PacsConfig,
    "gateway": GatewayConfig,
    "tracking": TrackingConfig,
    "constancy": ConstancyConfig,
    "retention": RetentionConfig,
}
#: Sections that are tables of tables, keyed by a name (parsed separately).
_KEYED_SECTIONS = ("peers", "routes")


def parse_config(raw: dict[str, Any], home: Path, source: str = "config") -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    unknown = sorted(set(raw) - set(_SECTIONS) - set(_KEYED_SECTIONS))
    if unknown:
        known_sections = [*_SECTIONS, *_KEYED_SECTIONS]
        raise ConfigError(
            f"{_at(source, unknown[0])}: unknown section(s): {', '.join(unknown)}",
            _did_you_mean(unknown, known_sections) + f"known sections: {', '.join(known_sections)}",
        )
    sections = {name: _section(cls, raw.get(name, {}), name, source) for name, cls in _SECTIONS.items()}
    peers_raw = raw.get("peers", {})
    if not isinstance(peers_raw, dict):
        raise ConfigError(f"{source}: [peers] must be a table of peer addresses")
    peers: dict[str, PeerConfig] = {}
    for peer_address, peer_raw in peers_raw.items():
        if not is_mail_address(peer_address) or not isinstance(peer_raw, dict):
            raise ConfigError(f'{source}: [peers."{peer_address}"] must name a mail address and be a table')
        packing_raw = {k: v for k, v in peer_raw.items() if k != "notification"}
        settings = _section(PackingConfig, packing_raw, f'peers."{peer_address}"', source, only=("max_mail_size",))
        size = settings.max_mail_size if "max_mail_size" in peer_raw else None
        notification = peer_raw.get("notification", "pgp")
        if notification not in NOTIFICATION_METHODS:
            raise ConfigError(
                f'{source}: peers."{peer_address}".notification must be one of {", ".join(NOTIFICATION_METHODS)}, '
                f"got {notification!r}"
            )
        peers[peer_address.lower()] = PeerConfig(address=peer_address, max_mail_size=size, notification=notification)
    routes = _routes(raw.get("routes", {}), source)
    gateway: GatewayConfig = sections["gateway"]
    if gateway.default_route and gateway.default_route not in routes:
        raise ConfigError(
            f"{source}: gateway.default_route names {gateway.default_route!r}, which is no [routes] table",
            f'add [routes."{gateway.default_route}"] or leave gateway.default_route empty',
        )
    return Config(home=home, peers=peers, routes=routes, configured=frozenset(raw), **sections)


def _routes(table: Any, source: str) -> dict[str, RouteConfig]:
    """``[routes."AETITLE"]`` tables: the called AE title a PACS pushes to picks the recipients."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [routes] must be a table of AE titles")
    routes: dict[str, RouteConfig] = {}
    for aet, route_raw in table.items():
        where = f'routes."{aet}"'
        if not _AET_RE.match(aet) or aet != aet.strip() or not isinstance(route_raw, dict):
            raise ConfigError(
                f"{source}: [{where}] must name a DICOM AE title (1-16 characters, no backslash, no "
                "leading or trailing spaces) and be a table"
            )
        settings = _section(RouteConfig, route_raw, where, source, skip=("aet",))
        if not settings.recipients:
            raise ConfigError(f"{source}: {where}.recipients is empty", "list at least one recipient address")
        routes[aet] = dataclasses.replace(settings, aet=aet)
    return routes


def _section(cls: type, table: Any, name: str, source: str, only: tuple[str, ...] = (),
             skip: tuple[str, ...] = ()) -> Any:
    """Build one section's dataclass from its TOML table, validating every value.

    ``skip`` names fields that are not settings (filled in by the caller; given
    an empty placeholder here).
    """
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: [{name}] must be a table")
    known = {f.name: f for f in fields(cls) if (not only or f.name in only) and f.name not in skip}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            f"{_at(source, name, unknown[0])}: unknown setting(s) in [{name}]: {', '.join(unknown)}",
            _did_you_mean(unknown, list(known)) + f"known settings there: {', '.join(known)}",
        )
    values: dict[str, Any] = {}
    for key, value in table.items():
        spec = known[key]
        meta = spec.metadata
        where = f"{_at(source, name, key)}: {name}.{key}"
        if meta.get("kind") == "size":
            try:
                value = parse_size(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc}") from exc
        elif meta.get("kind") == "free_space":
            try:
                value = parse_free_space(value)
            except ValueError as exc:
                raise ConfigError(f"{where}: {exc} (or 0 for no limit)") from exc
        elif meta.get("kind", "").endswith("_list"):
            if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
                raise ConfigError(f"{where} must be a list of strings")
            value = tuple(value)
        elif spec.type in (bool, "bool"):
            if not isinstance(value, bool):
                raise ConfigError(f"{where} must be true or false")
        elif spec.type in (int, "int"):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{where} must be a whole number")
        elif not isinstance(value, str):
            raise ConfigError(f"{where} must be a string")
        low, high, choices = meta.get("low"), meta.get("high"), meta.get("choices")
        if isinstance(value, int) and not isinstance(value, bool):
            if low is not None and value < low:
                shown = format_size(low) if meta.get("kind") == "size" else str(low)
                raise ConfigError(f"{where} must be at least {shown}")
            if high is not None and value > high:
                raise ConfigError(f"{where} must be at most {high}")
        if choices and value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        _check_kind(meta.get("kind", ""), value, where)
        values[key] = value
    return cls(**{name: "" for name in skip}, **values)


def _did_you_mean(unknown: list[str], known: list[str]) -> str:
    """``did you mean interval? `` for a misspelt name, or nothing."""
    guesses = [(name, close[0]) for name in unknown if (close := difflib.get_close_matches(name, known, n=1))]
    if not guesses:
        return ""
    if len(unknown) == 1:
        return f"did you mean {guesses[0][1]}? "
    return "did you mean " + ", ".join(f"{guess} for {name}" for name, guess in guesses) + "? "


_TOML_HEADER_RE = re.compile(r"^\[\s*([^\[\]]+?)\s*\]\s*(#.*)?$")
_TOML_KEY_PART = r"""(?:"[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)"""
_TOML_KEY_RE = re.compile(rf"^({_TOML_KEY_PART}(?:\s*\.\s*{_TOML_KEY_PART})*)\s*=")


def _toml_key(text: str) -> tuple[str, ...]:
    """A TOML key (``peers."a@b.example"``, ``a . b``) as its parts, quotes removed."""
    return tuple(part.strip("\"'") for part in re.findall(r'"[^"]*"|\'[^\']*\'|[^.\s]+', text))


def _at(source: str, section: str, key: str | None = None) -> str:
    """``FILE:LINE`` of ``[section]`` (or of ``key`` in it) when ``source`` is a config file that has it, else FILE."""
    if not source.endswith(".toml"):
        return source
    try:
        status = Path(source).stat()
    except OSError:
        return source
    line = _toml_lines(source, status.st_mtime_ns, status.st_size).get(
        _toml_key(section) + ((key,) if key is not None else ()))
    return f"{source}:{line}" if line else source


@functools.lru_cache(maxsize=4)
def _toml_lines(source: str, _mtime_ns: int, _size: int) -> dict[tuple[str, ...], int]:
    """Where each table header and key of a TOML file is: the parsed document has no positions.

    Cached per file version (name, time, size): every setting's error text asks.
    """
    try:
        lines = Path(source).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return {}
    found: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    for number, line in enumerate(lines, 1):
        text = line.strip()
        header = _TOML_HEADER_RE.match(text)
        assignment = None if header else _TOML_KEY_RE.match(text)
        if header:
            table = _toml_key(header[1])
            found.setdefault(table, number)
        elif assignment:
            found.setdefault(table + _toml_key(assignment[1]), number)
    return found


def _check_kind(kind: str, value: Any, where: str) -> None:
    if kind == "address" and value and not is_mail_address(value):
        raise ConfigError(f"{where}: {value!r} is not a mail address")
    if kind == "uid_root" and value and (not _UID_ROOT_RE.match(value) or len(value) > 24):
        raise ConfigError(
            f"{where}: {value!r} is not a valid UID root",
            "use your organisation's registered root (digits and dots, at most 24 characters) or leave it empty",
        )
    if kind == "aet" and not _AET_RE.match(value):
        raise ConfigError(f"{where}: {value!r} is not a DICOM AE title (1-16 characters, no backslash)")
    if kind == "aet_list":
        for item in value:
            _check_kind("aet", item, where)
    if kind == "mail_list":
        for item in value:
            if not is_mail_address(item):
                raise ConfigError(f"{where}: {item!r} is not a mail address")
    if kind == "ip_list":
        for item in value:
            _check_ip(item, where)
    if kind == "keyword_list":
        _check_keywords(value, where)


def _check_keywords(value: tuple[str, ...], where: str) -> None:
    try:
        check_entries(value)
    except InputError as exc:
        raise ConfigError(f"{where}: {exc.message}", exc.hint) from exc


def _check_ip(value: str, where: str) -> None:
    """An IP address or network (``192.0.2.7``, ``192.0.2.0/24``, ``::1``)."""
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        raise ConfigError(f"{where}: {value!r} is not an IP address or network (e.g. 192.0.2.7 or 192.0.2.0/24)") \
            from exc


CONFIG_TEMPLATE = """\
# dicommail configuration.  Every setting shows its default; delete what you
# do not change.  Sizes take K, M, G (binary units).  Keep this file
# readable only by the service account: it names your key and peers.

[identity]
# The mail address this site sends from.  Receivers certify the key that
# belongs to it; acknowledgements come back to it.
address = "{address}"
# Fingerprint of this site's own signing key.  Empty: the only secret key
# in the keyring (dicommail keys generate makes one).
key = ""
# A file holding the key's passphrase, relative to this home directory.
# Empty: the key has no passphrase.  Never pass passphrases on the command line.
passphrase_file = ""

[packing]
# Largest mail on the wire, headers included.  Many mail servers refuse
# mails over 10-25 MiB.  Files are never split across set parts; a single
# file too large for one mail is sent as message/partial fragments.
max_mail_size = "10M"
# OpenPGP compression level 0-9.  1 is about four times faster than 6 for
# about 4% more bytes on CT data.
compression_level = 1
# Your organisation's DICOM UID root for set IDs.  Empty: 2.25.<UUID>.
uid_root = ""
# Mails packed in parallel (one gpg process each).
workers = 2

[unpacking]
# Upper bound for one decrypted mail: a defence against compression bombs.
max_decrypted_size = "1G"

[smtp]
# The submission server that sends our mails.
host = "localhost"
port = 587
# "starttls" (port 587), "tls" (implicit TLS, port 465), or "none" (only for
# a server on this machine).  Certificates are always verified.
security = "starttls"
username = ""
# A file with the SMTP password on its first line, relative to this home.
password_file = ""
# Extra CA certificates (PEM) to trust; empty: the system's CAs.
ca_file = ""
timeout = 60
# Tries per mail before a temporary failure (server down, 4xx) fails the
# transfer.  After its n-th failed try a mail waits B * 2^(n-1) seconds, at
# most 30 minutes, where B is gateway.send_interval in `dicommail gateway`
# and 30 in `send`, `send --pending` and the receiver (which try again only
# when they next run).  With the defaults a transfer fails after an outage
# of about 91 minutes in the gateway (60, 120, ... 960, 1800, 1800 s), 62
# minutes elsewhere.
max_attempts = 8

[mailbox]
# Where studies for this site arrive: "imap" or "pop3".
protocol = "imap"
host = "localhost"
port = 993
# "tls" (IMAPS 993 / POP3S 995), "starttls" (143 / 110), or "none".
security = "tls"
username = ""
password_file = ""
ca_file = ""
folder = "INBOX"
# What happens on the server to a DICOM-Mail once it is stored here:
# "move" (IMAP only, to processed_folder), "delete", or "keep".
after_processing = "move"
processed_folder = "DICOM-Mail/Processed"
# Other mail is never deleted: left in place, or moved here (IMAP) if set.
other_mail_folder = ""
# Wait for new mail with IMAP IDLE between polls, where the server offers it.
idle = true
timeout = 60
# Mails larger than this (as the server reports their size) are not fetched:
# they stay on the server and are reported.  A defence against mail that
# would fill the spool; keep it above packing.max_mail_size of your peers.
max_message_size = "64M"

[receiver]
# Seconds between polls (without IDLE) and between retries.
interval = 60
# Seconds an incomplete set waits for its missing parts before it expires.
set_timeout = 86400
# Where verified studies go: "pacs" (C-STORE, see [pacs]) or "folder".
destination = "pacs"
folder = ""
# Forwarding attempts before a set is reported failed; 0 = keep trying.
retry_limit = 0
# Days the quarantine keeps a refused mail (encrypted, with its reason)
# before the receiver removes it.
quarantine_days = 30
# When the instances of a set go to the PACS: "complete" = once every part
# is there and verified; "progressive" = each part's instances as soon as
# that part is verified (its signature and its own manifest), so the first
# images are readable before the last mail arrives.  Either way the set is
# checked for completeness and acknowledged as a whole, and no instance is
# sent twice; a set that never completes leaves its first parts in the PACS.
# forward_emergency applies to sets the sender marked EMERGENCY.  A folder
# destination always gets whole sets.
forward = "complete"
forward_emergency = "progressive"

[pacs]
# The local PACS that receives verified studies by C-STORE.
host = "localhost"
port = 104
called_aet = "PACS"
calling_aet = "DICOMMAIL"
timeout = 30
# After a crash while an instance was being sent, ask the PACS whether it
# stored it before sending it again: "c-find" (IMAGE level, by SOP Instance
# UID) or "none" (send it again: the PACS may then hold it twice).
in_flight_check = "c-find"

[gateway]
# `dicommail gateway`: a DICOM node (C-STORE and C-ECHO) the PACS pushes
# studies to; each study leaves as a DICOM-Mail set.  Register one node per
# referrer in the PACS, each with its own called AE title (a [routes] table).
# This gateway's own AE title (also accepted as called AE title for C-ECHO).
aet = "DICOMMAIL"
# Address to listen on.  The default accepts only this machine; set the
# address of the network the PACS is on (or "0.0.0.0" for all) to serve it.
host = "127.0.0.1"
port = 11112
# A study is complete when nothing arrived for it for this many seconds
# after the association that carried it ended; then it is packed and sent.
study_idle_seconds = 30
# Studies packed and sent at the same time.
max_parallel_studies = 2
# Only these calling AE titles / peer addresses (IP or network) may push;
# empty lists allow any.
allowed_calling_aets = []
allowed_addresses = []
# The route for called AE titles without a [routes] table; empty: reject them.
default_route = ""
# Seconds between the gateway's rounds over the outbox, and its first wait
# after a temporary SMTP failure: a mail is tried again after send_interval
# seconds, then twice as long after each further failure, at most 30 minutes
# (or send_interval, if longer), for smtp.max_attempts tries in all.
send_interval = 60
# A PACS that repeats a C-STORE the gateway had already stored (its success
# answer was lost in a crash) is answered "success" without sending the
# instance again, if the same SOP Instance UID with the same content
# arrived within this many seconds.  0: every push is sent.
duplicate_window = 604800

# One table per called AE title: who gets studies pushed to it.
# [routes."DR_MILLER"]
# recipients = ["reading@practice.example"]
# note = "From St. Example Radiology"
# emergency = false
# max_mail_size = "10M"

[tracking]
# Acknowledgements: a sent transfer that has no final notification from the
# receiver after this many seconds is shown as expired.
ack_timeout = 86400
# Resends of parts the receiver reports as damaged or missing ("error, resend
# possible"), per transfer; 0: such a report fails the transfer at once.
resend_limit = 3
# Send acknowledgements (disposition notifications) for received sets back
# to their verified signer, through [smtp].
notifications = true

# Per-peer settings, keyed by the peer's mail address.
# [peers."practice@practice.example"]
# max_mail_size = "5M"
# How acknowledgements go to this peer: "pgp" (signed and encrypted, the
# default), "rfc" (plain RFC 8098 MDN, for senders that cannot decrypt them;
# accepted from this peer only with this setting) or "both".
# notification = "pgp"

[constancy]
# DIN 6868-159 constancy checks of teleradiology links: `dicommail constancy
# run --to PEER --kind daily|monthly|acceptance` sends a test data set marked
# as such inside the encryption; a receiving dicommail never forwards it to
# the clinical PACS, compares it and answers with a signed receipt.  The
# result, the transfer time (first mail handed to SMTP until the receipt)
# and the per-criterion results are kept in state.db; `dicommail constancy
# report` writes the month's signed PDF.  See examples/systemd/ for timers.
# The test data set: a folder with one study.  Empty: a synthetic CT (no
# patient data) generated once into spool/constancy/dataset.  DIN 6868-159
# asks for the largest data set of the modalities sent over the link.
dataset = ""
# Size of the synthetic CT in MiB (512x512 slices of 512 KiB each).
dataset_mib = 20
# DICOM keywords the receiver compares with the sender's values, per image.
# The default names no patient-identifying entries; the values never travel
# outside the encryption and never appear in logs or reports.
header_entries = [{header_entries}]
# Seconds allowed from the first mail handed to SMTP until the receipt:
# at most 900 (15 minutes, the limit of DIN 6868-159), never above.
time_limit = 900
# Peers `dicommail constancy run` checks when --to is not given.
peers = []
# A failed check is logged as an ERROR and exits 1; it is also reported by
# a plain mail (no patient data) to this address, through [smtp], if set.
admin_address = ""
# Receiving side: a folder where received test sets are written (they never
# reach the clinical PACS).  Empty: they are checked and then discarded.
test_destination = ""
# Years the check records are kept: the documentation of a teleradiology
# link is kept much longer than the transfers' own records.
retention_years = 10

[retention]
# How long the spool keeps the files of finished work.  The running receiver
# and gateway remove them once an hour (and at start); `dicommail cleanup
# --dry-run` shows what would go now.  Only files are removed: the records
# in state.db stay, so `dicommail status` and `dicommail stats` still show
# them.  0 keeps that kind of file for ever.  The quarantine keeps its items
# for receiver.quarantine_days.
# Days after a transfer was delivered (the receiver's final notification)
# or cancelled until its mails leave the outbox.  Failed and expired
# transfers keep theirs (for `dicommail transfers retry`) until deleted.
outbox_days = 30
# Days after a received set was delivered, failed or expired until its
# fetched mails (still encrypted) leave spool/inbox.  Its decoded files are
# removed as soon as it is delivered.
inbox_days = 30
# Days a sent (or given up) acknowledgement stays in spool/notifications.
notifications_days = 7
# Free space the spool's file system must keep (K, M, G, T; 0: no limit).
# Below it the gateway answers C-STORE with "out of resources" (0xA700),
# so the PACS keeps the study and retries, and the receiver stops fetching
# (mails stay on the server); both log an ERROR.  What is already stored is
# still processed and sent.
min_free_space = "1G"
"""


def render_template(address: str = "") -> str:
    return CONFIG_TEMPLATE.format(address=address, header_entries=_toml_list(DEFAULT_HEADER_ENTRIES))


def _toml_list(items: tuple[str, ...], width: int = 76) -> str:
    """``"a", "b", ...`` wrapped over indented lines, for a TOML array in the template."""
    lines: list[str] = []
    for item in items:
        quoted = f'"{item}",'
        if lines and len(lines[-1]) + 1 + len(quoted) <= width:
            lines[-1] += " " + quoted
        else:
            lines.append("    " + quoted)
    return "\n" + "\n".join(lines) + "\n" if lines else ""
