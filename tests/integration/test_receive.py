"""The receiving daemon against real Postfix, Dovecot and Orthanc, including crashes and outages."""

from __future__ import annotations

import json
import signal
import smtplib
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.dicom import scan
from dicommail.samples import write_ct_study
from dicommail.wire.pack import Packer, PackOptions
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


@pytest.fixture
def hospital(mail_servers: MailServers, pacs: Pacs) -> Iterator[Home]:
    home = make_home("hospital", HOSPITAL, mail_servers, pacs)
    yield home
    remove_home(home)


@pytest.fixture
def practice(mail_servers: MailServers, pacs: Pacs) -> Iterator[Home]:
    empty_mailbox(mail_servers, PRACTICE)
    home = make_home("practice", PRACTICE, mail_servers, pacs)
    yield home
    remove_home(home)


def _study(tmp_path: Path, slices: int = 8) -> list[Path]:
    return write_ct_study(tmp_path / "study", slices, 128)


def _send(hospital: Home, study: list[Path], servers: MailServers) -> int:
    """Send with ``dicommail send``; return how many mails went out."""
    before = count_messages(servers, PRACTICE)
    result = hospital.run("send", str(study[0].parent), "--to", PRACTICE, "--max-mail-size", "128K", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    mails = sum(len(s["mails"]) for s in json.loads(result.stdout)["sets"])
    wait_for_messages(servers, PRACTICE, before + mails)
    return mails


def _sets(home: Home) -> dict[str, str]:
    with sqlite3.connect(home.path / "state.db") as db:
        return dict(db.execute("SELECT set_id, status FROM inbound_sets").fetchall())


def _forwarded(home: Home) -> int:
    with sqlite3.connect(home.path / "state.db") as db:
        return int(db.execute("SELECT COUNT(*) FROM forwarded_instances").fetchone()[0])


def _assert_in_pacs(pacs: Pacs, study: list[Path]) -> None:
    stored = set(pacs.list_sop_instance_uids())
    for path in study:
        original = pydicom.dcmread(path)
        assert original.SOPInstanceUID in stored
    sample = pydicom.dcmread(study[-1])
    from io import BytesIO

    received = pydicom.dcmread(BytesIO(pacs.get_instance_file(sample.SOPInstanceUID)))
    assert received.PixelData == sample.PixelData


def test_round_trip_over_imap(hospital: Home, practice: Home, mail_servers: MailServers, pacs: Pacs,
                              tmp_path: Path) -> None:
    study = _study(tmp_path)
    mails = _send(hospital, study, mail_servers)
    assert mails >= 2
    result = practice.run("receive", "--once", "--json")
    assert result.returncode == 0, result.stderr
    assert list(_sets(practice).values()) == ["delivered"]
    _assert_in_pacs(pacs, study)
    assert count_messages(mail_servers, PRACTICE) == 0
    assert count_messages(mail_servers, PRACTICE, "Processed") == mails
    # A rerun finds nothing new and forwards nothing twice.
    again = practice.run("receive", "--once")
    assert again.returncode == 0 and _forwarded(practice) == len(study)
    # The default log level carries no patient data.
    assert "SYNTHETIC" not in result.stderr and "CT00001" not in result.stderr


def test_round_trip_over_pop3(hospital: Home, mail_servers: MailServers, pacs: Pacs, tmp_path: Path) -> None:
    empty_mailbox(mail_servers, PRACTICE)
    practice = make_home("practice", PRACTICE, mail_servers, pacs, protocol="pop3")
    try:
        study = _study(tmp_path, 4)
        _send(hospital, study, mail_servers)
        result = practice.run("receive", "--once")
        assert result.returncode == 0, result.stderr
        assert list(_sets(practice).values()) == ["delivered"]
        _assert_in_pacs(pacs, study)
        assert count_messages(mail_servers, PRACTICE) == 0  # deleted after durable storage
    finally:
        remove_home(practice)


@pytest.mark.parametrize("step", ["after-fetch", "after-decrypt", "during-forward:3"])
def test_kill_9_then_restart_delivers_every_instance_once(
    step: str, hospital: Home, practice: Home, mail_servers: MailServers, pacs: Pacs, tmp_path: Path
) -> None:
    study = _study(tmp_path, 6)
    _send(hospital, study, mail_servers)
    crashed = practice.run("receive", "--once", env={"DICOMMAIL_TEST_CRASH_AT": step})
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    result = practice.run("receive", "--once")
    assert result.returncode == 0, result.stderr
    assert list(_sets(practice).values()) == ["delivered"]
    assert _forwarded(practice) == len(study)
    _assert_in_pacs(pacs, study)


def test_pacs_down_then_back(hospital: Home, practice: Home, mail_servers: MailServers, pacs: Pacs,
                             tmp_path: Path) -> None:
    study = _study(tmp_path, 4)
    _send(hospital, study, mail_servers)
    pacs.stop()
    try:
        result = practice.run("receive", "--once")
        assert result.returncode == 0, result.stderr  # the mail side worked; forwarding waits
        assert list(_sets(practice).values()) == ["complete"]
    finally:
        pacs.start()
    time.sleep(1.5)  # the first retry is due after receiver.interval (1 s here)
    result = practice.run("receive", "--once")
    assert result.returncode == 0, result.stderr
    assert list(_sets(practice).values()) == ["delivered"]
    _assert_in_pacs(pacs, study)


def test_wrong_password(mail_servers: MailServers, pacs: Pacs) -> None:
    home = make_home("practice", PRACTICE, mail_servers, pacs, password="wrong-password")
    try:
        result = home.run("receive", "--once")
        assert result.returncode == 1
        assert "password_file" in result.stderr
        # As a daemon it keeps running, backing off, until told to stop.
        daemon = home.popen("receive")
        time.sleep(4)
        assert daemon.poll() is None
        daemon.send_signal(signal.SIGTERM)
        _, err = daemon.communicate(timeout=30)
        assert daemon.returncode == 0, err
        assert "refused" in err or "login" in err
    finally:
        remove_home(home)


def test_one_receiver_per_home(practice: Home) -> None:
    daemon = practice.popen("receive")
    try:
        time.sleep(2)
        second = practice.run("receive", "--once")
        assert second.returncode == 1 and "another receiver is running" in second.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=30)
    assert daemon.returncode == 0


