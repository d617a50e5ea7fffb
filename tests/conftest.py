"""Shared fixtures: real GnuPG keyrings for the two demo sites and a stranger; the test bed's servers.

GnuPG homes live in short directories under /tmp (``tempfile.mkdtemp``),
not in pytest's tmp_path: gpg-agent's socket path must stay under 108
characters.  Session fixtures must not be changed lastingly by tests (no
certify/revoke/delete on them): use ``new_keyring`` for that.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import KeyInfo, certify, export_key, generate, import_keys, own_key
from testbed import MailServers, Pacs, ensure_installed
from testbed.install import missing_packages

KEYS_DIR = Path(__file__).resolve().parents[1] / "keys"
HOSPITAL = "hospital@hospital.test"
PRACTICE = "practice@practice.test"
STRANGER = "stranger@stranger.test"


def short_tempdir(prefix: str = "dm") -> Path:
    """A new, empty directory with a short path (for GnuPG and dicommail homes)."""
    return Path(tempfile.mkdtemp(prefix=prefix))


@dataclass
class _Homes:
    """Keyrings made during a test or session, closed and removed at the end."""

    made: list[tuple[Keyring, Path]]

    def new(self) -> Keyring:
        base = short_tempdir()
        keyring = Keyring(base / "g")
        self.made.append((keyring, base))
        return keyring

    def close(self) -> None:
        for keyring, base in self.made:
            keyring.close()
            shutil.rmtree(base, ignore_errors=True)
        self.made.clear()


@pytest.fixture(scope="session")
def keys_dir() -> Path:
    return KEYS_DIR


@pytest.fixture(scope="session")
def _session_homes() -> Iterator[_Homes]:
    homes = _Homes([])
    yield homes
    homes.close()


@pytest.fixture(scope="session")
def hospital(_session_homes: _Homes) -> Keyring:
    """The demo hospital (hospital@hospital.test); trusts the demo practice."""
    keyring = _session_homes.new()
    install_demo_site(keyring, "hospital", KEYS_DIR)
    return keyring


@pytest.fixture(scope="session")
def practice(_session_homes: _Homes) -> Keyring:
    """The demo practice (practice@practice.test); trusts the demo hospital."""
    keyring = _session_homes.new()
    install_demo_site(keyring, "practice", KEYS_DIR)
    return keyring


@pytest.fixture(scope="session")
def stranger_key(_session_homes: _Homes, hospital: Keyring, practice: Keyring) -> tuple[Keyring, KeyInfo]:
    keyring = _session_homes.new()
    key = generate(keyring, "Stranger (TEST ONLY)", STRANGER, algo="ed25519", expires="never")
    # The stranger trusts both demo sites (so it can send to them), but they
    # only know its public key: they have not certified it.
    for site in (hospital, practice):
        (peer,) = import_keys(keyring, export_key(site, site_address(site)).encode())
        certify(keyring, peer.fingerprint)
        import_keys(site, export_key(keyring, key.fingerprint).encode())
    return keyring, key


@pytest.fixture(scope="session")
def stranger(stranger_key: tuple[Keyring, KeyInfo]) -> Keyring:
    """A third site (stranger@stranger.test, ed25519) whose public key hospital and
    practice hold but have NOT certified; the stranger has certified both of them."""
    return stranger_key[0]


def site_address(keyring: Keyring) -> str:
    """The mail address of the (only) secret key in a demo keyring."""
    return own_key(keyring).email


@pytest.fixture
def new_keyring() -> Iterator[Callable[[], Keyring]]:
    """A factory for fresh, empty keyrings (closed and removed after the test)."""
    homes = _Homes([])
    yield homes.new
    homes.close()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (e.g. a dicommail home for CLI tests)."""
    path = short_tempdir()
    yield path
    # Any gpg-agent started for a keyring inside must not outlive the test.
    if (path / "gnupg").exists():
        Keyring(path / "gnupg").close()
    shutil.rmtree(path, ignore_errors=True)


# -- the test bed: real servers (Postfix + Dovecot, Orthanc) on loopback, started once per session ----------------
# In temporary directories under /tmp (short paths, reachable by the postfix and mail users), killed and
# removed at the end.  Missing Debian packages are installed first (root).


@pytest.fixture(scope="session")
def _installed() -> None:
    if missing_packages() and os.geteuid() != 0:
        pytest.skip("testbed packages missing and not root to install them")
    ensure_installed()


@pytest.fixture(scope="session")
def mail_servers(_installed: None) -> Iterator[MailServers]:
    """Postfix + Dovecot with accounts hospital@hospital.test and practice@practice.test."""
    with MailServers() as servers:
        yield servers


@pytest.fixture(scope="session")
def pacs(_installed: None) -> Iterator[Pacs]:
    """Orthanc with AE title PRACTICEPACS."""
    with Pacs() as server:
        yield server


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """A CLI test that sets up logging (the service commands do) must not leak its handlers into later tests."""
    import logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level,
             {name: logging.getLogger(name).level for name in ("dicommail", "pynetdicom")})
    yield
    root.handlers[:], root.level = saved[0], saved[1]
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)
