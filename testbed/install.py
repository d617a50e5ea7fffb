"""Install the Debian packages the test bed needs (idempotent)."""

from __future__ import annotations

import os
import subprocess

PACKAGES: tuple[str, ...] = (
    "postfix",
    "dovecot-core",
    "dovecot-imapd",
    "dovecot-pop3d",
    "dovecot-lmtpd",
    "orthanc",
    "openssl",
    "dcmtk",
)

# Without this, postfix's postinst asks which kind of mail setup we want.
_DEBCONF_PRESEED = "postfix postfix/main_mailer_type select No configuration\n"


def is_installed(package: str) -> bool:
    """Return True if dpkg reports *package* as fully installed."""
    result = subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.returncode == 0 and result.stdout.strip() == "install ok installed"


def missing_packages(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Return the subset of *packages* that is not installed."""
    return [p for p in packages if not is_installed(p)]


def ensure_installed(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Install whatever of *packages* is missing; return what was installed."""
    missing = missing_packages(packages)
    if not missing:
        return []
    if os.geteuid() != 0:
        raise PermissionError(f"need root to install: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["debconf-set-selections"], input=_DEBCONF_PRESEED, text=True, check=True
    )
    subprocess.run(["apt-get", "update", "-q"], env=env, check=True)
    subprocess.run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing],
        env=env,
        check=True,
    )
    stop_system_services()
    return missing


def stop_system_services() -> None:
    """Stop system-wide instances a postinst may have started.

    They would not conflict on ports (we use our own), but leaving daemons
    around that nobody asked for is untidy and wastes memory.
    """
    for cmd in (["postfix", "stop"], ["doveadm", "stop"]):
        subprocess.run(cmd, capture_output=True, check=False)
    subprocess.run(
        ["service", "orthanc", "stop"], capture_output=True, check=False
    )
