"""The two demo sites whose keys ship in ``keys/`` (PUBLIC TEST KEYS: never for patient data)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import KeyInfo, certify, import_keys
from dicommail.errors import InputError

Site = Literal["hospital", "practice"]

SITES: dict[str, str] = {
    "hospital": "hospital@hospital.test",
    "practice": "practice@practice.test",
}


def default_keys_dir() -> Path:
    """``keys/`` in the source tree (the demo keys are not part of the installed package)."""
    return Path(__file__).resolve().parents[2] / "keys"


def install_demo_site(keyring: Keyring, site: Site, keys_dir: Path | None = None) -> tuple[KeyInfo, KeyInfo]:
    """Make ``keyring`` the demo ``site``: its secret key plus the other site's key, certified.

    Returns (own key, peer key).  Both demo sites trust each other afterwards.
    """
    if site not in SITES:
        raise InputError(f"unknown demo site {site!r}", f"use one of: {', '.join(SITES)}")
    keys_dir = keys_dir or default_keys_dir()
    peer = "practice" if site == "hospital" else "hospital"
    try:
        own_data = (keys_dir / f"{site}.sec.asc").read_bytes()
        peer_data = (keys_dir / f"{peer}.pub.asc").read_bytes()
    except OSError as exc:
        raise InputError(
            f"demo key file missing: {exc.filename}",
            "the demo keys live in keys/ of the dicommail source tree",
        ) from exc
    (own,) = (k for k in import_keys(keyring, own_data, allow_secret=True) if k.has_secret)
    # An imported secret key gets no ownertrust; certifying our own key sets it.
    own = certify(keyring, own.fingerprint, signer=own.fingerprint).key
    (peer_key,) = import_keys(keyring, peer_data)
    peer_key = certify(keyring, peer_key.fingerprint, signer=own.fingerprint).key
    return own, peer_key
