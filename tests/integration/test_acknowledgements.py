"""Acknowledgements end to end: the practice reports back, the hospital tracks its transfers.

Both sites run ``dicommail receive --once`` against the real Postfix/Dovecot
test bed: the practice to take studies in (and send notifications back), the
hospital to take the notifications in (and resend what the practice asks for).
"""

from __future__ import annotations

import json
import smtplib
import sqlite3
import ssl
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import certify, export_key, generate, import_keys, own_key
from dicommail.samples import write_ct_study
from dicommail.wire import notifications as n
from testbed import MailServers, Pacs
from testbed.sites import (
    HOSPITAL,
    PRACTICE,
    Home,
    count_messages,
    empty_mailbox,
    make_home,
    remove_home,
    wait_for_messages,
)

pytestmark = pytest.mark.integration


def _homes(servers: MailServers, pacs: Pacs, hospital_extra: str = "",
           practice_extra: str = "") -> tuple[Home, Home]:
    empty_mailbox(servers, PRACTICE)
    empty_mailbox(servers, HOSPITAL)
    hospital = make_home("hospital", HOSPITAL, servers, pacs, extra=hospital_extra)
    practice = make_home("practice", PRACTICE, servers, pacs, extra=practice_extra)
    return hospital, practice


@pytest.fixture
def sites(mail_servers: MailServers, pacs: Pacs) -> Iterator[tuple[Home, Home]]:
    hospital, practice = _homes(mail_servers, pacs)
    yield hospital, practice
    remove_home(hospital)
    remove_home(practice)


