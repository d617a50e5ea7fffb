"""``dicommail send`` against real Postfix + Dovecot: delivery, resume, retries and refusals.

The hospital (demo keys) submits small synthetic studies, split into several
mails by a small ``max_mail_size``; they must arrive in the practice's Maildir
exactly once each, and decrypt and verify there.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import json
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicommail.cli import cli
from dicommail.config import SmtpConfig, load_config
from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.dicom import scan
from dicommail.errors import AuthenticationError, TransportError
from dicommail.samples import write_ct_study
from dicommail.sender.outbox import MailSender, queue_set, send_pending
from dicommail.store.db import Database
from dicommail.transport.smtp import SmtpClient
from dicommail.wire.pack import PackedSet, Packer, PackOptions
from dicommail.wire.unpack import unpack_files
from testbed import MailServers
from testbed.ports import free_ports

pytestmark = pytest.mark.integration

KEYS = Path(__file__).resolve().parents[2] / "keys"
HOSPITAL = "hospital@hospital.test"
PRACTICE = "practice@practice.test"
#: Small mails, so that a tiny study makes a set of several.
MAIL_SIZE = 64 * 1024

_headers = email.parser.BytesHeaderParser(policy=email.policy.compat32)


@dataclass
class Home:
    """The hospital's dicommail home, its [smtp] pointing at the test bed."""

    path: Path
    servers: MailServers

    def configure(self, **smtp: object) -> None:
        settings: dict[str, object] = {
            "host": self.servers.host,
            "port": self.servers.smtp_port,
            "security": "starttls",
            "username": HOSPITAL,
            "password_file": "smtp-password",
            "ca_file": str(self.servers.ca_file),
            "timeout": 10,
            "max_attempts": 5,
            **smtp,
        }
        lines = [f'[identity]\naddress = "{HOSPITAL}"\n', '[packing]\nmax_mail_size = "64K"\n', "[smtp]"]
        lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
        (self.path / "dicommail.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def set_password(self, password: str) -> None:
        (self.path / "smtp-password").write_text(password + "\n", encoding="utf-8")

    def run(self, *args: str) -> tuple[int, str, str]:
        result = CliRunner().invoke(cli, ["--home", str(self.path), *args], catch_exceptions=False)
        return result.exit_code, result.stdout, result.stderr

    def db(self) -> Database:
        return Database(self.path / "state.db")

    def query(self, sql: str, *params: object) -> list[sqlite3.Row]:
        db = self.db()
        try:
            return db.query(sql, params)
        finally:
            db.close()


@pytest.fixture
def home(mail_servers: MailServers) -> Iterator[Home]:
    # A short path: gpg-agent's socket must stay under 108 characters.
    path = Path(tempfile.mkdtemp(prefix="dms"))
    keyring = Keyring(path / "gnupg")
    try:
        install_demo_site(keyring, "hospital", KEYS)
        site = Home(path, mail_servers)
        site.set_password(mail_servers.accounts[HOSPITAL])
        site.configure()
        yield site
    finally:
        keyring.close()
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def practice_keyring() -> Iterator[Keyring]:
    path = Path(tempfile.mkdtemp(prefix="dmp"))
    keyring = Keyring(path / "gnupg")
    install_demo_site(keyring, "practice", KEYS)
    yield keyring
    keyring.close()
    shutil.rmtree(path, ignore_errors=True)


def _study(tmp_path: Path, slices: int = 6, size: int = 128) -> Path:
    directory = tmp_path / f"study-{slices}-{size}"
    write_ct_study(directory, slices, size)
    return directory


def _message_id(path: Path) -> str:
    with path.open("rb") as handle:
        return str(_headers.parse(handle)["Message-ID"]).strip()


def _spooled_ids(home: Home, set_id: str) -> list[str]:
    """The Message-IDs of a set's mails (fragments have their own) as they went on the wire."""
    rows = home.query(
        "SELECT m.path FROM outbound_mails m JOIN transfers t ON t.id = m.transfer_id"
        " WHERE t.set_id = ? ORDER BY m.set_part, m.fragment",
        set_id,
    )
    return [_message_id(Path(row["path"])) for row in rows]


def _delivered(servers: MailServers, ids: list[str], timeout: float = 10.0) -> dict[str, list[Path]]:
    """Poll the practice's Maildir until every Message-ID in ``ids`` is there; return each one's files."""
    maildir = servers.maildir(PRACTICE)
    deadline = time.monotonic() + timeout
    while True:
        found: dict[str, list[Path]] = {}
        for sub in ("new", "cur"):
            for path in sorted((maildir / sub).glob("*")) if (maildir / sub).is_dir() else []:
                message_id = _message_id(path)
                if message_id in ids:
                    found.setdefault(message_id, []).append(path)
        if set(found) == set(ids) or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def _unpacks(keyring: Keyring, files: list[Path], out: Path) -> int:
    report = unpack_files(files, keyring, out, max_output=1024**3)
    assert report.ok, [(s.set_id, s.error) for s in report.sets] + [str(e) for _p, e in report.rejected]
    return sum(s.dicom_files for s in report.sets)


@pytest.mark.parametrize("security", ["starttls", "tls"])
def test_send_delivers_the_set(
    home: Home, mail_servers: MailServers, practice_keyring: Keyring, tmp_path: Path, security: str
) -> None:
    port = mail_servers.smtp_port if security == "starttls" else mail_servers.smtps_port
    home.configure(security=security, port=port)
    code, out, err = home.run("send", str(_study(tmp_path)), "--to", PRACTICE, "--json")
    assert code == 0, err
    (result,) = json.loads(out)["sets"]
    assert result["status"] == "sent" and result["set_total"] >= 2
    assert len(result["mails"]) == result["mails_sent"] == result["sent_now"]
    assert all(m["status"] == "sent" and m["attempts"] == 1 for m in result["mails"])

    ids = _spooled_ids(home, result["set_id"])
    assert len(ids) == len(result["mails"])
    delivered = _delivered(mail_servers, ids)
    assert {i: len(paths) for i, paths in delivered.items()} == dict.fromkeys(ids, 1)
    files = [paths[0] for paths in delivered.values()]
    assert _unpacks(practice_keyring, files, tmp_path / "in") == 6

    row = home.query("SELECT * FROM transfers")[0]
    assert row["status"] == "sent" and row["first_sent_at"] <= row["sent_at"]


def _pack(home: Home, study: Path) -> PackedSet:
    keyring = Keyring(home.path / "gnupg")
    try:
        options = PackOptions(
            sender=HOSPITAL, recipient=PRACTICE, signer=own_key(keyring).fingerprint, max_mail_size=MAIL_SIZE
        )
        (files,) = scan([study]).studies().values()
        return Packer(keyring, options).pack(files, home.path / "spool" / "outbox")
    finally:
        keyring.close()


def test_resume_after_failure_sends_only_the_rest(
    home: Home, mail_servers: MailServers, practice_keyring: Keyring, tmp_path: Path
) -> None:
    # Three 256² slices at 64 KiB: three parts of two message/partial fragments each.
    packed = _pack(home, _study(tmp_path, slices=3, size=256))
    assert len(packed.mails) == 6 and all(m.fragment for m in packed.mails)
    config = load_config(home.path)
    sends = 0

    @asynccontextmanager
    async def flaky() -> AsyncIterator[MailSender]:
        """The real client, but the second mail of the run meets a broken connection."""
        async with SmtpClient.from_config(config) as client:

            class Flaky:
                async def send(self, path: Path, sender: str, recipients: Sequence[str]) -> str:
                    nonlocal sends
                    sends += 1
                    if sends == 2:
                        raise TransportError("connection lost (simulated)")
                    return await client.send(path, sender, recipients)

            yield Flaky()

    db = home.db()
    try:
        transfer = queue_set(db, packed)
        (first,) = asyncio.run(send_pending(db, flaky, sender=HOSPITAL))
        assert (first.status, first.mails_sent, first.error) == ("sending", 1, "connection lost (simulated)")
        assert first.next_attempt_at is not None and first.next_attempt_at > time.time()
        # Not due yet: a run now sends nothing.
        (idle,) = asyncio.run(send_pending(db, flaky, sender=HOSPITAL))
        assert idle.sent_now == 0 and sends == 2
        # Later (as cron would run it), the rest goes out.
        later = time.time() + 3600
        (second,) = asyncio.run(send_pending(db, flaky, sender=HOSPITAL, now=lambda: later))
        assert (second.status, second.mails_sent, second.sent_now) == ("sent", 6, 5)
        assert db.query("SELECT status FROM transfers WHERE id = ?", (transfer,))[0][0] == "sent"
        part_one = db.query("SELECT attempts FROM outbound_mails WHERE set_part = 1 ORDER BY fragment")
        assert [row["attempts"] for row in part_one] == [1, 2]
    finally:
        db.close()

    ids = _spooled_ids(home, packed.set_id)
    delivered = _delivered(mail_servers, ids)
    # Exactly one copy of each: nothing the server had accepted was sent again.
    assert {i: len(paths) for i, paths in delivered.items()} == dict.fromkeys(ids, 1)
    assert _unpacks(practice_keyring, [p[0] for p in delivered.values()], tmp_path / "in") == 3


def test_unreachable_server_queues_and_pending_retries(
    home: Home, mail_servers: MailServers, practice_keyring: Keyring, tmp_path: Path
) -> None:
    (closed,) = free_ports(1)  # nothing listens there
    home.configure(port=closed)
    code, _out, err = home.run("send", str(_study(tmp_path)), "--to", PRACTICE)
    assert code == 75, err
    assert f"127.0.0.1:{closed}" in err and "refused" in err.lower()
    # The command to run names this home (copied from another site's terminal it must act here).
    assert "queued" in err and re.search(r"dicommail --home \S+ send --pending", err)

    (transfer,) = home.query("SELECT * FROM transfers")
    mails = home.query("SELECT * FROM outbound_mails ORDER BY set_part, fragment")
    assert transfer["status"] == "queued" and transfer["first_sent_at"] is None
    assert mails[0]["attempts"] == 1 and mails[0]["next_attempt_at"] > time.time()
    assert all(m["status"] == "queued" for m in mails) and all(m["attempts"] == 0 for m in mails[1:])

    # Not due yet: --pending tries nothing and says the set is still queued.
    code, _out, err = home.run("send", "--pending")
    assert code == 75 and home.query("SELECT attempts FROM outbound_mails")[0][0] == 1

    # The server is back and the retry time has come (moved instead of waited for).
    home.configure()
    db = home.db()
    with db.transaction() as conn:
        conn.execute("UPDATE outbound_mails SET next_attempt_at = 0")
    db.close()
    code, out, err = home.run("send", "--pending", "--json")
    assert code == 0, err
    (result,) = json.loads(out)["sets"]
    assert result["status"] == "sent" and result["sent_now"] == len(result["mails"])
    ids = _spooled_ids(home, transfer["set_id"])
    delivered = _delivered(mail_servers, ids)
    assert {i: len(paths) for i, paths in delivered.items()} == dict.fromkeys(ids, 1)

    code, _out, err = home.run("send", "--pending")
    assert code == 0 and "nothing to send" in err


def test_message_too_large_fails_with_the_servers_reply(home: Home, mail_servers: MailServers, tmp_path: Path) -> None:
    old = mail_servers.message_size_limit
    mail_servers.set_message_size_limit(20_000)
    try:
        code, _out, err = home.run("send", str(_study(tmp_path)), "--to", PRACTICE)
    finally:
        mail_servers.set_message_size_limit(old)
    assert code == 1, err
    assert "552 5.3.4 Message size exceeds fixed limit" in err and "max_mail_size" in err
    (transfer,) = home.query("SELECT * FROM transfers")
    assert transfer["status"] == "failed"
    assert "552 5.3.4 Message size exceeds fixed limit" in transfer["error"]
    statuses = [row[0] for row in home.query("SELECT status FROM outbound_mails ORDER BY set_part")]
    assert statuses[0] == "failed" and set(statuses[1:]) == {"queued"}


def test_wrong_password_is_an_authentication_error(home: Home, mail_servers: MailServers, tmp_path: Path) -> None:
    home.set_password("not-the-password")
    code, _out, err = home.run("send", str(_study(tmp_path)), "--to", PRACTICE)
    assert code == 1, err
    assert "535" in err and "smtp.password_file" in err and re.search(r"dicommail --home \S+ send --pending", err)
    assert "not-the-password" not in err
    # A configuration problem: nothing is counted against the transfer.
    assert home.query("SELECT status FROM transfers")[0][0] == "queued"
    assert home.query("SELECT MAX(attempts) FROM outbound_mails")[0][0] == 0

    config = SmtpConfig(host=mail_servers.host, port=mail_servers.smtp_port, username=HOSPITAL, timeout=10)

    async def login() -> None:
        async with SmtpClient(config, "not-the-password", mail_servers.ca_file):
            pass

    with pytest.raises(AuthenticationError) as caught:
        asyncio.run(login())
    assert "smtp.password_file" in caught.value.hint


def test_unknown_ca_is_refused(mail_servers: MailServers) -> None:
    # Without smtp.ca_file only the system's CAs count: the test bed's certificate must fail.
    config = SmtpConfig(host=mail_servers.host, port=mail_servers.smtps_port, security="tls", timeout=10)

    async def connect() -> None:
        async with SmtpClient(config):
            pass

    with pytest.raises(TransportError) as caught:
        asyncio.run(connect())
    assert not caught.value.temporary and "could not be verified" in caught.value.message
    assert "smtp.ca_file" in caught.value.hint


def test_dots_and_line_ends_survive_postfix(mail_servers: MailServers, tmp_path: Path) -> None:
    body = b".\n..two dots\n.one dot\nplain\n"
    mail = tmp_path / "dots.eml"
    message_id = f"<dots.{time.time_ns()}@hospital.test>"
    mail.write_bytes(f"From: {HOSPITAL}\nTo: {PRACTICE}\nSubject: dots\nMessage-ID: {message_id}\n\n".encode() + body)
    config = SmtpConfig(host=mail_servers.host, port=mail_servers.smtp_port, username=HOSPITAL, timeout=10)

    async def submit() -> str:
        async with SmtpClient(config, mail_servers.accounts[HOSPITAL], mail_servers.ca_file) as smtp:
            return await smtp.send(mail, HOSPITAL, [PRACTICE])

    assert asyncio.run(submit()).startswith("250 ")
    (delivered,) = _delivered(mail_servers, [message_id])[message_id]
    assert delivered.read_bytes().endswith(b"\n\n" + body)


def test_usage_errors(home: Home, tmp_path: Path) -> None:
    study = str(_study(tmp_path))
    for args in ([], ["--pending", study], [study], ["--pending", "--to", PRACTICE]):
        code, _out, err = home.run("send", *args)
        assert code == 2, (args, err)
    assert home.query("SELECT COUNT(*) FROM transfers")[0][0] == 0
