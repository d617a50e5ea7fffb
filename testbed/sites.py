"""Two dicommail sites wired to the throwaway servers: a sending hospital and a receiving practice.

Used by the integration tests, the benchmarks and scripts/demo.  Unlike the rest of
the test bed it needs dicommail itself (the demo keys)."""

from __future__ import annotations

import argparse
import imaplib
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from testbed import MailServers, Pacs

HOSPITAL = "hospital@hospital.test"
PRACTICE = "practice@practice.test"
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Home:
    path: Path
    address: str

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300,
            check: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the dicommail command in a child process, as an operator would."""
        result = subprocess.run(
            [sys.executable, "-m", "dicommail", "--home", str(self.path), *args],
            capture_output=True, text=True, timeout=timeout, cwd=ROOT,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
        )
        if check:
            assert result.returncode == 0, result.stdout + result.stderr
        return result

    def popen(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "dicommail", "--home", str(self.path), *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, "COLUMNS": "200", **(env or {})},
        )


    def daemon(self, *args: str, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running dicommail command (receive, gateway); its log goes to ``log``."""
        with log.open("ab") as handle:
            return subprocess.Popen(
                [sys.executable, "-m", "dicommail", "--home", str(self.path), *args],
                stdin=subprocess.DEVNULL, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "COLUMNS": "200", **(env or {})},
            )


def gateway_config(port: int, routes: dict[str, str], *, idle_seconds: int = 1, send_interval: int = 2,
                   extra: str = "") -> str:
    """``[gateway]`` and ``[routes]`` for a gateway on 127.0.0.1:``port``; routes map called AE title to recipient."""
    text = f"""
[gateway]
aet = "HOSPGATEWAY"
host = "127.0.0.1"
port = {port}
study_idle_seconds = {idle_seconds}
send_interval = {send_interval}
{extra}
"""
    for aet, recipient in routes.items():
        text += f'\n[routes."{aet}"]\nrecipients = ["{recipient}"]\n'
    return text


def make_home(site: str, address: str, servers: MailServers | Any, pacs: Pacs | Any, *, protocol: str = "imap",
              password: str | None = None, extra: str = "", path: Path | None = None) -> Home:
    """A home for ``site`` ("hospital" or "practice", with its demo key) configured against the servers.

    ``servers`` and ``pacs`` may also be the objects :func:`from_state` makes from a running test bed.
    """
    # Short path: gpg-agent's socket must stay under 108 characters.
    if path is None:
        path = Path(tempfile.mkdtemp(prefix=f"dm{site[0]}"))
    else:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    (path / "mail.pass").write_text((password or servers.accounts[address]) + "\n")
    (path / "mail.pass").chmod(0o600)
    mailbox_port = servers.imaps_port if protocol == "imap" else servers.pop3s_port
    after = "move" if protocol == "imap" else "delete"
    (path / "dicommail.toml").write_text(
        f"""
[identity]
address = "{address}"

[smtp]
host = "localhost"
port = {servers.smtp_port}
security = "starttls"
username = "{address}"
password_file = "mail.pass"
ca_file = "{servers.ca_file}"

[mailbox]
protocol = "{protocol}"
host = "localhost"
port = {mailbox_port}
security = "tls"
username = "{address}"
password_file = "mail.pass"
ca_file = "{servers.ca_file}"
after_processing = "{after}"
processed_folder = "Processed"

[receiver]
interval = 1
set_timeout = 3600

[pacs]
host = "127.0.0.1"
port = {pacs.dicom_port}
called_aet = "{pacs.aet}"
calling_aet = "DICOMMAIL"
{extra}
"""
    )
    keyring = Keyring(path / "gnupg")
    install_demo_site(keyring, site)  # type: ignore[arg-type]
    keyring.close()
    return Home(path, address)


def remove_home(home: Home) -> None:
    subprocess.run(["gpgconf", "--homedir", str(home.path / "gnupg"), "--kill", "all"], check=False)
    shutil.rmtree(home.path, ignore_errors=True)


def imap(servers: MailServers, address: str) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL("localhost", servers.imaps_port,
                               ssl_context=ssl.create_default_context(cafile=str(servers.ca_file)))
    client.login(address, servers.accounts[address])
    return client


def empty_mailbox(servers: MailServers, address: str) -> None:
    """Delete every message in the account's folders, so each test starts clean."""
    client = imap(servers, address)
    try:
        _, folders = client.list()
        for line in folders:
            match = re.match(r'\((?P<flags>[^)]*)\) (?:"[^"]*"|NIL) (?P<name>.+)$', line.decode() if line else "")
            if not match or "\\Noselect" in match["flags"]:
                continue
            status, data = client.select(match["name"])
            if status != "OK" or not int(data[0] or 0):
                continue
            client.store("1:*", "+FLAGS", "\\Deleted")
            client.expunge()
    finally:
        client.logout()


def count_messages(servers: MailServers, address: str, folder: str = "INBOX") -> int:
    client = imap(servers, address)
    try:
        status, data = client.select(folder, readonly=True)
        return int(data[0]) if status == "OK" else 0
    finally:
        client.logout()


def wait_for_messages(servers: MailServers, address: str, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while count_messages(servers, address) < count:
        if time.monotonic() > deadline:
            raise AssertionError(f"only {count_messages(servers, address)} of {count} mails arrived")
        time.sleep(0.2)


def from_state(state_file: Path) -> tuple[SimpleNamespace, SimpleNamespace]:
    """The mail servers and the PACS of a test bed started by ``python -m testbed up`` (its testbed.json)."""
    state = json.loads(state_file.read_text())
    mail, pacs = state["mail"], state["pacs"]
    servers = SimpleNamespace(**{**mail, "ca_file": Path(mail["ca_file"])})
    return servers, SimpleNamespace(**pacs)


def main(argv: list[str] | None = None) -> int:
    """``python -m testbed.sites TESTBED_JSON DIR --gateway-port N``: a hospital gateway and a practice receiver."""
    parser = argparse.ArgumentParser(prog="python -m testbed.sites", description=main.__doc__)
    parser.add_argument("state", type=Path, help="testbed.json of a running test bed")
    parser.add_argument("dir", type=Path, help="where the homes go (DIR/hospital, DIR/practice)")
    parser.add_argument("--gateway-port", type=int, required=True)
    parser.add_argument("--route", default="PRACTICE_DR", help="the called AE title routed to the practice")
    args = parser.parse_args(argv)
    servers, pacs = from_state(args.state)
    gateway = gateway_config(args.gateway_port, {args.route: PRACTICE}, idle_seconds=3)
    make_home("hospital", HOSPITAL, servers, pacs, path=args.dir / "hospital", extra=gateway)
    make_home("practice", PRACTICE, servers, pacs, path=args.dir / "practice")
    print(f"{args.dir / 'hospital'}: gateway {args.route}@127.0.0.1:{args.gateway_port} -> {PRACTICE}")
    print(f"{args.dir / 'practice'}: receives from {PRACTICE} into Orthanc {pacs.aet}@127.0.0.1:{pacs.dicom_port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
