"""Fixtures for wire-format tests: demo sites with real keyrings and synthetic studies."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.samples import write_ct_study, write_mr_study, write_multiframe
from dicommail.wire.pack import Packer, PackOptions

KEYS = Path(__file__).resolve().parents[2] / "keys"
HOSPITAL = "hospital@hospital.test"
PRACTICE = "practice@practice.test"


@dataclass
class Site:
    """A dicommail home with the demo keys of one site."""

    home: Path
    keyring: Keyring
    address: str

    @property
    def fingerprint(self) -> str:
        return own_key(self.keyring).fingerprint

    def packer(self, recipient: str, max_mail_size: int = 10 * 1024**2, **kwargs: object) -> Packer:
        options = PackOptions(
            sender=self.address,
            recipient=recipient,
            signer=self.fingerprint,
            max_mail_size=max_mail_size,
            **kwargs,  # type: ignore[arg-type]
        )
        return Packer(self.keyring, options)


def _site(name: str, address: str) -> Iterator[Site]:
    # Short paths: gpg-agent's socket path must stay under 108 characters.
    home = Path(tempfile.mkdtemp(prefix=f"dm{name[:1]}"))
    (home / "dicommail.toml").write_text(f'[identity]\naddress = "{address}"\n', encoding="utf-8")
    keyring = Keyring(home / "gnupg")
    install_demo_site(keyring, name, KEYS)  # type: ignore[arg-type]
    try:
        yield Site(home, keyring, address)
    finally:
        keyring.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def hospital_site() -> Iterator[Site]:
    yield from _site("hospital", HOSPITAL)


@pytest.fixture(scope="session")
def practice_site() -> Iterator[Site]:
    yield from _site("practice", PRACTICE)


@pytest.fixture(scope="session")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """20 CT slices of 512x512 (about 10 MiB), Latin-1 patient name."""
    return write_ct_study(tmp_path_factory.mktemp("ct"), 20, charset="ISO_IR 100", patient_name="Müller^Jürgen")


@pytest.fixture(scope="session")
def mr_study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_mr_study(tmp_path_factory.mktemp("mr"), 4)


@pytest.fixture(scope="session")
def multiframe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One 4 MiB multi-frame object: fragmented at small mail sizes."""
    return write_multiframe(tmp_path_factory.mktemp("mf"), frames=16)
