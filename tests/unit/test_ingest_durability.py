"""The gateway's ingest: one durable step per instance, and what a kill -9 at any point leaves behind.

Each instance is written under its final name and fsynced, then its row is
committed (rows of concurrent associations in one commit); a file without a
row is removed at start-up; a row whose file was lost is dropped.  The kill -9
cases run a real child process that SIGKILLs itself at the named step.
"""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta, encode_file_meta

from dicommail.gateway.ingest import COMPLETE, FAILED, RECEIVING, Ingest, Instance, Stored, content_sha256
from dicommail.gateway.scp import file_meta
from dicommail.store.db import Database

CT = "1.2.840.10008.5.1.4.1.1.2"
ROOT = Path(__file__).resolve().parents[2]


def _part10(study_uid: str, size: int = 64) -> tuple[str, bytes]:
    uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CT
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = study_uid
    ds.BitsAllocated = 8
    ds.PixelData = os.urandom(size)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return uid, buffer.getvalue()


def _instance(uid: str, data: bytes, study_uid: str) -> Instance:
    return Instance(route="DR", calling_aet="PACS", peer="127.0.0.1", study_uid=study_uid, sop_class_uid=CT,
                    sop_instance_uid=uid, transfer_syntax=ExplicitVRLittleEndian, data=data)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "state.db")
    yield database
    database.close()


def _files(spool: Path) -> list[Path]:
    return sorted((spool / "gateway" / "received").glob("*"))


def _rows(db: Database) -> list[tuple[str, str, int]]:
    return [(r["sop_instance_uid"], r["path"], r["size"]) for r in db.query(
        "SELECT sop_instance_uid, path, size FROM gateway_instances ORDER BY sop_instance_uid")]


@pytest.mark.parametrize(("sop_class", "instance", "syntax"), [
    (CT, "1.2.3.4", ExplicitVRLittleEndian),  # even lengths
    ("1.2.840.10008.5.1.4.1.1.7", "1.2.3.45", "1.2.840.10008.1.2"),  # odd: padded with NUL
])
def test_the_file_meta_is_what_pynetdicom_would_write(sop_class: str, instance: str, syntax: str) -> None:
    expected = bytes(128) + b"DICM" + encode_file_meta(
        create_file_meta(sop_class_uid=sop_class, sop_instance_uid=instance, transfer_syntax=syntax))
    assert file_meta(sop_class, instance, syntax, PYNETDICOM_IMPLEMENTATION_UID,
                     PYNETDICOM_IMPLEMENTATION_VERSION) == expected


def test_the_file_holds_exactly_the_received_bytes(tmp_path: Path, db: Database) -> None:
    study = generate_uid()
    uid, data = _part10(study)
    ingest = Ingest(db, tmp_path / "spool", duplicate_window=3600)
    stored = ingest.store(_instance(uid, data, study))
    assert stored == Stored(stored.study_id, duplicate=False)
    [(row_uid, path, size)] = _rows(db)
    assert row_uid == uid and size == len(data)
    assert Path(path).parent == tmp_path / "spool" / "gateway" / "received"
    assert Path(path).read_bytes() == data
    assert Path(path).stat().st_mode & 0o777 == 0o600
    [row] = db.query("SELECT sha256, instances, bytes FROM gateway_instances JOIN gateway_studies s ON s.id = study_id")
    assert (row["sha256"], row["instances"], row["bytes"]) == (content_sha256(data), 1, len(data))


def test_a_repeat_in_the_receiving_study_leaves_one_row_and_one_file(tmp_path: Path, db: Database) -> None:
    study = generate_uid()
    uid, data = _part10(study)
    ingest = Ingest(db, tmp_path / "spool")
    first = ingest.store(_instance(uid, data, study))
    again = ingest.store(_instance(uid, data[:-2] + b"\x00\x01", study))
    assert again == Stored(first.study_id, duplicate=True, changed=True)
    assert len(_rows(db)) == 1 and len(_files(tmp_path / "spool")) == 1
    assert Path(_rows(db)[0][1]).read_bytes() == data  # the first stands