def _send(hospital: Home, tmp_path: Path, servers: MailServers, slices: int = 6) -> tuple[str, int]:
    """Send a tiny study in several parts; return (set ID, mails) once they are in the practice's INBOX."""
    study = write_ct_study(tmp_path / f"study-{uuid.uuid4().hex[:6]}", slices, 96)
    before = count_messages(servers, PRACTICE)
    result = hospital.run("send", str(study[0].parent), "--to", PRACTICE, "--max-mail-size", "64K", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    (sent,) = json.loads(result.stdout)["sets"]
    wait_for_messages(servers, PRACTICE, before + len(sent["mails"]))
    return sent["set_id"], len(sent["mails"])


def _receive(home: Home) -> None:
    result = home.run("receive", "--once")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SYNTHETIC" not in result.stderr  # no patient data in the log


def _status(home: Home, set_id: str) -> dict[str, Any]:
    result = home.run("status", set_id, "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _acks(home: Home) -> list[sqlite3.Row]:
    with sqlite3.connect(home.path / "state.db") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM acknowledgements ORDER BY id").fetchall()


def _mail_files(servers: MailServers, address: str) -> list[Path]:
    maildir = servers.maildir(address)
    return sorted(p for sub in ("new", "cur") for p in (maildir / sub).glob("*") if p.is_file())


def _part_file(servers: MailServers, part: int) -> Path:
    for path in _mail_files(servers, PRACTICE):
        if f"\nX-TELEMEDICINE-SETPART: {part}\n".encode() in path.read_bytes():
            return path
    raise AssertionError(f"part {part} is not in the practice's Maildir")


def _tamper(path: Path) -> None:
    """Flip one character well inside the armor (same size, so Dovecot's index stays valid)."""
    data = bytearray(path.read_bytes())
    start = data.index(b"-----BEGIN PGP MESSAGE-----")
    at = start + 200
    while not chr(data[at]).isalnum():
        at += 1
    data[at] = ord("B") if data[at] != ord("B") else ord("C")
    path.write_bytes(bytes(data))


def _round(hospital: Home, practice: Home, servers: MailServers, notifications: int) -> None:
    """The practice receives and reports; the hospital takes in ``notifications`` mails (or more)."""
    before = count_messages(servers, HOSPITAL)
    _receive(practice)
    wait_for_messages(servers, HOSPITAL, before + notifications)
    _receive(hospital)


def test_delivered_with_transfer_time(sites: tuple[Home, Home], mail_servers: MailServers,
                                      tmp_path: Path) -> None:
    hospital, practice = sites
    set_id, mails = _send(hospital, tmp_path, mail_servers)
    assert mails >= 2
    assert _status(hospital, set_id)["transfer"]["status"] == "sent"
    _round(hospital, practice, mail_servers, mails + 1)  # one MDN per part, one final notification
    status = _status(hospital, set_id)
    transfer = status["transfer"]
    assert transfer["status"] == "delivered", status
    assert transfer["parts_acknowledged"] == mails
    assert 0 < transfer["transfer_seconds"] < 120
    assert status["final_report"]["dicom_instances"] == 6
    assert status["final_report"]["status"] == "delivered"
    assert all(a["accepted"] == 1 and a["method"] == "pgp" for a in _acks(hospital))
    assert len(_acks(hospital)) == mails + 1
    # The notifications were signed and encrypted: nothing about the set's content is readable outside.
    table = hospital.run("status")
    assert table.returncode == 0 and "delivered" in table.stdout
    assert "SYNTHETIC" not in table.stdout
    assert "SYNTHETIC" in hospital.run("status", "--show-patient", "--json").stdout
    # Reruns send nothing twice.
    before = count_messages(mail_servers, HOSPITAL, "Processed")
    _receive(practice)
    _receive(hospital)
    assert count_messages(mail_servers, HOSPITAL, "Processed") == before
    assert count_messages(mail_servers, HOSPITAL) == 0


def test_tampered_part_fails_without_resends(mail_servers: MailServers, pacs: Pacs, tmp_path: Path) -> None:
    hospital, practice = _homes(mail_servers, pacs, hospital_extra="[tracking]\nresend_limit = 0\n")
    try:
        set_id, mails = _send(hospital, tmp_path, mail_servers)
        _tamper(_part_file(mail_servers, 2))
        _round(hospital, practice, mail_servers, mails)  # parts other than 2 acknowledged, 2 reported
        transfer = _status(hospital, set_id)["transfer"]
        assert transfer["status"] == "failed", transfer
        assert transfer["reason"] in ("decryption-failed", "signer-untrusted")
        assert "part(s) 2" in transfer["error"] and "resend limit" in transfer["error"]
    finally:
        remove_home(hospital)
        remove_home(practice)


def test_tampered_first_part_is_resent_and_delivered(sites: tuple[Home, Home], mail_servers: MailServers,
                                                     tmp_path: Path) -> None:
    # Part 1 fails before any part of the set is verified: its error is held until one is.
    hospital, practice = sites
    set_id, mails = _send(hospital, tmp_path, mail_servers)
    _tamper(_part_file(mail_servers, 1))
    _round(hospital, practice, mail_servers, mails)
    status = _status(hospital, set_id)
    assert status["transfer"]["resends"] == 1
    assert any(e["event"] == "resend" and e["set_part"] == 1 for e in status["timeline"])
    wait_for_messages(mail_servers, PRACTICE, 1)  # only part 1 went out again
    assert b"X-TELEMEDICINE-SETPART: 1\n" in _mail_files(mail_servers, PRACTICE)[-1].read_bytes()
    _round(hospital, practice, mail_servers, 2)  # part 1's MDN and the final notification
    transfer = _status(hospital, set_id)["transfer"]
    assert transfer["status"] == "delivered", transfer
    assert transfer["transfer_seconds"] > 0


def test_missing_part_is_reported_and_resent(sites: tuple[Home, Home], mail_servers: MailServers,
                                             tmp_path: Path) -> None:
    hospital, practice = sites
    set_id, mails = _send(hospital, tmp_path, mail_servers)
    _part_file(mail_servers, 2).unlink()
    _round(hospital, practice, mail_servers, mails - 1)
    assert _status(hospital, set_id)["transfer"]["status"] == "acknowledged"
    # The practice's set times out (receiver.set_timeout is an hour here: age the set instead of waiting).
    with sqlite3.connect(practice.path / "state.db") as db:
        db.execute("UPDATE inbound_sets SET first_seen_at = first_seen_at - 7200")
    before = count_messages(mail_servers, PRACTICE, "Processed")
    _round(hospital, practice, mail_servers, 1)
    status = _status(hospital, set_id)
    missing = [a for a in _acks(hospital) if a["reason"] == "parts-missing"]
    assert len(missing) == 1 and missing[0]["accepted"] == 1
    assert [e["set_part"] for e in status["timeline"] if e["event"] == "resend"] == [2]
    wait_for_messages(mail_servers, PRACTICE, 1)
    assert count_messages(mail_servers, PRACTICE, "Processed") == before
    _round(hospital, practice, mail_servers, 2)
    assert _status(hospital, set_id)["transfer"]["status"] == "delivered"


def _submit(servers: MailServers, sender: str, path: Path) -> None:
    context = ssl.create_default_context(cafile=str(servers.ca_file))
    with smtplib.SMTP("localhost", servers.smtp_port, timeout=30) as smtp:
        smtp.starttls(context=context)
        smtp.login(sender, servers.accounts[sender])
        smtp.sendmail(sender, [HOSPITAL], path.read_bytes())


def _success(set_id: str, scope: str = n.SET) -> n.Notification:
    report = n.StatusReport(scope=scope, set_id=set_id, status="delivered", outcome=n.SUCCESS, files=6,
                            dicom_instances=6, set_part=1 if scope == n.PART else None)
    return n.build_notification(report, original_message_id="", final_recipient=PRACTICE,
                                reporting_host="practice.test")


def test_forged_and_unknown_notifications_change_nothing(sites: tuple[Home, Home], mail_servers: MailServers,
                                                         tmp_path: Path) -> None:
    hospital, practice = sites
    set_id, _mails = _send(hospital, tmp_path, mail_servers)
    forged = tmp_path / "forged"
    forged.mkdir()
    # 1. A plain MDN "from the practice", which is configured for signed notifications.
    n.write_plain(_success(set_id), forged / "plain.eml", sender=PRACTICE, recipient=HOSPITAL,
                  message_id="<forged-1@practice.test>")
    # 2. A signed one by a key the hospital certified, but for another address.
    other = Keyring(tmp_path / "other-gnupg")
    hospital_keyring = Keyring(hospital.path / "gnupg")
    try:
        key = generate(other, "Other Site", "other@other.test", algo="ed25519", expires="never")
        (hospital_key,) = import_keys(other, export_key(hospital_keyring, HOSPITAL).encode())
        certify(other, hospital_key.fingerprint, signer=key.fingerprint)
        import_keys(hospital_keyring, export_key(other, key.fingerprint).encode())
        certify(hospital_keyring, key.fingerprint, signer=own_key(hospital_keyring).fingerprint)
        n.write_pgp(_success(set_id), forged / "other-key.eml", sender=PRACTICE, recipient=HOSPITAL,
                    message_id="<forged-2@practice.test>", keyring=other, signer=key.fingerprint, passphrase=None,
                    work=tmp_path / "work")
    finally:
        other.close()
        hospital_keyring.close()
    # 3. A genuine, signed notification from the practice for a set the hospital never sent.
    practice_keyring = Keyring(practice.path / "gnupg")
    try:
        n.write_pgp(_success("2.25.1234567890"), forged / "unknown.eml", sender=PRACTICE, recipient=HOSPITAL,
                    message_id="<unknown@practice.test>", keyring=practice_keyring,
                    signer=own_key(practice_keyring).fingerprint, passphrase=None, work=tmp_path / "work")
    finally:
        practice_keyring.close()
    for path in sorted(forged.glob("*.eml")):
        _submit(mail_servers, PRACTICE, path)
    wait_for_messages(mail_servers, HOSPITAL, 3)
    _receive(hospital)
    transfer = _status(hospital, set_id)["transfer"]
    assert transfer["status"] == "sent" and transfer["parts_acknowledged"] == 0
    acks = _acks(hospital)
    assert len(acks) == 3 and not any(a["accepted"] for a in acks)
    reasons = " | ".join(a["detail"] for a in acks)
    assert "configured for signed ones" in reasons
    assert "does not belong to the transfer's recipient" in reasons
    assert "no transfer of this site" in reasons


def test_plain_mdn_peers(mail_servers: MailServers, pacs: Pacs, tmp_path: Path) -> None:
    hospital, practice = _homes(
        mail_servers, pacs,
        hospital_extra=f'[peers."{PRACTICE}"]\nnotification = "rfc"\n',
        practice_extra=f'[peers."{HOSPITAL}"]\nnotification = "rfc"\n',
    )
    try:
        set_id, mails = _send(hospital, tmp_path, mail_servers)
        _round(hospital, practice, mail_servers, mails + 1)
        processed = mail_servers.maildir(HOSPITAL) / ".Processed"
        raw = [p.read_bytes() for p in processed.rglob("*") if p.is_file() and p.parent.name in ("cur", "new")]
        assert len(raw) == mails + 1
        assert all(b"multipart/report; report-type=disposition-notification" in r for r in raw)
        assert not any(b"BEGIN PGP MESSAGE" in r for r in raw)
        transfer = _status(hospital, set_id)["transfer"]
        assert transfer["status"] == "delivered"
        assert {a["method"] for a in _acks(hospital)} == {"rfc"}
    finally:
        remove_home(hospital)
        remove_home(practice)
