"""The sending gateway against real dcmtk, Postfix, Dovecot and Orthanc: C-STORE in, DICOM-Mail out."""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association

from dicommail.samples import pydicom_sample, write_ct_study
from testbed import MailServers, Pacs, dcmtk_tool
from testbed.ports import free_ports, port_listening
from testbed.sites import HOSPITAL, PRACTICE, Home, empty_mailbox, gateway_config, make_home, remove_home

pytestmark = pytest.mark.integration

ROUTE = "PRACTICE_DR"
CT = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


class Gateway:
    """A ``dicommail gateway`` child process for one hospital home."""

    def __init__(self, home: Home, port: int, log: Path) -> None:
        self.home, self.port, self.log = home, port, log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str] | None = None) -> None:
        self.process = self.home.daemon("gateway", log=self.log, env=env)
        deadline = time.monotonic() + 30
        while not port_listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("gateway did not start:\n" + self.log.read_text())
            time.sleep(0.05)

    def stop(self) -> int:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=60)
        self.process = None
        return code

    def wait_killed(self, timeout: float = 30) -> None:
        assert self.process is not None
        assert self.process.wait(timeout=timeout) == -signal.SIGKILL, self.log.read_text()
        self.process = None


@pytest.fixture
def practice(mail_servers: MailServers, pacs: Pacs) -> Iterator[Home]:
    empty_mailbox(mail_servers, PRACTICE)
    home = make_home("practice", PRACTICE, mail_servers, pacs)
    yield home
    remove_home(home)


@pytest.fixture
def gateway(mail_servers: MailServers, pacs: Pacs, tmp_path: Path) -> Iterator[Gateway]:
    port = free_ports(1)[0]
    home = make_home("hospital", HOSPITAL, mail_servers, pacs,
                     extra=gateway_config(port, {ROUTE: PRACTICE, "OTHER_DR": PRACTICE}))
    server = Gateway(home, port, tmp_path / "gateway.log")
    server.start()
    yield server
    if server.process is not None:
        assert server.stop() == 0, server.log.read_text()
    remove_home(home)


# -- helpers ----------------------------------------------------------------------


def _studies(home: Home) -> list[sqlite3.Row]:
    with sqlite3.connect(home.path / "state.db") as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM gateway_studies ORDER BY id").fetchall()


def _wait_sent(gateway: Gateway, count: int, timeout: float = 120) -> list[sqlite3.Row]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _studies(gateway.home)
        if len(rows) >= count and all(r["status"] == "sent" for r in rows):
            return rows
        if any(r["status"] == "failed" for r in rows) or time.monotonic() > deadline:
            raise AssertionError(f"studies: {[dict(r) for r in rows]}\n{gateway.log.read_text()}")
        time.sleep(0.2)


def _receive_into_pacs(practice: Home, pacs: Pacs, uids: set[str], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        result = practice.run("receive", "--once")
        assert result.returncode == 0, result.stdout + result.stderr
        missing = uids - set(pacs.list_sop_instance_uids())
        if not missing:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{len(missing)} instance(s) not in the practice's PACS")
        time.sleep(0.5)


def _associate(port: int, contexts: list[tuple[str, str]], called: str = ROUTE, calling: str = "HOSPPACS",
               dimse_timeout: float = 5) -> Association:
    ae = AE(ae_title=calling)
    # pynetdicom sometimes misses a peer killed mid-association and waits for the timeout.
    ae.dimse_timeout = dimse_timeout
    return ae.associate("127.0.0.1", port, [build_context(sop, [syntax]) for sop, syntax in contexts],
                        ae_title=called, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])


def _no_delay(event: evt.Event) -> None:
    # Like a PACS: without this, Nagle's algorithm and delayed ACKs cost 40 ms per C-STORE.
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _tiny(study_uid: str, number: int, size: int = 8) -> Dataset:
    """A small secondary-capture-like CT image (no patient data)."""
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = study_uid[:60] + ".1"
    ds.Modality = "CT"
    ds.PatientName = "SYNTHETIC^GATEWAY"
    ds.PatientID = "DICOMMAIL-GW"
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = bytes((number + i) % 251 for i in range(size * size * 2))
    return ds


def _push(assoc: Association, datasets: list[Dataset]) -> list[int]:
    """The status of each C-STORE; -1 where there was no answer (the gateway died)."""
    statuses = []
    for ds in datasets:
        try:
            status = assoc.send_c_store(ds)
        except RuntimeError:  # the association is gone
            status = Dataset()
        statuses.append(int(status.Status) if "Status" in status else -1)
    return statuses


# -- the tests -------------------------------------------------------------------------


