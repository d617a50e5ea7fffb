"""Configuration: one TOML file in the dicommail home, validated on load.

The home directory (``--home``, ``$DICOMMAIL_HOME`` or ``~/.dicommail``)
holds ``dicommail.toml``, the GnuPG keyring (``gnupg/``), the state database
and the spool.  Every setting has a documented default, so a missing file or
section means "defaults"; unknown keys are errors because a typo in a
teleradiology config must not be silently ignored.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicommail.errors import ConfigError

CONFIG_NAME = "dicommail.toml"
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B?|B)?\s*$", re.IGNORECASE)
_UID_ROOT_RE = re.compile(r"^[1-9]\d*(\.(0|[1-9]\d*))*$")
_ADDRESS_RE = re.compile(r"^[^@\s<>\"]+@[^@\s<>\"]+$")

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


@dataclass(frozen=True)
class IdentityConfig:
    address: str = ""
    key: str = ""
    passphrase_file: str = ""


@dataclass(frozen=True)
class PackingConfig:
    max_mail_size: int = 10 * 1024**2
    compression_level: int = 1
    uid_root: str = ""
    workers: int = 2


@dataclass(frozen=True)
class UnpackingConfig:
    max_decrypted_size: int = 1024**3


@dataclass(frozen=True)
class PeerConfig:
    address: str
    max_mail_size: int | None = None


@dataclass(frozen=True)
class Config:
    home: Path
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    packing: PackingConfig = field(default_factory=PackingConfig)
    unpacking: UnpackingConfig = field(default_factory=UnpackingConfig)
    peers: dict[str, PeerConfig] = field(default_factory=dict)

    @property
    def gnupg_home(self) -> Path:
        return self.home / "gnupg"

    @property
    def config_file(self) -> Path:
        return self.home / CONFIG_NAME

    def max_mail_size_for(self, address: str) -> int:
        peer = self.peers.get(address.lower())
        if peer and peer.max_mail_size:
            return peer.max_mail_size
        return self.packing.max_mail_size

    def passphrase(self) -> str | None:
        """Our key's passphrase, read from the configured file (never from argv)."""
        if not self.identity.passphrase_file:
            return None
        path = self._resolve(self.identity.passphrase_file)
        try:
            return path.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as exc:
            raise ConfigError(
                f"cannot read the passphrase file {path}: {exc.strerror}",
                "check identity.passphrase_file in the config and the file's permissions",
            ) from exc

    def _resolve(self, value: str) -> Path:
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
        raise ConfigError(f"{path} is not valid TOML: {exc}", "fix the syntax error at the position shown") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    return parse_config(raw, home, source=str(path))


def parse_config(raw: dict[str, Any], home: Path, source: str = "config") -> Config:
    """Validate a parsed TOML document into a :class:`Config`."""
    reader = _Reader(raw, source)
    identity = reader.section("identity", ("address", "key", "passphrase_file"))
    packing = reader.section("packing", ("max_mail_size", "compression_level", "uid_root", "workers"))
    unpacking = reader.section("unpacking", ("max_decrypted_size",))
    peers_raw = reader.table("peers")
    reader.no_other_sections(("identity", "packing", "unpacking", "peers"))

    address = reader.string(identity, "identity.address", "")
    if address and not is_mail_address(address):
        raise ConfigError(f"{source}: identity.address {address!r} is not a mail address")
    uid_root = reader.string(packing, "packing.uid_root", "")
    if uid_root and (not _UID_ROOT_RE.match(uid_root) or len(uid_root) > 24):
        raise ConfigError(
            f"{source}: packing.uid_root {uid_root!r} is not a valid UID root",
            "use your organisation's registered root (digits and dots, at most 24 characters) or leave it empty",
        )
    level = reader.integer(packing, "packing.compression_level", 1)
    if not 0 <= level <= 9:
        raise ConfigError(f"{source}: packing.compression_level must be 0..9, got {level}")
    workers = reader.integer(packing, "packing.workers", 2)
    if not 1 <= workers <= 64:
        raise ConfigError(f"{source}: packing.workers must be 1..64, got {workers}")

    peers: dict[str, PeerConfig] = {}
    for peer_address, peer_raw in peers_raw.items():
        if not is_mail_address(peer_address) or not isinstance(peer_raw, dict):
            raise ConfigError(f'{source}: [peers."{peer_address}"] must name a mail address and be a table')
        reader.only_keys(peer_raw, f'peers."{peer_address}"', ("max_mail_size",))
        size = reader.size(peer_raw, f'peers."{peer_address}".max_mail_size', None)
        peers[peer_address.lower()] = PeerConfig(address=peer_address, max_mail_size=size)

    return Config(
        home=home,
        identity=IdentityConfig(
            address=address,
            key=reader.string(identity, "identity.key", ""),
            passphrase_file=reader.string(identity, "identity.passphrase_file", ""),
        ),
        packing=PackingConfig(
            max_mail_size=reader.size(packing, "packing.max_mail_size", 10 * 1024**2) or 0,
            compression_level=level,
            uid_root=uid_root,
            workers=workers,
        ),
        unpacking=UnpackingConfig(
            max_decrypted_size=reader.size(unpacking, "unpacking.max_decrypted_size", 1024**3) or 0,
        ),
        peers=peers,
    )


class _Reader:
    """Typed access to a raw TOML dict with error messages that name the key."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def table(self, name: str) -> dict[str, Any]:
        value = self.raw.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{self.source}: [{name}] must be a table")
        return value

    def section(self, name: str, keys: tuple[str, ...]) -> dict[str, Any]:
        value = self.table(name)
        self.only_keys(value, name, keys)
        return value

    def only_keys(self, table: dict[str, Any], name: str, keys: tuple[str, ...]) -> None:
        unknown = sorted(set(table) - set(keys))
        if unknown:
            raise ConfigError(
                f"{self.source}: unknown setting(s) in [{name}]: {', '.join(unknown)}",
                f"known settings there: {', '.join(keys)}",
            )

    def no_other_sections(self, names: tuple[str, ...]) -> None:
        self.only_keys(self.raw, "top level", names)

    def string(self, table: dict[str, Any], key: str, default: str) -> str:
        value = table.get(key.rsplit(".", 1)[-1], default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.source}: {key} must be a string")
        return value

    def integer(self, table: dict[str, Any], key: str, default: int) -> int:
        value = table.get(key.rsplit(".", 1)[-1], default)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{self.source}: {key} must be a whole number")
        return value

    def size(self, table: dict[str, Any], key: str, default: int | None) -> int | None:
        value = table.get(key.rsplit(".", 1)[-1], default)
        if value is None:
            return None
        try:
            size = parse_size(value)
        except ValueError as exc:
            raise ConfigError(f"{self.source}: {key}: {exc}") from exc
        if key.endswith("max_mail_size") and size < MIN_MAIL_SIZE:
            raise ConfigError(f"{self.source}: {key} must be at least {format_size(MIN_MAIL_SIZE)}")
        return size


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

# Per-peer settings, keyed by the peer's mail address.
# [peers."practice@practice.example"]
# max_mail_size = "5M"
"""


def render_template(address: str = "") -> str:
    return CONFIG_TEMPLATE.format(address=address)
