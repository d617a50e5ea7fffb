"""The retrievers against the test bed's real Dovecot (IMAP, IMAPS, POP3, POP3S).

Mails are submitted by SMTP to Postfix, which delivers them by LMTP to the
practice mailbox.  Each test starts from an empty practice mailbox and its own
state database and spool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import imaplib
import json
import logging
import re
import smtplib
import socket
import sqlite3
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from dicommail.config import Config, MailboxConfig
from dicommail.errors import AuthenticationError, ConfigError, TransportError
from dicommail.receiver import inbox, retrievers
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
    db_path: Path

    def rows(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM inbound_mails")[0][0])

    def spool_files(self) -> int:
        return len(list(self.spool.inbox.glob("*.eml")))


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    db = Database(tmp_path / "state.db")
    try:
        yield State(db, Spool(tmp_path / "spool"), tmp_path / "state.db")
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


def _deliver_dicom(servers: MailServers, count: int) -> list[str]:
    """Send ``count`` DICOM-Mail-like mails; return their subjects once all are in the INBOX."""
    tag = uuid.uuid4().hex[:8]
    subjects = [f"DICOM-Mail {tag} {n}" for n in range(count)]
    _send(servers, *(_mail(subject, dicom=True) for subject in subjects))
    _wait_for(servers, set(subjects))
    return subjects


def test_a_folder_the_server_refuses_does_not_stop_fetching_the_rest(servers: MailServers, state: State) -> None:
    # One refused move stopped the whole fetch: every later mail (part 2 of a set) waited until the set expired.
    subjects = _deliver_dicom(servers, 3)

    async def scenario() -> None:
        async with _imap_retriever(servers, state, processed_folder="~Refused") as retriever:
            with pytest.raises(TransportError, match=r"3 mail\(s\) stored but left where they are"):
                await retriever.fetch()
            with pytest.raises(TransportError):  # tried again, nothing fetched twice
                await retriever.fetch()

    asyncio.run(scenario())
    assert (state.rows(), state.spool_files()) == (3, 3)
    assert sorted(m.subject for m in _list(servers)) == sorted(subjects)  # still in the INBOX


def test_a_stopping_receiver_ends_the_fetch_after_the_current_mail(servers: MailServers, state: State) -> None:
    _deliver_dicom(servers, 4)

    async def scenario() -> None:
        async with _imap_retriever(servers, state) as retriever:
            retriever.should_stop = lambda: state.rows() >= 1  # SIGTERM came during the first mail
            await retriever.fetch()
            assert state.rows() == 1
            retriever.should_stop = lambda: False
            await retriever.fetch()  # the next start: the rest, the first not again

    asyncio.run(scenario())
    assert (state.rows(), state.spool_files()) == (4, 4)
    assert _list(servers) == []


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


def test_security_none_is_refused_for_a_remote_server(tmp_path: Path, state: State) -> None:
    (tmp_path / "mailbox.pw").write_text("secret\n")
    for protocol, port in (("imap", 143), ("pop3", 110)):
        box = MailboxConfig(
            protocol=protocol, host="mail.example.org", port=port, security="none", username=PRACTICE,
            password_file="mailbox.pw",
        )
        with pytest.raises(ConfigError) as caught:
            make_retriever(Config(home=tmp_path, mailbox=box), state.db, state.spool)
        assert 'mailbox.security = "none"' in caught.value.message
        assert "mail.example.org" in caught.value.message
        assert '"tls"' in caught.value.hint and '"starttls"' in caught.value.hint
        # On this machine (a local relay, a test bed) plain text is allowed, as for SMTP.
        for host in ("127.0.0.1", "localhost", "::1"):
            local = Config(home=tmp_path, mailbox=replace(box, host=host))
            assert make_retriever(local, state.db, state.spool).settings.host == host


# --- mails over mailbox.max_message_size, and fetching in pieces -------------------

LIMIT = 128 * 1024


def _big_mail(subject: str, size: int) -> bytes:
    """A DICOM-Mail-like mail of about ``size`` bytes, with lines a POP3 server must dot-stuff."""
    lines = [f"{n:07d}/{'x' * 66}".encode() if n % 50 else b".dotted line" for n in range(size // 76 + 1)]
    body = b"\r\n".join(lines) + b"\r\n"
    return _mail(subject, dicom=True).replace(b"-----END PGP MESSAGE-----", body + b"-----END PGP MESSAGE-----")


def _retriever(servers: MailServers, state: State, protocol: str, **changes: object) -> ImapRetriever | Pop3Retriever:
    if protocol == "imap":
        return _imap_retriever(servers, state, **changes)
    return _pop3_retriever(servers, state, **changes)


def _too_large_rows(state: State) -> list[sqlite3.Row]:
    return state.db.query("SELECT * FROM inbound_mails WHERE status = ?", (inbox.TOO_LARGE,))


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_mail_over_the_limit_stays_on_the_server_and_is_reported_once(
    servers: MailServers, state: State, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    tag = uuid.uuid4().hex[:8]
    big, small = f"big {tag}", f"small {tag}"
    _send(servers, _big_mail(big, 3 * LIMIT), _mail(small, dicom=True))
    _wait_for(servers, {big, small})
    caplog.set_level(logging.INFO, logger="dicommail.receiver")

    async def scenario() -> None:
        async with _retriever(servers, state, protocol, max_message_size=LIMIT, after_processing="delete") as r:
            report = await r.fetch()
            assert (report.too_large, report.dicom_mail) == (1, 1)  # and the next mail is fetched
            again = await r.fetch()
            assert (again.too_large, again.stored, again.known) == (0, 0, 1)

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "max_message_size" in r.getMessage()]
    assert len(warnings) == 1  # once, not every poll
    message = warnings[0].getMessage()
    assert "over mailbox.max_message_size 128.0 KiB; left on the server" in message
    assert big not in message and HOSPITAL not in message  # nothing from the mail itself

    # Untouched on the server (not deleted, not even read); the small one is gone (deleted).
    [left] = _list(servers)
    assert left.subject == big and "\\Seen" not in left.flags
    [row] = _too_large_rows(state)
    assert (row["kind"], row["spool_path"], row["server_done"]) == (inbox.OTHER, "", 1)
    assert row["size"] > 2 * LIMIT
    assert state.spool_files() == 1  # the small one only
    assert not list(state.spool.inbox.glob(".*.tmp"))

    # Raising the limit fetches it after all.
    async def raised() -> None:
        async with _retriever(servers, state, protocol, max_message_size=4 * LIMIT) as r:
            report = await r.fetch()
            assert (report.too_large, report.dicom_mail) == (0, 1)

    asyncio.run(raised())
    assert _too_large_rows(state) == []
    assert state.spool_files() == 2


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_mail_larger_than_the_server_said_is_given_up(
    servers: MailServers, state: State, protocol: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second guard: reading stops (IMAP) or is discarded (POP3) past the limit plus slack."""
    tag = uuid.uuid4().hex[:8]
    big, small = f"big {tag}", f"small {tag}"
    _send(servers, _big_mail(big, 3 * LIMIT), _mail(small, dicom=True))
    _wait_for(servers, {big, small})
    monkeypatch.setattr(retrievers, "_IMAP_PIECE", 16 * 1024)
    # As if the server reported every mail as tiny (IMAP), or no sizes at all (POP3).
    monkeypatch.setattr(retrievers, "_fetched_size", lambda lines, uid: 1)
    monkeypatch.setattr(retrievers, "_pop3_sizes", lambda listing: {})

    async def scenario() -> None:
        async with _retriever(servers, state, protocol, max_message_size=LIMIT, after_processing="keep") as retriever:
            report = await retriever.fetch()
            assert (report.too_large, report.dicom_mail) == (1, 1)
            assert (await retriever.fetch()).known == 2

    asyncio.run(scenario())
    [row] = _too_large_rows(state)
    assert retrievers._size_guard(LIMIT) < row["size"] <= 3 * LIMIT + 16 * 1024
    assert state.spool_files() == 1
    assert not list(state.spool.inbox.glob(".*.tmp"))
    assert {m.subject for m in _list(servers)} == {big, small}  # keep: both still there