def test_storescu_push_arrives_in_the_practice_pacs(gateway: Gateway, practice: Home, pacs: Pacs,
                                                    tmp_path: Path) -> None:
    study = write_ct_study(tmp_path / "study", 6, 64)
    echo = subprocess.run([dcmtk_tool("echoscu"), "-aet", "HOSPPACS", "-aec", ROUTE, "127.0.0.1",
                           str(gateway.port)], capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    pushed = subprocess.run([dcmtk_tool("storescu"), "-aet", "HOSPPACS", "-aec", ROUTE, "127.0.0.1",
                             str(gateway.port), *map(str, study)], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "TCP_NODELAY": "1"})
    assert pushed.returncode == 0, pushed.stderr
    [row] = _wait_sent(gateway, 1)
    assert row["instances"] == len(study) and row["route"] == ROUTE and row["calling_aet"] == "HOSPPACS"
    # The received files are removed once the sets carry them.
    assert not list((gateway.home.path / "spool" / "gateway").glob("*/*.dcm"))
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study}
    _receive_into_pacs(practice, pacs, uids)
    original = pydicom.dcmread(study[0])
    received = pydicom.dcmread(io.BytesIO(pacs.get_instance_file(original.SOPInstanceUID)))
    assert received.PixelData == original.PixelData
    # No patient data in the gateway's log at the default level.
    assert "SYNTHETIC" not in gateway.log.read_text()


def test_one_study_over_several_associations_and_two_interleaved(gateway: Gateway) -> None:
    first, second = generate_uid(), generate_uid()
    a = [_tiny(first, n) for n in range(1, 7)]
    b = [_tiny(second, n) for n in range(1, 5)]
    contexts = [(CT, ExplicitVRLittleEndian)]
    # Three associations, one after the other, each carrying parts of both studies;
    # the pauses are shorter than the idle time, so each study stays one study.
    for chunk in ([a[0], b[0], a[1]], [b[1], a[2], b[2], a[3]], [a[4], b[3], a[5], a[0]]):
        assoc = _associate(gateway.port, contexts)
        assert assoc.is_established
        assert _push(assoc, chunk) == [0] * len(chunk)  # a[0] again: a tolerated repeat
        assoc.release()
        time.sleep(0.3)
    rows = _wait_sent(gateway, 2)
    by_uid = {r["study_uid"]: r for r in rows}
    assert len(rows) == 2
    assert by_uid[first]["instances"] == 6 and by_uid[second]["instances"] == 4
    with sqlite3.connect(gateway.home.path / "state.db") as db:
        transfers = db.execute("SELECT study_uid, files, status FROM transfers ORDER BY study_uid").fetchall()
    assert sorted(transfers) == sorted([(first, 6, "sent"), (second, 4, "sent")])


def test_unknown_called_ae_title_is_rejected(gateway: Gateway) -> None:
    assoc = _associate(gateway.port, [(CT, ExplicitVRLittleEndian)], called="NOBODY")
    assert assoc.is_rejected
    answer = assoc.acceptor.primitive
    assert (answer.result, answer.result_source, answer.diagnostic) == (1, 1, 7)
    # The gateway's own AE title answers C-ECHO (for the PACS's "test node" button) but takes no study.
    echo = _associate(gateway.port, [("1.2.840.10008.1.1", ExplicitVRLittleEndian),
                                     (CT, ExplicitVRLittleEndian)], called="HOSPGATEWAY")
    assert echo.is_established
    assert echo.send_c_echo().Status == 0
    assert _push(echo, [_tiny(generate_uid(), 1)]) == [0x0124]
    echo.release()
    assert _studies(gateway.home) == []


def test_a_thousand_small_instances(gateway: Gateway) -> None:
    study_uid = generate_uid()
    datasets = [_tiny(study_uid, n, size=4) for n in range(1, 1001)]
    started = time.monotonic()
    # Each answer waits for an fsync: on a busy shared disk one can take seconds.
    assoc = _associate(gateway.port, [(CT, ExplicitVRLittleEndian)], dimse_timeout=60)
    assert _push(assoc, datasets) == [0] * 1000
    assoc.release()
    received = time.monotonic() - started
    [row] = _wait_sent(gateway, 1, timeout=300)
    assert row["instances"] == 1000
    with sqlite3.connect(gateway.home.path / "state.db") as db:
        assert db.execute("SELECT files FROM transfers").fetchone()[0] == 1000
        # What `status` shows, as for a study sent with `dicommail send`.
        assert db.execute("SELECT images FROM transfer_tracking").fetchone()[0] == 1000
    print(f"1000 instances received in {received:.1f} s")


