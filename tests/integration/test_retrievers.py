"""The retrievers against the test bed's real Dovecot (IMAP, IMAPS, POP3, POP3S).

Mails are submitted by SMTP to Postfix, which delivers them by LMTP to the
practice mailbox.  Each test starts from an empty practice mailbox and its own
state database and spool.
"""

from __future__ import annotations

import asyncio
import imaplib
import re
import smtplib
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from dicommail.config import Config, MailboxConfig
from dicommail.errors import AuthenticationError, ConfigError, TransportError
from dicommail.receiver import inbox
from dicommail.receiver.retrievers import (
    ImapRetriever,
    Pop3Retriever,
    account_name,
    make_retriever,
)
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database
from testbed import MailServers

pytestmark = pytest.mark.integration

HOSPITAL = "hospital@hospital.test"
PRACTICE = "practice@practice.test"


# --- helpers ------------------------------------------------------------------


def _tls(servers: MailServers) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(servers.ca_file))


def _mail(subject: str, *, dicom: bool) -> bytes:
    """A small mail; the DICOM-Mail one only looks like one from outside (not decrypted here)."""
    set_header = f"X-TELEMEDICINE-SETID: 2.25.{uuid.uuid4().int}\r\nX-TELEMEDICINE-SETPART: 1\r\n" if dicom else ""
    body = (
        "-----BEGIN PGP MESSAGE-----\r\n\r\nhQEMA9bogus+not+really+encrypted/(x)\r\n.line starting with a dot\r\n"
        "-----END PGP MESSAGE-----\r\n"
        if dicom
        else "Hello,\r\nan ordinary mail that must stay where it is.\r\n"
    )
    return (
        f"From: {HOSPITAL}\r\nTo: {PRACTICE}\r\nSubject: {subject}\r\n"
        f"Date: Mon, 01 Jan 2024 12:00:00 +0000\r\nMessage-ID: <{uuid.uuid4().hex}@hospital.test>\r\n"
        f"MIME-Version: 1.0\r\n{set_header}Content-Type: text/plain; charset=us-ascii\r\n\r\n{body}"
    ).encode()


def _send(servers: MailServers, *mails: bytes) -> None:
    with smtplib.SMTP(servers.host, servers.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=_tls(servers))
        smtp.login(HOSPITAL, servers.accounts[HOSPITAL])
        for mail in mails:
            smtp.sendmail(HOSPITAL, [PRACTICE], mail)


@dataclass(frozen=True)
class ServerMail:
    uid: int
    flags: str
    subject: str


def _imap(servers: MailServers) -> imaplib.IMAP4_SSL:
    client = imaplib.IMAP4_SSL(servers.host, servers.imaps_port, ssl_context=_tls(servers), timeout=10)
    client.login(PRACTICE, servers.accounts[PRACTICE])
    return client


