"""Gateway robustness: tolerant Instance Numbers, ingest checks as strict as packing, a bounded packing retry,
a loop that survives a locked database, per-recipient outbox folders that do not depend on route order, and
a late PACS retry (the same instance within gateway.duplicate_window) that is not sent twice."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import io
import logging
import sqlite3
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import split_dataset

from dicommail.config import parse_config
from dicommail.dicom import check_dicom_data, instance_number, read_dicom_info
from dicommail.errors import CryptoError, InputError, NotDicomError, PassphraseError, RecipientKeyError
from dicommail.gateway import service
from dicommail.gateway.ingest import COMPLETE, FAILED, SENT, Ingest, Instance, Stored, content_sha256
from dicommail.gateway.scp import _study_uid
from dicommail.store.db import Database

CT = "1.2.840.10008.5.1.4.1.1.2"


def _part10(instance_number_raw: bytes | None = None, *, study: bool = True) -> tuple[str, bytes]:
    """(SOP Instance UID, Part 10 bytes), the Instance Number written as raw bytes (whatever they are)."""
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid
    if study:
        ds.StudyInstanceUID = generate_uid()
    if instance_number_raw is not None:
        raw = instance_number_raw + (b" " if len(instance_number_raw) % 2 else b"")
        tag = Tag(0x00200013)
        ds._dict[tag] = RawDataElement(tag, "IS", len(raw), raw, 0, False, True)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return uid, buffer.getvalue()


@pytest.mark.parametrize(("value", "expected"), [
    (None, 0), ("", 0), ("7", 7), (" 7 ", 7), ("abc", 0), ("2\\3", 2), ("x\\4", 0), ("1.5", 1), ("nan", 0),
    ("inf", 0), (["4", "5"], 4), ([], 0), (12, 12),
])
def test_instance_number_is_tolerant(value: object, expected: int) -> None:
    assert instance_number(value) == expected


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("raw", "expected"), [(b"abc", 0), (b"2\\3", 2), (b"", 0), (b"x\\4", 0), (b"9", 9)])
def test_odd_instance_numbers_are_readable_and_accepted_at_ingest(tmp_path: Path, raw: bytes,
                                                                  expected: int) -> None:
    uid, data = _part10(raw)
    path = tmp_path / "x.dcm"
    path.write_bytes(data)
    assert read_dicom_info(path).instance_number == expected
    assert check_dicom_data(data, "x")[0] == uid
    assert _study_uid(data, uid)


def test_ingest_refuses_what_packing_could_not_read() -> None:
    uid, data = _part10(study=False)
    with pytest.raises(NotDicomError, match="Study Instance UID"):
        _study_uid(data, uid)
    with pytest.raises(InputError):
        _study_uid(b"not dicom at all" * 20, uid)
    _other, data = _part10()
    with pytest.raises(InputError, match="differs"):
        _study_uid(data, uid)


def test_recipient_folder_key_is_stable_and_case_insensitive() -> None:
    assert service.recipient_key("Dr@Practice.Test") == service.recipient_key(" dr@practice.test")
    assert service.recipient_key("a@b.test") != service.recipient_key("c@b.test")
    assert service.recipient_key("a@b.test").isalnum()


def _gateway(tmp_path: Path) -> tuple[service.Gateway, Database]:
    config = parse_config({"identity": {"address": "hospital@hospital.test"},
                           "routes": {"DR": {"recipients": ["dr@practice.test"]}}}, tmp_path)
    db = Database(tmp_path / "state.db")
    gateway = service.Gateway(config, db, keyring=None, client_factory=lambda: None)  # type: ignore[arg-type]
    return gateway, db


def _add_study(db: Database, study_id: int = 1, status: str = COMPLETE, error: str | None = None) -> None:
    """A gateway study of route DR with one instance, in ``status``."""
    now = time.time()
    with db.transaction() as conn:
        conn.execute("INSERT INTO gateway_studies (id, route, study_uid, status, instances, calling_aet, peer,"
                     " first_received_at, last_received_at, updated_at, error) VALUES (?, 'DR', '1.2.3', ?, 1,"
                     " 'PACS', '127.0.0.1', ?, ?, ?, ?)", (study_id, status, now, now, now, error))


def test_packing_failures_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway, db = _gateway(tmp_path)
    _add_study(db)
    attempts = []

    def broken(study_id: int) -> list[int]:
        attempts.append(study_id)
        raise NotDicomError("instance 1.2.3.4 is not a readable DICOM file (ValueError)")

    monkeypatch.setattr(gateway, "_pack_study", broken)

    def status() -> tuple[str, str]:
        row = db.query("SELECT status, error FROM gateway_studies WHERE id = 1")[0]
        return row["status"], row["error"]

    for attempt in range(1, service.MAX_PACK_ATTEMPTS):
        asyncio.run(gateway._study_job(1))
        assert status()[0] == COMPLETE and gateway._ready == [1], attempt
        gateway._ready.clear()
    asyncio.run(gateway._study_job(1))
    state, error = status()
    assert state == FAILED and "not a readable DICOM file" in error
    assert gateway._ready == [] and len(attempts) == service.MAX_PACK_ATTEMPTS


@pytest.mark.parametrize("error", [
    RecipientKeyError("cannot encrypt to dr@practice.test: no such key", "import and certify their key"),
    PassphraseError("wrong passphrase for the key 0123", "check identity.passphrase_file"),
    CryptoError("signing and encrypting failed: write error: No space left on device", "free disk space"),
    OSError(28, "No space left on device"),
])
def test_a_study_stopped_by_this_sites_setup_waits_and_is_never_given_up(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, error: Exception) -> None:
    # The PACS was told "success": giving the study up after a few minutes would lose it for good.
    gateway, db = _gateway(tmp_path)
    _add_study(db)

    def unusable(study_id: int) -> list[int]:
        raise error

    monkeypatch.setattr(gateway, "_pack_study", unusable)
    waits = []
    for _attempt in range(service.MAX_PACK_ATTEMPTS * 2):
        before = time.monotonic()
        with caplog.at_level(logging.ERROR, "dicommail.gateway"):
            asyncio.run(gateway._study_job(1))
        assert db.query("SELECT status FROM gateway_studies WHERE id = 1")[0]["status"] == COMPLETE
        assert gateway._ready == [1]
        gateway._ready.clear()
        waits.append(gateway._not_before[1] - before)
    assert "waits, not sent" in caplog.text and "tried again" in caplog.text
    assert waits[1] > waits[0] * 1.5 and max(waits) <= 1800 + 1  # backing off, as mails do, up to 30 min


def test_a_locked_database_does_not_end_the_loop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gateway, _db = _gateway(tmp_path)
    calls = []

    def locked() -> None:
        calls.append("complete")
        raise sqlite3.OperationalError("database is locked")

    def disk() -> None:
        calls.append("retry")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gateway, "_complete_idle_studies", locked)
    monkeypatch.setattr(gateway, "_start_jobs", lambda: calls.append("jobs"))
    monkeypatch.setattr(gateway, "_start_retry", disk)
    gateway._tick()
    gateway._tick()
    assert calls == ["complete", "jobs", "retry"] * 2


# -- a late PACS retry: the same instance again, within gateway.duplicate_window --------------------


def _instance(uid: str, data: bytes, *, study: str = "1.2.3", route: str = "DR") -> Instance:
    return Instance(route=route, calling_aet="PACS", peer="127.0.0.1", study_uid=study, sop_class_uid=CT,
                    sop_instance_uid=uid, transfer_syntax=str(ExplicitVRLittleEndian), data=data)


def _set_status(db: Database, study_id: int, status: str) -> None:
    with db.transaction() as conn:
        conn.execute("UPDATE gateway_studies SET status = ? WHERE id = ?", (status, study_id))


def test_a_repeat_within_the_window_is_not_stored_or_sent_again(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    db = Database(tmp_path / "state.db")
    ingest = Ingest(db, tmp_path / "spool", duplicate_window=3600)
    uid, data = _part10()
    first = ingest.store(_instance(uid, data), now=lambda: 1000.0)
    assert not first.duplicate
    _set_status(db, first.study_id, SENT)
    with caplog.at_level(logging.INFO, logger="dicommail.gateway"):
        again = ingest.store(_instance(uid, data), now=lambda: 1000.0 + 3599)
    assert again == Stored(first.study_id, duplicate=True, accepted_before=1000.0)
    assert "not stored or sent again" in caplog.text
    # No new study was opened for it, nothing written.
    assert [r["id"] for r in db.query("SELECT id FROM gateway_studies")] == [first.study_id]
    assert len(list((tmp_path / "spool" / "gateway").glob("*/*.dcm"))) == 1
    [row] = db.query("SELECT sha256 FROM gateway_instances")
    (tmp_path / "x.dcm").write_bytes(data)
    _meta, offset = split_dataset(tmp_path / "x.dcm")
    assert row["sha256"] == content_sha256(data) == hashlib.sha256(data[offset:]).hexdigest()


@pytest.mark.parametrize("case", ["later", "other content", "other route", "failed", "window off"])
def test_what_is_not_a_repeat_is_stored_again(tmp_path: Path, case: str) -> None:
    db = Database(tmp_path / "state.db")
    ingest = Ingest(db, tmp_path / "spool", duplicate_window=0 if case == "window off" else 3600)
    uid, data = _part10()
    first = ingest.store(_instance(uid, data), now=lambda: 1000.0)
    _set_status(db, first.study_id, FAILED if case == "failed" else SENT)
    at = 1000.0 + (3601 if case == "later" else 60)
    if case == "other content":
        data = data[:-2] + b"\x00\x01"  # same UID, another image (a correction): a new object
    again = ingest.store(_instance(uid, data, route="OTHER" if case == "other route" else "DR"), now=lambda: at)
    assert not again.duplicate and again.study_id != first.study_id
    assert len(db.query("SELECT 1 FROM gateway_instances WHERE sop_instance_uid = ?", (uid,))) == 2


def test_within_a_study_still_receiving_a_repeat_is_tolerated(tmp_path: Path) -> None:
    db = Database(tmp_path / "state.db")
    ingest = Ingest(db, tmp_path / "spool", duplicate_window=3600)
    uid, data = _part10()
    first = ingest.store(_instance(uid, data), now=lambda: 1000.0)
    again = ingest.store(_instance(uid, data[:-2] + b"\x00\x01"), now=lambda: 1001.0)
    # The first stands, as before; that the content changed is said (the gateway logs a warning).
    assert again == Stored(first.study_id, duplicate=True, changed=True)
    assert ingest.store(_instance(uid, data), now=lambda: 1002.0) == Stored(first.study_id, duplicate=True)
    assert db.query("SELECT instances FROM gateway_studies")[0]["instances"] == 1


def test_the_digest_ignores_the_file_meta_information() -> None:
    _uid, data = _part10()
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.file_meta.SourceApplicationEntityTitle = "ANOTHERPACS"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert buffer.getvalue() != data
    assert content_sha256(buffer.getvalue()) == content_sha256(data)
    assert content_sha256(b"no meta at all") == hashlib.sha256(b"no meta at all").hexdigest()


def test_an_older_state_database_gains_the_sha256_column(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    Database(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TABLE gateway_instances")
        raw.execute("CREATE TABLE gateway_instances (study_id INTEGER NOT NULL, sop_instance_uid TEXT NOT NULL,"
                    " sop_class_uid TEXT NOT NULL, transfer_syntax TEXT NOT NULL, path TEXT NOT NULL,"
                    " size INTEGER NOT NULL, received_at REAL NOT NULL, PRIMARY KEY (study_id, sop_instance_uid))")
    db = Database(path)
    ingest = Ingest(db, tmp_path / "spool", duplicate_window=3600)
    uid, data = _part10()
    assert not ingest.store(_instance(uid, data)).duplicate
    assert db.query("SELECT sha256 FROM gateway_instances")[0]["sha256"] == content_sha256(data)



@pytest.mark.parametrize(("port", "says"), [(104, "CAP_NET_BIND_SERVICE"), (11112, "another gateway")])
def test_a_port_it_may_not_bind_names_the_capability(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     port: int, says: str) -> None:
    import asyncio
    import errno

    from dicommail.errors import ConfigError

    config = parse_config({"identity": {"address": "hospital@hospital.test"}, "gateway": {"port": port},
                           "routes": {"DR": {"recipients": ["dr@practice.test"]}}}, tmp_path)
    db = Database(tmp_path / "state.db")
    gateway = service.Gateway(config, db, keyring=None, client_factory=lambda: None)  # type: ignore[arg-type]
    monkeypatch.setattr(service, "own_key", lambda *_args: None)
    monkeypatch.setattr(service, "sender_address", lambda *_args: "hospital@hospital.test")
    monkeypatch.setattr(gateway, "_recover", lambda: None)
    error = PermissionError(errno.EACCES, "Permission denied") if port < 1024 else \
        OSError(errno.EADDRINUSE, "Address already in use")

    def refuse() -> None:
        raise error

    monkeypatch.setattr(gateway.service, "start", refuse)
    try:
        with pytest.raises(ConfigError) as failed:
            asyncio.run(gateway.run())
    finally:
        db.close()
    assert f":{port}: " in failed.value.message and says in failed.value.hint


def test_start_up_names_the_routes_that_cannot_send(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from dicommail.crypto.gpg import Keyring

    gateway, _db = _gateway(tmp_path)
    gateway.keyring = Keyring(tmp_path / "gnupg")  # no key of dr@practice.test in it
    try:
        with caplog.at_level(logging.ERROR, "dicommail.gateway"):
            gateway._warn_unusable_routes()
    finally:
        gateway.keyring.close()
    assert "route DR cannot send to dr@practice.test" in caplog.text
    assert "accepted and wait" in caplog.text


@pytest.mark.parametrize(("proposed", "accepted"), [
    (["1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"], "1.2.840.10008.1.2.4.90"),
    (["1.2.840.10008.1.2", "1.2.840.10008.1.2.1"], "1.2.840.10008.1.2.1"),
    (["1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.1"], "1.2.840.10008.1.2.1"),  # never lossy when offered more
    (["1.2.840.10008.1.2.4.50"], "1.2.840.10008.1.2.4.50"),  # the image is lossy already: kept so
])
def test_a_pacs_offering_several_transfer_syntaxes_gets_the_lossless_compressed_one_first(
        proposed: list[str], accepted: str) -> None:
    # With pydicom's order (Implicit VR first) a PACS holding JPEG 2000 had to decompress: mails 3.6x larger.
    from pynetdicom import AE

    from dicommail.gateway.scp import ASSOCIATION_REQUEST_TIMEOUT, storage_server
    from testbed.ports import free_ports

    port = free_ports(1)[0]
    ae, server = storage_server("GW", ("127.0.0.1", port), [])
    try:
        assert ae.acse_timeout == ASSOCIATION_REQUEST_TIMEOUT  # a silent connection frees its place soon
        scu = AE(ae_title="PACS")
        scu.add_requested_context(CT, proposed)
        assoc = scu.associate("127.0.0.1", port, ae_title="GW")
        assert assoc.is_established
        try:
            [context] = assoc.accepted_contexts
            assert context.transfer_syntax[0] == accepted
        finally:
            assoc.release()
    finally:
        server.shutdown()


def test_check_shows_gateway_studies_that_wait_or_failed_and_a_short_spool(tmp_path: Path) -> None:
    from dicommail import checks

    config = parse_config({"identity": {"address": "hospital@hospital.test"},
                           "routes": {"DR": {"recipients": ["dr@practice.test"]}}}, tmp_path)
    db = Database(config.state_db)
    _add_study(db, error="cannot encrypt to dr@practice.test: no such key")
    found = checks._gateway_studies(config)
    assert found is not None and found.status == "warning" and "1 gateway study wait" in found.detail
    with db.transaction() as conn:
        conn.execute("UPDATE gateway_studies SET status = ?, error = 'packing failed 5 times' WHERE id = 1",
                     (FAILED,))
    db.close()
    found = checks._gateway_studies(config)
    assert found is not None and found.status == "failed" and "send them again" in found.hint
    db = Database(config.state_db)
    with db.transaction() as conn:  # a transfer that failed leaves no error on the study
        conn.execute("UPDATE gateway_studies SET error = NULL WHERE id = 1")
    found = checks._gateway_studies(config)
    assert found is not None and "None" not in found.detail
    _add_study(db, 2, "sent")  # the PACS sent it again, as the hint says: the failure is behind us
    db.close()
    assert checks._gateway_studies(config) is None
    assert isinstance(checks._check_spool_space(config), str)  # a plain pass: the free space
    short = checks._check_spool_space(dataclasses.replace(
        config, retention=dataclasses.replace(config.retention, min_free_space=2**62)))
    assert not isinstance(short, str) and short.status == "failed" and "out of resources" in short.detail