def test_kill_9_during_reception_loses_no_confirmed_instance(gateway: Gateway, practice: Home,
                                                             pacs: Pacs) -> None:
    assert gateway.stop() == 0
    gateway.start(env={"DICOMMAIL_TEST_CRASH_AT": "gateway-after-store:7"})
    study_uid = generate_uid()
    datasets = [_tiny(study_uid, n) for n in range(1, 13)]
    assoc = _associate(gateway.port, [(CT, ExplicitVRLittleEndian)])
    statuses = _push(assoc, datasets)
    assoc.abort()
    gateway.wait_killed()
    confirmed = [ds for ds, status in zip(datasets, statuses, strict=True) if status == 0]
    assert 0 < len(confirmed) < len(datasets)
    # After the restart the PACS sends again what was not confirmed, and one confirmed image again.
    gateway.start()
    rest = [ds for ds in datasets if ds not in confirmed]
    assoc = _associate(gateway.port, [(CT, ExplicitVRLittleEndian)])
    assert _push(assoc, [confirmed[0], *rest]) == [0] * (len(rest) + 1)
    assoc.release()
    [row] = _wait_sent(gateway, 1)
    assert row["instances"] == len(datasets)
    _receive_into_pacs(practice, pacs, {str(ds.SOPInstanceUID) for ds in datasets})


def test_kill_9_after_packing_sends_the_study_once(gateway: Gateway) -> None:
    assert gateway.stop() == 0
    gateway.start(env={"DICOMMAIL_TEST_CRASH_AT": "gateway-after-pack"})
    study_uid = generate_uid()
    assoc = _associate(gateway.port, [(CT, ExplicitVRLittleEndian)])
    assert _push(assoc, [_tiny(study_uid, n) for n in range(1, 4)]) == [0, 0, 0]
    assoc.release()
    gateway.wait_killed()
    assert [r["status"] for r in _studies(gateway.home)] == ["packing"]
    gateway.start()
    _wait_sent(gateway, 1)
    with sqlite3.connect(gateway.home.path / "state.db") as db:
        assert db.execute("SELECT COUNT(*) FROM transfers").fetchone()[0] == 1
    # Nothing of the interrupted packing is left in the outbox.
    outbox = gateway.home.path / "spool" / "outbox"
    with sqlite3.connect(gateway.home.path / "state.db") as db:
        queued = {Path(p).name for (p,) in db.execute("SELECT path FROM outbound_mails")}
    assert {p.name for p in outbox.glob("gateway-*/*.eml")} == queued


def test_compressed_study_arrives_byte_identical(gateway: Gateway, practice: Home, pacs: Pacs) -> None:
    original = pydicom.dcmread(pydicom_sample("SC_rgb_jpeg_dcmtk.dcm"))
    syntax = str(original.file_meta.TransferSyntaxUID)
    assert original.file_meta.TransferSyntaxUID.is_compressed
    if pacs.find_instance(original.SOPInstanceUID):
        pacs.delete_all_instances()  # another test sent this sample before
    assoc = _associate(gateway.port, [(str(original.SOPClassUID), syntax)], called="OTHER_DR")
    assert assoc.is_established
    assert _push(assoc, [original]) == [0]
    assoc.release()
    [row] = _wait_sent(gateway, 1)
    assert row["route"] == "OTHER_DR"
    _receive_into_pacs(practice, pacs, {str(original.SOPInstanceUID)})
    received = pydicom.dcmread(io.BytesIO(pacs.get_instance_file(original.SOPInstanceUID)))
    assert str(received.file_meta.TransferSyntaxUID) == syntax
    assert received.PixelData == original.PixelData