def _rfc822_size(servers: MailServers, uid: int) -> int:
    with _imap(servers) as client:
        client.select("INBOX", readonly=True)
        _, data = client.uid("FETCH", str(uid), "(RFC822.SIZE)")
        match = re.search(rb"RFC822\.SIZE (\d+)", data[0] if isinstance(data[0], bytes) else b"")
        assert match
        return int(match.group(1))


@pytest.mark.parametrize("piece", ["size", "size-1", "half", "small"])
def test_imap_pieces_make_the_same_bytes_as_a_whole_fetch(
    servers: MailServers, state: State, piece: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    subject = f"pieces {uuid.uuid4().hex[:8]}"
    _send(servers, _big_mail(subject, 200 * 1024))
    _wait_for(servers, {subject})
    [mail] = _list(servers)
    size = _rfc822_size(servers, mail.uid)
    # A piece that ends exactly at the end of the mail makes the next one start past it.
    pieces = {"size": size, "size-1": size - 1, "half": (size + 1) // 2 if size % 2 else size // 2, "small": 7000}
    monkeypatch.setattr(retrievers, "_IMAP_PIECE", pieces[piece])

    async def scenario() -> None:
        async with _imap_retriever(servers, state, after_processing="keep") as retriever:
            assert (await retriever.fetch()).dicom_mail == 1

    asyncio.run(scenario())
    [row] = state.db.query("SELECT * FROM inbound_mails")
    assert Path(row["spool_path"]).read_bytes() == _raw(servers, mail.uid)
    assert row["size"] == size


#: Runs one fetch in a process of its own and prints its peak RSS.  VmHWM, not ru_maxrss:
#: that one keeps the peak of the forked test process from before exec.
_FETCH_AND_MEASURE = """
import asyncio, json, re, sys
from pathlib import Path
from dicommail.config import MailboxConfig
from dicommail.receiver.retrievers import ImapRetriever, Pop3Retriever
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database

args = json.loads(sys.argv[1])
settings = MailboxConfig(**args["settings"])
db = Database(Path(args["db"]))
kind = ImapRetriever if settings.protocol == "imap" else Pop3Retriever
retriever = kind(settings, args["password"], db, Spool(Path(args["spool"])), ca_file=Path(args["ca_file"]))

async def main():
    async with retriever:
        return await retriever.fetch()

report = asyncio.run(main())
peak = re.search(r"^VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
print(json.dumps({"stored": report.stored, "too_large": report.too_large, "peak_rss": int(peak.group(1)) * 1024}))
"""


@pytest.mark.parametrize("protocol", ["imap", "pop3"])
def test_a_large_mail_is_fetched_in_bounded_memory(servers: MailServers, state: State, protocol: str) -> None:
    """A 120 MiB mail (under a 200 MiB limit) is stored byte for byte; the retriever stays under 150 MiB."""
    subject = f"large {uuid.uuid4().hex[:8]}"
    # By LMTP straight to Dovecot: quicker than through Postfix, and the same mailbox.
    with smtplib.LMTP(str(servers.lmtp_socket)) as lmtp:
        lmtp.sendmail(HOSPITAL, [PRACTICE], _big_mail(subject, 120 * 1024 * 1024))
    _wait_for(servers, {subject})
    port = servers.imaps_port if protocol == "imap" else servers.pop3s_port
    settings = dataclasses.asdict(
        _settings(servers, protocol=protocol, port=port, max_message_size=200 * 1024 * 1024, after_processing="keep")
    )
    args = {
        "settings": settings,
        "password": servers.accounts[PRACTICE],
        "db": str(state.db_path),
        "spool": str(state.spool.root),
        "ca_file": str(servers.ca_file),
    }
    done = subprocess.run(
        [sys.executable, "-c", _FETCH_AND_MEASURE, json.dumps(args)], capture_output=True, check=False, text=True
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert (result["stored"], result["too_large"]) == (1, 0)
    assert result["peak_rss"] < 150 * 1024 * 1024, f"peak RSS {result['peak_rss'] / 1024**2:.0f} MiB"

    [mail] = _list(servers)
    [row] = state.db.query("SELECT * FROM inbound_mails")
    stored = Path(row["spool_path"])
    assert stored.stat().st_size == row["size"] == _rfc822_size(servers, mail.uid)
    assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(_raw(servers, mail.uid)).digest()


def test_fetch_response_parsing() -> None:
    """Whole and partial BODY[] literals, an empty piece past the end, sizes; others' responses ignored."""
    piece = bytearray(b"abc")
    assert retrievers._fetched_body([b"1 FETCH (UID 5 BODY[]<0> {3}", piece, b")", b"OK done"], 5) is piece
    assert retrievers._fetched_body([b"1 FETCH (BODY[] {3}", piece, b" UID 5)", b"OK done"], 5) == b"abc"
    assert retrievers._fetched_body([b"1 FETCH (BODY[]<8> {3}", piece, b" UID 6)", b"OK done"], 5) is None
    assert retrievers._fetched_body([b"1 FETCH (UID 5 BODY[]<9> {0}", bytearray(), b")", b"OK"], 5) == b""
    assert retrievers._fetched_body([b'1 FETCH (UID 5 BODY[]<9> "")', b"OK"], 5) == b""
    assert retrievers._fetched_body([b"1 FETCH (UID 5 BODY[]<9> NIL)", b"OK"], 5) == b""
    assert retrievers._fetched_body([b"OK Fetch completed"], 5) is None
    assert retrievers._fetched_size([b"2 FETCH (FLAGS (\\Seen) UID 4)", b"1 FETCH (UID 5 RFC822.SIZE 1234)"], 5) == 1234
    assert retrievers._fetched_size([b"1 FETCH (UID 6 RFC822.SIZE 99)", b"OK"], 5) is None
    assert retrievers._pop3_sizes([b"1 120", b"2 70000000", b"3 bogus"]) == {"1": 120, "2": 70000000}
