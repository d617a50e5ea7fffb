"""Progressive forwarding: each verified part's instances reach the PACS before the set is complete."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicommail.dicom import scan
from dicommail.errors import DestinationError
from dicommail.receiver.destinations import FolderDestination
from dicommail.receiver.inbox import store_fetched
from dicommail.receiver.pipeline import Pipeline
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database
from dicommail.wire.pack import PackedSet
from dicommail.wire.unpack import VerifiedSet
from tests.wire.conftest import PRACTICE, Site

ACCOUNT = "imap://practice@localhost:993/INBOX"


class RecordingPacs:
    """A destination that files instances as they come, as a PACS does, and remembers every C-STORE."""

    accepts_parts = True

    def __init__(self) -> None:
        self.stores: list[str] = []
        self.held: set[str] = set()
        self.down = False

    def deliver(self, verified: VerifiedSet, done: set[str], on_stored: Callable[[str], None],
                on_sending: Callable[[str], None] | None = None) -> None:
        if self.down:
            raise DestinationError("the PACS refused the association", "it is retried", temporary=True)
        for item in verified.dicom_files:
            assert item.dicom is not None
            uid = item.dicom.sop_instance_uid
            if uid in done:
                continue
            if on_sending is not None:
                on_sending(uid)
            self.stores.append(uid)
            self.held.add(uid)
            on_stored(uid)

    def has_instance(self, study_uid: str, series_uid: str | None, sop_instance_uid: str) -> bool | None:
        return sop_instance_uid in self.held


@pytest.fixture
def state(tmp_path: Path) -> Iterator[tuple[Database, Spool]]:
    db = Database(tmp_path / "state.db")
    yield db, Spool(tmp_path / "spool")
    db.close()


def _pipeline(site: Site, state: tuple[Database, Spool], destination: object, **options: object) -> Pipeline:
    db, spool = state
    return Pipeline(db, spool, site.keyring, destination, max_output=1024**3,  # type: ignore[arg-type]
                    set_timeout=3600, retry_interval=0.01, **options)  # type: ignore[arg-type]


def _pack(site: Site, study: list[Path], out: Path, **options: object) -> PackedSet:
    packed = site.packer(PRACTICE, max_mail_size=1024**2, **options).pack(scan(study).files, out)
    assert len(packed.mails) >= 3
    return packed


def _store(state: tuple[Database, Spool], packed: PackedSet, numbers: list[int]) -> None:
    db, spool = state
    for number in numbers:
        store_fetched(db, spool, ACCOUNT, f"1:{number}", packed.mails[number].path.read_bytes())


def _status(state: tuple[Database, Spool]) -> str:
    [row] = state[0].query("SELECT status FROM inbound_sets")
    return str(row["status"])


def test_progressive_sends_each_part_once_and_delivers_the_set_whole(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path,
    state: tuple[Database, Spool],
) -> None:
    packed = _pack(hospital_site, ct_study, tmp_path / "sent")
    pacs = RecordingPacs()
    pipeline = _pipeline(practice_site, state, pacs, forward="progressive")
    _store(state, packed, [0])
    pipeline.run_once()
    assert _status(state) == "collecting"
    first = len(pacs.stores)
    assert 0 < first < len(ct_study)  # part 1's images are in the PACS before part 2 arrived
    _store(state, packed, list(range(1, len(packed.mails))))
    pipeline.run_once()
    assert _status(state) == "delivered"
    assert sorted(pacs.stores) == sorted(set(pacs.stores)) and len(pacs.stores) == len(ct_study)
    pipeline.run_once()
    assert len(pacs.stores) == len(ct_study)  # nothing sent twice


def test_complete_waits_for_the_whole_set(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path,
    state: tuple[Database, Spool],
) -> None:
    packed = _pack(hospital_site, ct_study, tmp_path / "sent")
    pacs = RecordingPacs()
    pipeline = _pipeline(practice_site, state, pacs)  # forward = "complete" is the default
    _store(state, packed, list(range(len(packed.mails) - 1)))
    pipeline.run_once()
    assert _status(state) == "collecting" and pacs.stores == []
    _store(state, packed, [len(packed.mails) - 1])
    pipeline.run_once()
    assert _status(state) == "delivered" and len(pacs.stores) == len(ct_study)


def test_emergency_sets_go_progressively_by_default(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path,
    state: tuple[Database, Spool],
) -> None:
    packed = _pack(hospital_site, ct_study, tmp_path / "sent", emergency=True)
    pacs = RecordingPacs()
    pipeline = _pipeline(practice_site, state, pacs)
    _store(state, packed, [0])
    pipeline.run_once()
    assert _status(state) == "collecting" and pacs.stores
    # ... unless the site says otherwise.
    other = _pack(hospital_site, ct_study, tmp_path / "sent2", emergency=True)
    db = Database(tmp_path / "other.db")
    quiet = RecordingPacs()
    try:
        pipeline = _pipeline(practice_site, (db, Spool(tmp_path / "spool2")), quiet, forward_emergency="complete")
        _store((db, pipeline.spool), other, [0])
        pipeline.run_once()
        assert quiet.stores == []
    finally:
        db.close()


def test_a_pacs_down_during_progressive_forwarding_loses_nothing_and_sends_nothing_twice(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path,
    state: tuple[Database, Spool],
) -> None:
    packed = _pack(hospital_site, ct_study, tmp_path / "sent")
    pacs = RecordingPacs()
    pipeline = _pipeline(practice_site, state, pacs, forward="progressive")
    _store(state, packed, [0])
    pacs.down = True
    pipeline.run_once()
    [row] = state[0].query("SELECT status, attempts, error FROM inbound_sets")
    assert (row["status"], row["attempts"]) == ("collecting", 1) and row["error"].startswith("destination")
    pacs.down = False
    _store(state, packed, list(range(1, len(packed.mails))))
    import time

    time.sleep(0.05)  # the retry is due after retry_interval
    pipeline.run_once()
    assert _status(state) == "delivered"
    assert sorted(pacs.stores) == sorted(set(pacs.stores)) and len(pacs.stores) == len(ct_study)


def test_a_crash_in_the_middle_of_a_part_sends_nothing_twice(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path,
    state: tuple[Database, Spool],
) -> None:
    packed = _pack(hospital_site, ct_study, tmp_path / "sent")
    pacs = RecordingPacs()
    calls = 0

    def crash(step: str) -> None:
        nonlocal calls
        if step == "before-forward-record":
            calls += 1
            if calls == 2:  # the second instance is in the PACS, its record not written yet
                raise KeyboardInterrupt

    _store(state, packed, [0])
    with pytest.raises(KeyboardInterrupt):
        _pipeline(practice_site, state, pacs, forward="progressive", crash_hook=crash).run_once()
    restarted = _pipeline(practice_site, state, pacs, forward="progressive")
    _store(state, packed, list(range(1, len(packed.mails))))
    restarted.run_once()
    assert _status(state) == "delivered"
    assert len(pacs.stores) == len(set(pacs.stores)) == len(ct_study)


def test_a_folder_always_gets_the_set_whole(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path,
    state: tuple[Database, Spool],
) -> None:
    packed = _pack(hospital_site, ct_study, tmp_path / "sent")
    out = tmp_path / "folder"
    pipeline = _pipeline(practice_site, state, FolderDestination(out), forward="progressive")
    _store(state, packed, [0])
    pipeline.run_once()
    assert _status(state) == "collecting" and not out.exists()
    _store(state, packed, list(range(1, len(packed.mails))))
    pipeline.run_once()
    assert len(list((out / packed.set_id).glob("*.dcm"))) == len(ct_study)