def test_check_reports_every_problem(gateway: Gateway, tmp_path: Path) -> None:
    import json

    result = gateway.home.run("check", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    checks = {c["check"]: c for c in json.loads(result.stdout)["checks"]}
    assert set(checks) == {"config", "file modes", "own key", "test signature", f"key of {PRACTICE}", "SMTP login",
                           "IMAP login", "PACS C-ECHO", "spool free space", "gateway", "acknowledgements"}
    assert all(c["status"] == "ok" for c in checks.values()), checks
    assert "in use by this home's gateway" in checks["gateway"]["detail"]
    # Scripts go by the stable ids, people by the names.
    assert [c["id"] for c in json.loads(result.stdout)["checks"]] == [
        "config", "file-modes", "own-key", "signing", f"peer-key:{PRACTICE}", "smtp", "mailbox", "pacs",
        "spool-space", "gateway", "acknowledgements"]
    # A route to a peer whose key we do not have, and a wrong mailbox password.
    config = gateway.home.path / "dicommail.toml"
    config.write_text(config.read_text() + '\n[routes."STRANGER"]\nrecipients = ["nobody@example.org"]\n')
    (gateway.home.path / "mail.pass").write_text("wrong\n")
    result = gateway.home.run("check", "--json")
    assert result.returncode == 1
    failed = {c["check"] for c in json.loads(result.stdout)["checks"] if not c["ok"]}
    assert failed == {"key of nobody@example.org", "SMTP login", "IMAP login", "gateway"}
    assert {c["id"] for c in json.loads(result.stdout)["checks"] if not c["ok"]} == {
        "peer-key:nobody@example.org", "smtp", "mailbox", "gateway"}
    table = gateway.home.run("check")
    assert table.returncode == 1 and "FAILED" in table.stdout


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_odd_instance_numbers_are_stored_and_sent(gateway: Gateway) -> None:
    # "abc" and "2\3" used to stop packing for good (and the PACS had been told "success").
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    study_uid = generate_uid()
    datasets = [_tiny(study_uid, n) for n in range(1, 4)]
    for ds, raw in zip(datasets, (b"abc ", b"2\\3 "), strict=False):
        ds._dict[Tag(0x00200013)] = RawDataElement(Tag(0x00200013), "IS", len(raw), raw, 0, False, True)
    assoc = _associate(gateway.port, [(CT, ExplicitVRLittleEndian)])
    assert _push(assoc, datasets) == [0, 0, 0]
    assoc.release()
    [row] = _wait_sent(gateway, 1)
    assert row["instances"] == 3


def test_objects_packing_could_not_read_are_refused(gateway: Gateway) -> None:
    ds = _tiny(generate_uid(), 1)
    del ds.StudyInstanceUID
    assoc = _associate(gateway.port, [(CT, ExplicitVRLittleEndian)])
    assert _push(assoc, [ds]) == [0xC000]
    assoc.release()
    assert _studies(gateway.home) == []


def _storescu(port: int, files: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([dcmtk_tool("storescu"), "-aet", "HOSPPACS", "-aec", ROUTE, "127.0.0.1", str(port),
                           *map(str, files)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TCP_NODELAY": "1"})


def test_late_pacs_retry_after_a_lost_answer_sends_no_instance_twice(gateway: Gateway, practice: Home, pacs: Pacs,
                                                                      tmp_path: Path) -> None:
    # The gateway dies after committing the third instance, before answering it.
    assert gateway.stop() == 0
    gateway.start(env={"DICOMMAIL_TEST_CRASH_AT": "gateway-after-store:3"})
    study = write_ct_study(tmp_path / "study", 5, 32)
    assert _storescu(gateway.port, study).returncode != 0
    gateway.wait_killed()
    gateway.start()
    [first] = _wait_sent(gateway, 1)
    assert first["instances"] == 3
    # Long after, the PACS sends the whole study again: the three already accepted are answered
    # "success" and not stored again; the two it never heard about go out in a study of their own.
    pushed = _storescu(gateway.port, study)
    assert pushed.returncode == 0, pushed.stderr
    rows = _wait_sent(gateway, 2)
    assert [r["instances"] for r in rows] == [3, 2]
    with sqlite3.connect(gateway.home.path / "state.db") as db:
        assert [f for (f,) in db.execute("SELECT files FROM transfers ORDER BY id")] == [3, 2]
        stored = db.execute("SELECT sop_instance_uid, sha256 FROM gateway_instances").fetchall()
    uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study}
    assert {uid for uid, _ in stored} == uids and len(stored) == 5
    assert all(digest and len(digest) == 64 for _, digest in stored)
    log = gateway.log.read_text()
    assert log.count("already accepted") == 3
    assert "SYNTHETIC" not in log
    _receive_into_pacs(practice, pacs, uids)


def test_duplicate_window_zero_sends_a_repeated_push_again(mail_servers: MailServers, pacs: Pacs,
                                                           tmp_path: Path) -> None:
    port = free_ports(1)[0]
    home = make_home("hospital", HOSPITAL, mail_servers, pacs,
                     extra=gateway_config(port, {ROUTE: PRACTICE}, extra="duplicate_window = 0"))
    server = Gateway(home, port, tmp_path / "gateway.log")
    server.start()
    try:
        study = write_ct_study(tmp_path / "study", 2, 16)
        assert _storescu(port, study).returncode == 0
        _wait_sent(server, 1)
        assert _storescu(port, study).returncode == 0
        assert [r["instances"] for r in _wait_sent(server, 2)] == [2, 2]
    finally:
        assert server.stop() == 0, server.log.read_text()
        remove_home(home)