def _tls(servers: MailServers) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(servers.ca_file))


def test_mailbox_of_500_mixed_mails(
    hospital: Home, practice: Home, mail_servers: MailServers, pacs: Pacs, tmp_path: Path
) -> None:
    """DICOM-Mail sets, ordinary mail and malformed mail: sets delivered, the rest untouched or quarantined."""
    keyring = Keyring(hospital.path / "gnupg")
    options = PackOptions(HOSPITAL, PRACTICE, own_key(keyring).fingerprint, max_mail_size=64 * 1024, workers=2)
    mails: list[bytes] = []
    studies = []
    for number in range(12):
        study = write_ct_study(tmp_path / f"s{number}", 3, 96)
        studies.append(study)
        packed = Packer(keyring, options).pack(scan(study).files, tmp_path / "out")
        mails += [m.path.read_bytes() for m in packed.mails]
    keyring.close()
    set_mails = len(mails)
    ordinary = 400
    malformed = 500 - set_mails - ordinary
    assert malformed > 0
    for number in range(ordinary):
        mails.append(f"From: {HOSPITAL}\nTo: {PRACTICE}\nSubject: ordinary {number}\n\nhello\n".encode())
    for number in range(malformed):
        mails.append(
            f"From: {HOSPITAL}\nTo: {PRACTICE}\nSubject: broken {number}\nX-TELEMEDICINE-SETID: 2.25.{number}\n"
            'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="x"\n\n'
            "--x\nnot really\n".encode()
        )
    with smtplib.SMTP("localhost", mail_servers.smtp_port, timeout=60) as smtp:
        smtp.starttls(context=_tls(mail_servers))
        smtp.login(HOSPITAL, mail_servers.accounts[HOSPITAL])
        for raw in mails:
            smtp.sendmail(HOSPITAL, [PRACTICE], raw)
    wait_for_messages(mail_servers, PRACTICE, 500, timeout=180)

    # Peak RSS of the receiver and its gpg children, measured by a wrapper process.
    probe = (
        "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe, sys.executable, "-m", "dicommail", "--home", str(practice.path),
         "receive", "--once"],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    peak_mib = int(result.stdout.strip().splitlines()[-1]) / 1024
    assert peak_mib < 300, f"receiver peak RSS {peak_mib:.0f} MiB"
    statuses = _sets(practice)
    assert sorted(statuses.values()) == ["delivered"] * 12
    stored = set(pacs.list_sop_instance_uids())
    for study in studies:
        assert all(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID in stored for p in study)
    assert count_messages(mail_servers, PRACTICE) == ordinary  # ordinary mail left in place
    with sqlite3.connect(practice.path / "state.db") as db:
        quarantined = db.execute("SELECT COUNT(*) FROM inbound_mails WHERE status = 'quarantined'").fetchone()[0]
    assert quarantined == malformed
    assert len(list((practice.path / "spool" / "quarantine").iterdir())) == malformed


@pytest.mark.parametrize("in_flight_check", ["c-find", "none"])
def test_kill_after_the_pacs_stored_an_instance_does_not_store_it_twice(
    in_flight_check: str, hospital: Home, mail_servers: MailServers, tmp_path: Path
) -> None:
    """The PACS stored instance 3 and answered, but the receiver died before recording it.

    With the C-FIND check the restarted receiver asks and does not send it
    again; without it (a PACS that cannot answer), it is sent once more: the
    documented at-least-once window.
    """
    from testbed.recording_pacs import RecordingPacs

    empty_mailbox(mail_servers, PRACTICE)
    with RecordingPacs(tmp_path / "pacs", delay=0.2) as recording:
        practice = make_home("practice", PRACTICE, mail_servers, recording,
                             extra=f'in_flight_check = "{in_flight_check}"')
        try:
            study = _study(tmp_path, 5)
            _send(hospital, study, mail_servers)
            crashed = practice.run("receive", "--once", env={"DICOMMAIL_TEST_CRASH_AT": "before-forward-record:3"})
            assert crashed.returncode == -signal.SIGKILL, crashed.stderr
            result = practice.run("receive", "--once")
            assert result.returncode == 0, result.stderr
            assert list(_sets(practice).values()) == ["delivered"]
            counts = recording.receptions()
            assert len(counts) == len(study)
            repeated = sum(n - 1 for n in counts.values())
            assert repeated == (0 if in_flight_check == "c-find" else 1)
        finally:
            remove_home(practice)
