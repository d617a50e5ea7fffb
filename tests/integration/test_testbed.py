"""Smoke tests of the test bed itself, using only stdlib clients and DCMTK."""

from __future__ import annotations

import imaplib
import poplib
import smtplib
import ssl
import subprocess
import time
import uuid
from email.message import EmailMessage
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from testbed import MailServers, Pacs, dcmtk_tool

pytestmark = pytest.mark.integration

HOSPITAL = "hospital@hospital.test"
PRACTICE = "practice@practice.test"


def _tls(servers: MailServers) -> ssl.SSLContext:
    # Verifies the chain and the host name against the throwaway CA.
    return ssl.create_default_context(cafile=str(servers.ca_file))


def _message(subject: str) -> EmailMessage:
    message = EmailMessage()
    message["From"] = HOSPITAL
    message["To"] = PRACTICE
    message["Subject"] = subject
    message.set_content("test bed smoke test\n")
    return message


def _imap_find(servers: MailServers, subject: str, timeout: float = 10.0) -> bool:
    """Poll the practice INBOX over IMAPS until a message with *subject* is there."""
    deadline = time.monotonic() + timeout
    with imaplib.IMAP4_SSL(servers.host, servers.imaps_port, ssl_context=_tls(servers)) as imap:
        imap.login(PRACTICE, servers.accounts[PRACTICE])
        while True:
            imap.select("INBOX")
            _, data = imap.search(None, "SUBJECT", f'"{subject}"')
            if data[0]:
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)


def test_submission_starttls_delivers_to_imap_and_pop3(mail_servers: MailServers) -> None:
    subject = f"starttls {uuid.uuid4()}"
    with smtplib.SMTP("localhost", mail_servers.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=_tls(mail_servers))
        smtp.login(HOSPITAL, mail_servers.accounts[HOSPITAL])
        smtp.send_message(_message(subject))
    # Delivery normally takes ~50 ms; the brief promises "a second or two".
    assert _imap_find(mail_servers, subject, timeout=3.0)

    pop = poplib.POP3_SSL(mail_servers.host, mail_servers.pop3s_port, context=_tls(mail_servers), timeout=10)
    try:
        pop.user(PRACTICE)
        pop.pass_(mail_servers.accounts[PRACTICE])
        count, _ = pop.stat()
        headers = [b"\n".join(pop.top(i, 0)[1]) for i in range(1, count + 1)]
    finally:
        pop.quit()
    assert any(subject.encode() in h for h in headers)


def test_smtps_implicit_tls(mail_servers: MailServers) -> None:
    subject = f"smtps {uuid.uuid4()}"
    with smtplib.SMTP_SSL("localhost", mail_servers.smtps_port, context=_tls(mail_servers), timeout=10) as smtp:
        smtp.login(HOSPITAL, mail_servers.accounts[HOSPITAL])
        smtp.send_message(_message(subject))
    assert _imap_find(mail_servers, subject)


def test_wrong_password_is_refused(mail_servers: MailServers) -> None:
    with smtplib.SMTP("localhost", mail_servers.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=_tls(mail_servers))
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login(HOSPITAL, "wrong")
    with (
        imaplib.IMAP4_SSL(mail_servers.host, mail_servers.imaps_port, ssl_context=_tls(mail_servers)) as imap,
        pytest.raises(imaplib.IMAP4.error),
    ):
        imap.login(PRACTICE, "wrong")


def test_message_size_limit_gives_552(mail_servers: MailServers) -> None:
    message = _message("too big")
    message.set_content("x" * 200_000)
    mail_servers.set_message_size_limit(100_000)
    try:
        with smtplib.SMTP("localhost", mail_servers.smtp_port, timeout=10) as smtp:
            smtp.starttls(context=_tls(mail_servers))
            smtp.login(HOSPITAL, mail_servers.accounts[HOSPITAL])
            with pytest.raises(smtplib.SMTPSenderRefused) as refused:
                smtp.send_message(message)
        assert refused.value.smtp_code == 552
    finally:
        mail_servers.set_message_size_limit(200 * 1024 * 1024)


def test_mail_sent_while_dovecot_is_down_arrives_after_restart(mail_servers: MailServers) -> None:
    subject = f"deferred {uuid.uuid4()}"
    with smtplib.SMTP("localhost", mail_servers.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=_tls(mail_servers))
        smtp.login(HOSPITAL, mail_servers.accounts[HOSPITAL])
        # Crash Dovecot after AUTH: Postfix must queue and retry the LMTP delivery.
        mail_servers.stop_dovecot(graceful=False)
        try:
            smtp.send_message(_message(subject))
        finally:
            mail_servers.start_dovecot()
    assert _imap_find(mail_servers, subject)


def test_unauthenticated_submission_is_refused(mail_servers: MailServers) -> None:
    with smtplib.SMTP("localhost", mail_servers.smtp_port, timeout=10) as smtp:
        smtp.starttls(context=_tls(mail_servers))
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            smtp.send_message(_message("no auth"))


def test_imap_plain_starttls_and_folders(mail_servers: MailServers) -> None:
    with imaplib.IMAP4(mail_servers.host, mail_servers.imap_port) as imap:
        imap.starttls(ssl_context=_tls(mail_servers))
        imap.login(HOSPITAL, mail_servers.accounts[HOSPITAL])
        folder = f"Processed-{uuid.uuid4().hex[:8]}"
        assert imap.create(folder)[0] == "OK"
        _, listing = imap.list()
        assert any(folder.encode() in line for line in listing if isinstance(line, bytes))


def test_orthanc_answers_c_echo(pacs: Pacs) -> None:
    result = subprocess.run(
        [dcmtk_tool("echoscu"), "-aet", "TESTSCU", "-aec", pacs.aet, pacs.host, str(pacs.dicom_port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def _small_ct(path: Path) -> str:
    """Write a tiny valid CT image; return its SOP Instance UID."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Bed"
    ds.PatientID = "TB-1"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 2
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(8)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def _store(pacs: Pacs, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk_tool("storescu"), "-aet", "TESTSCU", "-aec", pacs.aet, pacs.host, str(pacs.dicom_port), str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_c_store_shows_up_in_rest_api(pacs: Pacs, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    sop_uid = _small_ct(path)
    result = _store(pacs, path)
    assert result.returncode == 0, result.stderr
    assert sop_uid in pacs.list_sop_instance_uids()
    assert pacs.get_instance_tags(sop_uid)["PatientID"] == "TB-1"
    stored = pacs.get_instance_file(sop_uid)
    assert stored[128:132] == b"DICM"
    assert sop_uid.encode() in stored


def test_pacs_restart_keeps_storage(pacs: Pacs, tmp_path: Path) -> None:
    path = tmp_path / "ct.dcm"
    sop_uid = _small_ct(path)
    assert _store(pacs, path).returncode == 0
    pacs.stop(graceful=False)
    assert _store(pacs, path).returncode != 0  # nobody listens while it is down
    pacs.start()
    assert sop_uid in pacs.list_sop_instance_uids()
