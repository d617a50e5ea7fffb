"""The receiving pipeline without mail servers: stored mails in, a verified study in a folder out."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicommail.dicom import scan
from dicommail.receiver.destinations import FolderDestination
from dicommail.receiver.inbox import store_fetched
from dicommail.receiver.pipeline import Pipeline
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database
from tests.wire.conftest import PRACTICE, Site

ACCOUNT = "imap://practice@localhost:993/INBOX"


@pytest.fixture
def receiving(practice_site: Site, tmp_path: Path) -> Iterator[tuple[Pipeline, Database, Path]]:
    db = Database(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool")
    out = tmp_path / "pacs-folder"
    pipeline = Pipeline(
        db, spool, practice_site.keyring, FolderDestination(out), max_output=1024**3, set_timeout=3600, retry_interval=1
    )
    yield pipeline, db, out
    db.close()


def _store(db: Database, spool: Spool, mails: list[Path], start: int = 0) -> None:
    for number, mail in enumerate(mails, start):
        store_fetched(db, spool, ACCOUNT, f"1:{number}", mail.read_bytes())


def _statuses(db: Database) -> dict[str, str]:
    return {r["set_id"]: r["status"] for r in db.query("SELECT set_id, status FROM inbound_sets")}


def test_set_arrives_over_several_polls_with_duplicates(
    hospital_site: Site, receiving: tuple[Pipeline, Database, Path], ct_study: list[Path], tmp_path: Path
) -> None:
    pipeline, db, out = receiving
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2).pack(scan(ct_study).files, tmp_path / "sent")
    mails = [m.path for m in packed.mails]
    _store(db, pipeline.spool, mails[:2])
    pipeline.run_once()
    assert _statuses(db) == {packed.set_id: "collecting"}
    _store(db, pipeline.spool, [*mails[2:], mails[0]], start=2)  # the rest, and part 1 again
    pipeline.run_once()
    assert _statuses(db) == {packed.set_id: "delivered"}
    delivered = out / packed.set_id
    for original in ct_study:
        assert (delivered / original.name).read_bytes() == original.read_bytes()
    forwarded = db.query("SELECT COUNT(*) AS n FROM forwarded_instances")[0]["n"]
    assert forwarded == len(ct_study)
    assert not (pipeline.spool.parts / packed.set_id).exists()  # decoded copies removed after delivery
    pipeline.run_once()  # nothing more to do, nothing done twice
    assert db.query("SELECT COUNT(*) AS n FROM forwarded_instances")[0]["n"] == forwarded


def test_fragments_are_joined_across_polls(
    hospital_site: Site, receiving: tuple[Pipeline, Database, Path], multiframe: Path, tmp_path: Path
) -> None:
    pipeline, db, out = receiving
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2, compression_level=0).pack(
        scan([multiframe]).files, tmp_path / "sent"
    )
    mails = [m.path for m in packed.mails]
    _store(db, pipeline.spool, mails[::2])
    pipeline.run_once()
    assert _statuses(db) == {}
    _store(db, pipeline.spool, mails[1::2], start=100)
    pipeline.run_once()
    assert _statuses(db) == {packed.set_id: "delivered"}
    assert (out / packed.set_id / multiframe.name).read_bytes() == multiframe.read_bytes()


def test_tampered_mail_is_quarantined_and_the_set_expires(
    hospital_site: Site, receiving: tuple[Pipeline, Database, Path], ct_study: list[Path], tmp_path: Path
) -> None:
    pipeline, db, out = receiving
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2).pack(scan(ct_study).files, tmp_path / "sent")
    mails = [m.path for m in packed.mails]
    broken = tmp_path / "broken.eml"
    data = bytearray(mails[1].read_bytes())
    middle = data.index(b"\n", len(data) // 2) + 3
    data[middle] = ord("A") if data[middle] != ord("A") else ord("B")
    broken.write_bytes(bytes(data))
    _store(db, pipeline.spool, [mails[0], broken, *mails[2:]])
    pipeline.run_once()
    [quarantined] = db.query("SELECT * FROM inbound_mails WHERE status = 'quarantined'")
    assert quarantined["error"].startswith("decryption-failed")
    [place] = list(pipeline.spool.quarantine_dir.iterdir())
    reason = json.loads((place / "reason.json").read_text())
    assert reason["code"] == "decryption-failed" and reason["hint"]
    assert any(p.suffix == ".eml" for p in place.iterdir())  # the mail itself is kept
    assert _statuses(db) == {packed.set_id: "collecting"}
    # Later the set expires, its parts kept in the quarantine, reporting the missing part.
    pipeline.set_timeout = 0
    pipeline.run_once()
    assert _statuses(db) == {packed.set_id: "expired"}
    [row] = db.query("SELECT error FROM inbound_sets")
    assert "missing: 2" in row["error"]
    assert not out.exists() or not list(out.iterdir())


def test_destination_failure_is_retried_not_lost(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    db = Database(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool")
    target = tmp_path / "pacs"
    target.write_text("a file where the destination folder should be")  # fails even for root
    pipeline = Pipeline(
        db, spool, practice_site.keyring, FolderDestination(target), max_output=1024**3, retry_interval=0.01
    )
    packed = hospital_site.packer(PRACTICE).pack(scan(ct_study[:3]).files, tmp_path / "sent")
    _store(db, spool, [m.path for m in packed.mails])
    pipeline.run_once()
    assert _statuses(db) == {packed.set_id: "complete"}
    [row] = db.query("SELECT attempts, error FROM inbound_sets")
    assert row["attempts"] == 1 and row["error"].startswith("destination")
    target.unlink()
    time.sleep(0.05)  # the retry is due after retry_interval
    pipeline.run_once()
    assert _statuses(db) == {packed.set_id: "delivered"}
    assert len(list((target / packed.set_id).glob("*.dcm"))) == 3
    db.close()


def test_state_survives_a_new_pipeline(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    """A restart (a new process) picks up parts stored by the previous one."""
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2).pack(scan(ct_study).files, tmp_path / "sent")
    mails = [m.path for m in packed.mails]
    out = tmp_path / "out"
    for batch in (mails[:1], mails[1:]):
        db = Database(tmp_path / "state.db")
        spool = Spool(tmp_path / "spool")
        _store(db, spool, batch, start=mails.index(batch[0]))
        Pipeline(db, spool, practice_site.keyring, FolderDestination(out), max_output=1024**3).run_once()
        db.close()
    with sqlite3.connect(tmp_path / "state.db") as raw:
        assert raw.execute("SELECT status FROM inbound_sets").fetchone()[0] == "delivered"


def test_hostile_headers_do_not_stop_the_receiver(tmp_path: Path) -> None:
    from dicommail.wire.headers import is_set_id

    db = Database(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool")
    huge_part = b"X-TELEMEDICINE-SETID: 2.25.1\nX-TELEMEDICINE-SETPART: " + b"9" * 5000 + b"\n\nbody\n"
    huge_block = b"X-Junk: " + b"a" * 70_000 + b"\nX-TELEMEDICINE-SETID: 2.25.2\n\nbody\n"
    first = store_fetched(db, spool, ACCOUNT, "9:1", huge_part)
    second = store_fetched(db, spool, ACCOUNT, "9:2", huge_block)
    assert first.kind == "dicom-mail" and second.kind == "other"
    assert db.query("SELECT set_part FROM inbound_mails WHERE id = ?", (first.id,))[0]["set_part"] is None
    assert not second.spool_path.exists()  # other mail stays on the server, no copy kept here
    for bad in ("..", ".", "", "../x", "a/b"):
        assert not is_set_id(bad)
    assert is_set_id("2.25.123") and is_set_id("msg-ab12")
    db.close()


def test_a_stopping_daemon_ends_intake_after_the_current_mail(
    hospital_site: Site, receiving: tuple[Pipeline, Database, Path], ct_study: list[Path], tmp_path: Path
) -> None:
    pipeline, db, _out = receiving
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2).pack(scan(ct_study).files, tmp_path / "sent")
    assert len(packed.mails) >= 3
    _store(db, pipeline.spool, [m.path for m in packed.mails])

    def processed() -> int:
        return int(db.query("SELECT COUNT(*) AS n FROM inbound_mails WHERE status != 'stored'")[0]["n"])

    pipeline.should_stop = lambda: processed() >= 1  # SIGTERM came while the first mail was decrypted
    pipeline.run_intake()
    assert processed() == 1
    pipeline.should_stop = lambda: False  # the next start does the rest
    pipeline.run_once()
    assert _statuses(db) == {packed.set_id: "delivered"}


def test_a_stage_stopped_by_a_wrong_passphrase_fails_the_cycle(
    receiving: tuple[Pipeline, Database, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `receive --once` from a timer must fail (exit 1, ok=false), not report success while mails wait.
    from dicommail.errors import PassphraseError
    from dicommail.receiver.daemon import CycleReport

    pipeline, _db, _out = receiving

    def locked_key() -> None:
        raise PassphraseError("wrong passphrase for the key 0123", "check identity.passphrase_file")

    monkeypatch.setattr(pipeline, "process_stored", locked_key)
    pipeline.run_once()
    [error] = pipeline.take_stage_errors()
    assert isinstance(error, PassphraseError)
    assert pipeline.take_stage_errors() == []  # taken once
    report = CycleReport(processing_error=error)
    assert not report.ok and report.to_json()["processing_error"] == "wrong passphrase for the key 0123"