def test_a_refused_or_failed_write_leaves_no_file(tmp_path: Path, db: Database,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    study = generate_uid()
    uid, data = _part10(study)
    ingest = Ingest(db, tmp_path / "spool")
    written = ingest.write(uid, data)
    written.discard()  # the object was refused (cannot be read, say) after its write had started
    assert _files(tmp_path / "spool") == []

    def no_commit(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ingest._commits, "run", no_commit)
    with pytest.raises(OSError):
        ingest.store(_instance(uid, data, study))
    assert _files(tmp_path / "spool") == [] and _rows(db) == []


def test_a_study_completed_meanwhile_gets_the_instance_in_a_new_one(tmp_path: Path, db: Database) -> None:
    ingest = Ingest(db, tmp_path / "spool")
    study = generate_uid()
    first = ingest.store(_instance(*_part10(study), study))
    with db.transaction() as conn:  # the gateway's loop found it idle (no tracker holds it open here)
        conn.execute("UPDATE gateway_studies SET status = ?", (COMPLETE,))
    later = ingest.store(_instance(*_part10(study), study))
    assert not later.duplicate and later.study_id != first.study_id
    rows = db.query("SELECT id, status, instances FROM gateway_studies")
    counts = {r["id"]: (r["status"], r["instances"]) for r in rows}
    assert counts == {first.study_id: (COMPLETE, 1), later.study_id: (RECEIVING, 1)}


def test_removing_a_studys_files_leaves_the_others(tmp_path: Path, db: Database) -> None:
    ingest = Ingest(db, tmp_path / "spool")
    one, other = generate_uid(), generate_uid()
    gone = ingest.store(_instance(*_part10(one), one))
    kept = ingest.store(_instance(*_part10(other), other))
    ingest.remove_files(gone.study_id)
    [(_uid, path, _size)] = [r for r in _rows(db) if r[1] in map(str, _files(tmp_path / "spool"))]
    assert db.query("SELECT study_id FROM gateway_instances WHERE path = ?", (path,))[0][0] == kept.study_id


def test_concurrent_stores_share_one_commit(tmp_path: Path, db: Database) -> None:
    """While one commit (its fsync) is under way, the rows of other associations wait and go in the next, together."""
    ingest = Ingest(db, tmp_path / "spool")
    study = generate_uid()
    items = [_instance(*_part10(study), study) for _ in range(4)]
    ingest.store(items[0])  # the study exists: the threads below only add rows
    transactions = 0
    release = threading.Event()
    real_transaction = db.transaction

    def counted_transaction():  # type: ignore[no-untyped-def]
        nonlocal transactions
        transactions += 1
        if transactions == 1:
            release.wait()  # the first commit "takes long"
        return real_transaction()

    db.transaction = counted_transaction  # type: ignore[method-assign]
    results: list[Stored] = []
    threads = [threading.Thread(target=lambda item=item: results.append(ingest.store(item))) for item in items[1:]]
    for thread in threads:
        thread.start()
    for _ in range(10_000):  # until the two others wait for the first commit
        if len(ingest._commits._pending) == 2:
            break
        threading.Event().wait(0.001)
    release.set()
    for thread in threads:
        thread.join()
    assert transactions == 2
    assert sorted(r.duplicate for r in results) == [False, False, False]
    assert len(_rows(db)) == 4 and len(_files(tmp_path / "spool")) == 4
    assert db.query("SELECT instances FROM gateway_studies")[0]["instances"] == 4


def test_the_same_instance_from_two_associations_at_once_is_stored_once(tmp_path: Path, db: Database) -> None:
    ingest = Ingest(db, tmp_path / "spool")
    study = generate_uid()
    uid, data = _part10(study)
    ingest.store(_instance(*_part10(study), study))
    start = threading.Barrier(2)
    results: list[Stored] = []

    def push() -> None:
        start.wait()
        results.append(ingest.store(_instance(uid, data, study)))

    threads = [threading.Thread(target=push) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.duplicate for r in results) == [False, True]
    assert len(_rows(db)) == 2 and len(_files(tmp_path / "spool")) == 2


def test_recovery_removes_files_without_rows_and_keeps_the_others(tmp_path: Path, db: Database,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    ingest = Ingest(db, tmp_path / "spool")
    study = generate_uid()
    uid, data = _part10(study)
    ingest.store(_instance(uid, data, study))
    received = tmp_path / "spool" / "gateway" / "received"
    half = received / f"{generate_uid()}.0123456789ab.dcm"
    half.write_bytes(data[: len(data) // 2])  # a write a crash interrupted: never confirmed
    with caplog.at_level(logging.INFO, logger="dicommail.gateway"):
        Ingest(db, tmp_path / "spool").recover()
    assert _files(tmp_path / "spool") == [Path(_rows(db)[0][1])]
    assert "removed 1 instance file(s)" in caplog.text


@pytest.mark.parametrize("status", [RECEIVING, COMPLETE])
def test_recovery_drops_a_row_whose_file_was_lost(tmp_path: Path, db: Database, status: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    ingest = Ingest(db, tmp_path / "spool")
    study = generate_uid()
    kept, lost = (_part10(study) for _ in range(2))
    ingest.store(_instance(*kept, study))
    stored = ingest.store(_instance(*lost, study))
    with db.transaction() as conn:
        conn.execute("UPDATE gateway_studies SET status = ?", (status,))
    [path] = [p for uid, p, _size in _rows(db) if uid == lost[0]]
    Path(path).unlink()
    with caplog.at_level(logging.ERROR, logger="dicommail.gateway"):
        ingest.recover()
    assert [uid for uid, _p, _s in _rows(db)] == [kept[0]]
    [row] = db.query("SELECT instances, bytes, status FROM gateway_studies WHERE id = ?", (stored.study_id,))
    assert (row["instances"], row["bytes"], row["status"]) == (1, len(kept[1]), status)
    assert lost[0] in caplog.text and "send it again" in caplog.text
    # All of a complete study lost: it fails rather than packing nothing.
    Path(_rows(db)[0][1]).unlink()
    ingest.recover()
    assert db.query("SELECT status FROM gateway_studies")[0]["status"] == (RECEIVING if status == RECEIVING
                                                                            else FAILED)


# -- kill -9 ----------------------------------------------------------------------------------------------

_CHILD = r"""
import os, signal, sys
from pathlib import Path
from dicommail.gateway import ingest as ingest_module
from dicommail.gateway.ingest import Ingest, Instance
from dicommail.store.db import Database

root, step, uid, study = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
data = (root / "object.dcm").read_bytes()

def kill(at):
    if at == step:
        os.kill(os.getpid(), signal.SIGKILL)

if step == "mid-write":  # the file half written under its final name
    def half_then_die(path, data):
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        os.kill(os.getpid(), signal.SIGKILL)
    ingest_module.write_durable = half_then_die

ingest = Ingest(Database(root / "state.db"), root / "spool", crash_hook=kill, duplicate_window=3600)
ingest.store(Instance("DR", "PACS", "127.0.0.1", study, "1.2.840.10008.5.1.4.1.1.2", uid, "1.2.840.10008.1.2.1",
                      data))
print("stored")
"""


@pytest.mark.parametrize("step", ["gateway-before-store", "mid-write", "gateway-after-write",
                                  "gateway-after-store", "never"])
def test_a_kill_9_at_any_step_loses_nothing_confirmed_and_keeps_nothing_half_written(tmp_path: Path,
                                                                                     step: str) -> None:
    study = generate_uid()
    uid, data = _part10(study, size=200_000)
    (tmp_path / "object.dcm").write_bytes(data)
    child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path), step, uid, study], cwd=ROOT,
                           capture_output=True, text=True)
    confirmed = child.returncode == 0
    assert confirmed == (step == "never") or (not confirmed and child.returncode == -signal.SIGKILL), child.stderr
    # The restart: the spool is tidied before the gateway listens.
    db = Database(tmp_path / "state.db")
    try:
        ingest = Ingest(db, tmp_path / "spool", duplicate_window=3600)
        ingest.recover()
        rows = _rows(db)
        recorded = step in ("gateway-after-store", "never")
        assert [r[0] for r in rows] == ([uid] if recorded else [])
        assert _files(tmp_path / "spool") == [Path(r[1]) for r in rows]  # nothing else, nothing partial
        for _uid, path, size in rows:
            assert Path(path).read_bytes() == data and size == len(data)
        # The PACS sends what it did not hear "success" for, and (after a lost answer) what it did.
        again = ingest.store(_instance(uid, data, study))
        assert again.duplicate == recorded
        assert [r[0] for r in _rows(db)] == [uid] and len(_files(tmp_path / "spool")) == 1
        assert db.query("SELECT instances FROM gateway_studies WHERE status = ?", (RECEIVING,))[0][0] == 1
    finally:
        db.close()
