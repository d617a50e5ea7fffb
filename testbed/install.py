"""Install the Debian packages the test bed needs (idempotent)."""

from __future__ import annotations

import os
import pwd
import shutil
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

MAIL_USER = "dmvmail"
"""Unprivileged owner of the Dovecot mail store (Dovecot refuses root)."""

# Without this, postfix's postinst asks which kind of mail setup we want.
_DEBCONF_PRESEED = "postfix postfix/main_mailer_type select No configuration\n"


def dcmtk_tool(name: str) -> str:
    """Absolute path of a DCMTK program such as "echoscu" or "storescu".

    pynetdicom installs Python scripts with the same names (echoscu, ...)
    that may come first on PATH; the tests want DCMTK's.
    """
    return f"/usr/bin/{name}"


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


def ensure_mail_user(name: str = MAIL_USER) -> pwd.struct_passwd:
    """Return the mail store user, creating it as a system user if missing."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    # Not check=True: a concurrent run may have created it meanwhile.
    subprocess.run(
        [
            "useradd", "--system", "--user-group", "--no-create-home",
            "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin", name,
        ],
        check=False,
    )  # fmt: skip
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise RuntimeError(f"could not create the mail user {name!r} (useradd failed)") from None


def ensure_installed(packages: tuple[str, ...] = PACKAGES) -> list[str]:
    """Install whatever of *packages* is missing; return what was installed.

    Also creates the mail store user, which needs no package.
    """
    missing = missing_packages(packages)
    if not missing:
        ensure_mail_user()
        return []
    if os.geteuid() != 0:
        raise PermissionError(f"need root to install: {' '.join(missing)}")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["debconf-set-selections"], input=_DEBCONF_PRESEED, text=True, check=True)
    # Wait for the dpkg lock rather than fail if another apt run holds it.
    wait_for_lock = ["-o", "DPkg::Lock::Timeout=300"]
    subprocess.run(["apt-get", *wait_for_lock, "update", "-q"], env=env, check=True)
    subprocess.run(
        ["apt-get", *wait_for_lock, "install", "-y", "-q", "--no-install-recommends", *missing],
        env=env,
        check=True,
    )
    stop_system_services()
    ensure_mail_user()
    return missing


def stop_system_services() -> None:
    """Stop system-wide instances a postinst may have started.

    They would not conflict on ports (we use our own), but leaving daemons
    around that nobody asked for is untidy and wastes memory.
    """
    for command in (["postfix", "stop"], ["doveadm", "stop"], ["service", "orthanc", "stop"]):
        if shutil.which(command[0]) is not None:
            subprocess.run(command, capture_output=True, check=False)