def _list(servers: MailServers, folder: str = "INBOX") -> list[ServerMail]:
    """The mails in ``folder`` (empty if it does not exist), read without setting \\Seen."""
    with _imap(servers) as client:
        status, _ = client.select(f'"{folder}"', readonly=True)
        if status != "OK":
            return []
        _, data = client.uid("FETCH", "1:*", "(UID FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        found = []
        for item in data:
            if isinstance(item, tuple):
                head, header = item
                uid = re.search(rb"UID (\d+)", head)
                flags = re.search(rb"FLAGS \(([^)]*)\)", head)
                assert uid and flags
                subject = header.decode().partition(":")[2].strip()
                found.append(ServerMail(int(uid.group(1)), flags.group(1).decode(), subject))
        return found


def _wait_for(servers: MailServers, subjects: set[str], folder: str = "INBOX", timeout: float = 15) -> None:
    """Wait until Postfix has delivered mails with these subjects."""
    deadline = time.monotonic() + timeout
    while not subjects <= {m.subject for m in _list(servers, folder)}:
        assert time.monotonic() < deadline, f"mails {subjects} not delivered to {folder}"
        time.sleep(0.05)


def _reset_mailbox(servers: MailServers) -> None:
    """Empty INBOX and remove every other folder of the practice account."""
    with _imap(servers) as client:
        _, folders = client.list()
        names = [re.sub(rb'^\(.*?\) "." ', b"", f).decode().strip('"') for f in folders if isinstance(f, bytes)]
        for name in sorted(names, key=len, reverse=True):  # children before parents
            if name != "INBOX":
                client.delete(f'"{name}"')
        client.select("INBOX")
        client.uid("STORE", "1:*", "+FLAGS.SILENT", r"(\Deleted)")  # UID sets may match nothing
        client.expunge()


def _server_uid(servers: MailServers, subject: str) -> str:
    with _imap(servers) as client:
        client.select("INBOX", readonly=True)
        _, validity = client.status("INBOX", "(UIDVALIDITY)")
        match = re.search(rb"UIDVALIDITY (\d+)", validity[0] or b"")
        assert match
    [mail] = [m for m in _list(servers) if m.subject == subject]
    return f"{match.group(1).decode()}:{mail.uid}"


def _raw(servers: MailServers, uid: int) -> bytes:
    with _imap(servers) as client:
        client.select("INBOX", readonly=True)
        _, data = client.uid("FETCH", str(uid), "(BODY.PEEK[])")
        item = data[0]
        assert isinstance(item, tuple)
        return bytes(item[1])


def _normalised(data: bytes) -> bytes:
    return data.replace(b"\r\n", b"\n")


@dataclass
class State:
    db: Database
    spool: Spool

    def rows(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM inbound_mails")[0][0])

    def spool_files(self) -> int:
        return len(list(self.spool.inbox.glob("*.eml")))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    db = Database(tmp_path / "state.db")
    try:
        yield State(db, Spool(tmp_path / "spool"))
    finally:
        db.close()


@pytest.fixture
def servers(mail_servers: MailServers) -> MailServers:
    _reset_mailbox(mail_servers)
    return mail_servers


def _settings(servers: MailServers, **changes: object) -> MailboxConfig:
    settings = MailboxConfig(
        protocol="imap",
        host=servers.host,
        port=servers.imaps_port,
        security="tls",
        username=PRACTICE,
        processed_folder="DICOM-Mail/Processed",
        timeout=10,
    )
    return replace(settings, **changes)  # type: ignore[arg-type]


def _imap_retriever(servers: MailServers, state: State, **changes: object) -> ImapRetriever:
    return ImapRetriever(
        _settings(servers, **changes), servers.accounts[PRACTICE], state.db, state.spool, ca_file=servers.ca_file
    )


def _deliver_pair(servers: MailServers) -> tuple[str, bytes, str]:
    """Send one DICOM-Mail-like and one ordinary mail; return (DICOM subject, DICOM bytes, other subject)."""
    tag = uuid.uuid4().hex[:8]
    dicom_subject, other_subject = f"DICOM-Mail {tag}", f"ordinary {tag}"
    dicom = _mail(dicom_subject, dicom=True)
    _send(servers, dicom, _mail(other_subject, dicom=False))
    _wait_for(servers, {dicom_subject, other_subject})
    return dicom_subject, dicom, other_subject


# --- IMAP -----------------------------------------------------------------------


def test_imaps_fetch_moves_dicom_mail_and_leaves_other_mail_unseen(servers: MailServers, state: State) -> None:
    dicom_subject, dicom, other_subject = _deliver_pair(servers)
    server_uid = _server_uid(servers, dicom_subject)

    async def scenario() -> None:
        async with _imap_retriever(servers, state) as retriever:
            report = await retriever.fetch()
            assert (report.dicom_mail, report.other, report.known) == (1, 1, 0)
            assert retriever.tls_version is not None
            again = await retriever.fetch()
            assert (again.stored, again.known) == (0, 1)  # the ordinary mail, still there

    asyncio.run(scenario())

    mail = inbox.known(state.db, account_name(_settings(servers)), server_uid)
    assert mail is not None
    assert (mail.kind, mail.server_done) == (inbox.DICOM_MAIL, True)
    # Trace headers (Received, Return-Path, Delivered-To) come first; the rest is what was sent.
    assert _normalised(mail.spool_path.read_bytes()).endswith(_normalised(dicom))
    assert (state.rows(), state.spool_files()) == (2, 1)  # no copy of other mail is kept

    assert [m.subject for m in _list(servers, "DICOM-Mail/Processed")] == [dicom_subject]
    [left] = _list(servers)
    assert left.subject == other_subject
    assert "\\Seen" not in left.flags


def test_imap_delete_and_other_mail_folder(servers: MailServers, state: State) -> None:
    _, _, other_subject = _deliver_pair(servers)

    async def scenario() -> None:
        async with _imap_retriever(servers, state, after_processing="delete", other_mail_folder="Other") as retriever:
            report = await retriever.fetch()
            assert (report.dicom_mail, report.other) == (1, 1)

    asyncio.run(scenario())
    assert _list(servers) == []
    assert [m.subject for m in _list(servers, "Other")] == [other_subject]  # moved, never deleted
    assert _list(servers, "DICOM-Mail/Processed") == []


def test_imap_starttls_on_plain_port_and_keep(servers: MailServers, state: State) -> None:
    dicom_subject, _, other_subject = _deliver_pair(servers)

    async def scenario() -> None:
        retriever = _imap_retriever(
            servers, state, port=servers.imap_port, security="starttls", after_processing="keep"
        )
        async with retriever:
            report = await retriever.fetch()
            assert (report.dicom_mail, report.other) == (1, 1)
            assert retriever.tls_version is not None
            assert (await retriever.fetch()).known == 2  # kept, and not fetched again

    asyncio.run(scenario())
    assert {m.subject for m in _list(servers)} == {dicom_subject, other_subject}


def test_imap_move_without_move_capability(servers: MailServers, state: State) -> None:
    """The COPY + STORE \\Deleted + UID EXPUNGE fallback for servers without MOVE."""
    dicom_subject, _, other_subject = _deliver_pair(servers)

    async def scenario() -> None:
        async with _imap_retriever(servers, state, processed_folder="Done") as retriever:
            await retriever.fetch()  # connects
            retriever._capabilities -= {"MOVE"}
            _send(servers, _mail("second", dicom=True))
            _wait_for(servers, {"second"})
            assert (await retriever.fetch()).dicom_mail == 1

    asyncio.run(scenario())
    assert {m.subject for m in _list(servers, "Done")} == {dicom_subject, "second"}
    assert [m.subject for m in _list(servers)] == [other_subject]


def test_crash_between_store_and_server_action_is_completed(servers: MailServers, state: State) -> None:
    dicom_subject, _, _ = _deliver_pair(servers)
    server_uid = _server_uid(servers, dicom_subject)
    account = account_name(_settings(servers))
    # What a crash right after storing leaves behind: a stored mail, server_done = 0.
    stored = inbox.store_fetched(
        state.db, state.spool, account, server_uid, _raw(servers, int(server_uid.split(":")[1]))
    )
    assert not stored.server_done

    async def scenario() -> None:
        async with _imap_retriever(servers, state) as retriever:
            report = await retriever.fetch()
            assert (report.dicom_mail, report.other, report.completed) == (0, 1, 1)

    asyncio.run(scenario())
    mail = inbox.known(state.db, account, server_uid)
    assert mail is not None and mail.server_done and mail.id == stored.id
    assert (state.rows(), state.spool_files()) == (2, 1)  # no copy of other mail is kept
    assert [m.subject for m in _list(servers, "DICOM-Mail/Processed")] == [dicom_subject]


def test_imap_wrong_password(servers: MailServers, state: State) -> None:
    retriever = ImapRetriever(_settings(servers), "wrong", state.db, state.spool, ca_file=servers.ca_file)
    with pytest.raises(AuthenticationError) as caught:
        asyncio.run(retriever.fetch())
    assert PRACTICE in caught.value.message
    assert f"{servers.host}:{servers.imaps_port}" in caught.value.message
    assert "mailbox.password_file" in caught.value.hint
    assert not caught.value.temporary


def test_imap_unverifiable_certificate(servers: MailServers, state: State) -> None:
    # Without mailbox.ca_file only the system CAs are trusted, not the test bed's.
    retriever = ImapRetriever(_settings(servers), servers.accounts[PRACTICE], state.db, state.spool)
    with pytest.raises(TransportError) as caught:
        asyncio.run(retriever.fetch())
    assert caught.value.temporary
    assert "certificate" in caught.value.message
    assert "mailbox.ca_file" in caught.value.hint


def test_imap_reconnects_after_dovecot_restart(servers: MailServers, state: State) -> None:
    async def scenario() -> None:
        async with _imap_retriever(servers, state) as retriever:
            assert (await retriever.fetch()).stored == 0
            servers.restart_dovecot()  # drops the open session
            await asyncio.to_thread(_deliver_pair, servers)
            report = await retriever.fetch()
            assert (report.dicom_mail, report.other) == (1, 1)

            servers.stop_dovecot()
            try:
                with pytest.raises(TransportError) as caught:
                    await retriever.fetch()
                assert caught.value.temporary
                assert f"{servers.host}:{servers.imaps_port}" in caught.value.message
            finally:
                servers.start_dovecot()
            assert (await retriever.fetch()).known == 1  # and back again

    asyncio.run(scenario())


def test_idle_wakes_up_on_new_mail(servers: MailServers, state: State) -> None:
    async def scenario() -> None:
        async with _imap_retriever(servers, state) as retriever:
            await retriever.fetch()
            assert await retriever.wait_for_mail(0.5) is False

            waiting = asyncio.create_task(retriever.wait_for_mail(10))
            await asyncio.sleep(0.3)
            started = time.monotonic()
            await asyncio.to_thread(_send, servers, _mail("idle", dicom=True))
            assert await waiting is True
            assert time.monotonic() - started < 3

            # Not fetched yet: the next wait returns at once.
            started = time.monotonic()
            assert await retriever.wait_for_mail(10) is True
            assert time.monotonic() - started < 1
            assert (await retriever.fetch()).dicom_mail == 1

    asyncio.run(scenario())


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_silent_server_times_out(state: State, protocol: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # accepts, never greets
        port = listener.getsockname()[1]
        settings = MailboxConfig(
            protocol=protocol, host="127.0.0.1", port=port, security="none", username=PRACTICE, timeout=1
        )
        retriever = (ImapRetriever if protocol == "imap" else Pop3Retriever)(settings, "x", state.db, state.spool)
        with pytest.raises(TransportError) as caught:
            asyncio.run(retriever.fetch())
    assert caught.value.temporary
    assert f"127.0.0.1:{port}" in caught.value.message


# --- POP3 -----------------------------------------------------------------------


def _pop3_retriever(servers: MailServers, state: State, **changes: object) -> Pop3Retriever:
    settings = _settings(servers, **{"protocol": "pop3", "port": servers.pop3s_port, **changes})
    return Pop3Retriever(settings, servers.accounts[PRACTICE], state.db, state.spool, ca_file=servers.ca_file)


def test_pop3s_fetch_with_delete_leaves_other_mail(servers: MailServers, state: State) -> None:
    _, dicom, other_subject = _deliver_pair(servers)

    async def scenario() -> None:
        async with _pop3_retriever(servers, state, after_processing="delete") as retriever:
            report = await retriever.fetch()
            assert (report.dicom_mail, report.other) == (1, 1)
            again = await retriever.fetch()
            assert (again.stored, again.known) == (0, 1)

    asyncio.run(scenario())
    assert [m.subject for m in _list(servers)] == [other_subject]
    [row] = state.db.query("SELECT * FROM inbound_mails WHERE kind = ?", (inbox.DICOM_MAIL,))
    assert row["server_done"] == 1
    # poplib undoes the dot-stuffing of ".line starting with a dot".
    assert _normalised(Path(row["spool_path"]).read_bytes()).endswith(_normalised(dicom))


def test_pop3_stls_keep(servers: MailServers, state: State) -> None:
    _deliver_pair(servers)

    async def scenario() -> None:
        async with _pop3_retriever(servers, state, port=servers.pop3_port, security="starttls") as retriever:
            # "move" cannot be done in POP3: works as keep.
            assert (await retriever.fetch()).stored == 2
            assert (await retriever.fetch()).known == 2

    asyncio.run(scenario())
    assert len(_list(servers)) == 2


def test_pop3_wrong_password(servers: MailServers, state: State) -> None:
    settings = _settings(servers, protocol="pop3", port=servers.pop3s_port)
    retriever = Pop3Retriever(settings, "wrong", state.db, state.spool, ca_file=servers.ca_file)
    with pytest.raises(AuthenticationError) as caught:
        asyncio.run(retriever.fetch())
    assert PRACTICE in caught.value.message
    assert "mailbox.password_file" in caught.value.hint


# --- configuration --------------------------------------------------------------


def test_make_retriever(servers: MailServers, tmp_path: Path, state: State) -> None:
    (tmp_path / "mailbox.pw").write_text(servers.accounts[PRACTICE] + "\n")
    config = Config(
        home=tmp_path,
        mailbox=replace(_settings(servers), password_file="mailbox.pw", ca_file=str(servers.ca_file)),
    )
    retriever = make_retriever(config, state.db, state.spool)
    assert isinstance(retriever, ImapRetriever)
    assert retriever.account == f"imap://{PRACTICE}@{servers.host}:{servers.imaps_port}/INBOX"
    assert account_name(config) == retriever.account

    async def fetch() -> int:
        async with retriever:
            return (await retriever.fetch()).stored

    assert asyncio.run(fetch()) == 0

    pop = replace(config, mailbox=replace(config.mailbox, protocol="pop3", port=servers.pop3s_port))
    assert isinstance(make_retriever(pop, state.db, state.spool), Pop3Retriever)
    with pytest.raises(ConfigError):
        make_retriever(replace(config, mailbox=replace(config.mailbox, password_file="")), state.db, state.spool)
    with pytest.raises(ConfigError):
        make_retriever(
            replace(config, mailbox=replace(config.mailbox, processed_folder="INBOX")), state.db, state.spool
        )
