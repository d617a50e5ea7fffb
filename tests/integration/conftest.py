"""Session-wide real servers (Postfix + Dovecot, Orthanc) on loopback.

The servers start once per session, in temporary directories under /tmp
(short paths, reachable by the postfix and mail users), and are killed and
removed at the end. Missing Debian packages are installed first (root).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from testbed import MailServers, Pacs, ensure_installed
from testbed.install import missing_packages


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "integration: needs real servers (Postfix, Dovecot, Orthanc, dcmtk)")


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
