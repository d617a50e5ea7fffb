"""The receiving pipeline against hostile mail, careless peers and crashes (real gpg, no servers).

Every case ends the same way: the item is quarantined with its reason, no
decrypted data is left in the spool, and the next item is processed.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import certify, export_key, find_key, generate, import_keys
from dicommail.dicom import scan
from dicommail.receiver.destinations import FolderDestination
from dicommail.receiver.inbox import store_fetched
from dicommail.receiver.pipeline import Pipeline
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database
from dicommail.wire import headers as h
from dicommail.wire import unpack
from dicommail.wire.unpack import VerifiedSet
from tests.wire.conftest import HOSPITAL, KEYS, PRACTICE, Site
from tests.wire.forge import dicom_part, encrypted_mail, inner_entity

ACCOUNT = "imap://practice@localhost:993/INBOX"
_uids = iter(range(1, 1_000_000))


@pytest.fixture
def practice(tmp_path: Path) -> Iterator[Site]:
    """A practice of its own for each test (these tests certify keys in it)."""
    home = Path(tempfile.mkdtemp(prefix="dmp"))
    keyring = Keyring(home / "gnupg")
    install_demo_site(keyring, "practice", KEYS)
    yield Site(home, keyring, PRACTICE)
    keyring.close()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def peer_b(practice: Site) -> Iterator[Site]:
    """A second certified peer of the practice (ed25519, made for the test)."""
    home = Path(tempfile.mkdtemp(prefix="dmb"))
    keyring = Keyring(home / "gnupg")
    key = generate(keyring, "Peer B (TEST ONLY)", "imaging@peer-b.test", algo="ed25519", expires="never")
    (theirs,) = import_keys(keyring, export_key(practice.keyring, PRACTICE).encode())
    certify(keyring, theirs.fingerprint)
    (ours,) = import_keys(practice.keyring, export_key(keyring, key.fingerprint).encode())
    certify(practice.keyring, ours.fingerprint)
    yield Site(home, keyring, "imaging@peer-b.test")
    keyring.close()
    shutil.rmtree(home, ignore_errors=True)


class Receiving:
    def __init__(self, practice: Site, root: Path, **options: Any) -> None:
        self.db = Database(root / "state.db")
        self.spool = Spool(root / "spool")
        self.out = root / "pacs-folder"
        self.destination: Any = FolderDestination(self.out)
        options.setdefault("own_addresses", {PRACTICE})
        self.pipeline = Pipeline(self.db, self.spool, practice.keyring, self.destination, max_output=1024**3,
                                 set_timeout=3600, retry_interval=0.01, **options)

    def store(self, *mails: Path) -> list[int]:
        return [store_fetched(self.db, self.spool, ACCOUNT, f"1:{next(_uids)}", m.read_bytes()).id for m in mails]

    def sets(self) -> list[tuple[str, str]]:
        rows = self.db.query("SELECT set_id, status FROM inbound_sets ORDER BY id")
        return [(r["set_id"], r["status"]) for r in rows]

    def mail_status(self, mail_id: int) -> tuple[str, str | None]:
        [row] = self.db.query("SELECT status, error FROM inbound_mails WHERE id = ?", (mail_id,))
        return row["status"], row["error"]

    def assert_no_plaintext(self) -> None:
        """Nothing decrypted outside delivered output: work is empty, parts hold only live sets, quarantine no DICOM."""
        assert list(self.spool.work.iterdir()) == []
        for path in self.spool.quarantine_dir.rglob("*"):
            if path.is_file():
                assert path.name == "reason.json" or path.suffix == ".eml", path
                assert b"DICM" not in path.read_bytes()[:200_000] or path.suffix == ".eml"


@pytest.fixture
def receiving(practice: Site, tmp_path: Path) -> Iterator[Receiving]:
    site = Receiving(practice, tmp_path)
    yield site
    site.db.close()


def _pack(site: Site, study: list[Path], out: Path, **kwargs: Any) -> list[Path]:
    packed = site.packer(PRACTICE, **kwargs).pack(scan(study).files, out)
    return [m.path for m in packed.mails]


# -- one rule for every stage ---------------------------------------------------------------------


def test_an_unexpected_exception_in_decryption_quarantines_that_mail_only(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison, good = receiving.store(*_pack(hospital_site, ct_study[:2], tmp_path / "a"),
                                   *_pack(hospital_site, ct_study[2:4], tmp_path / "b"))
    real_open = unpack.open_mail
    calls = []

    def flaky(path: Path, *args: Any, **kwargs: Any) -> Any:
        calls.append(path)
        if len(calls) == 1:
            (kwargs.get("work") or args[1]).mkdir(parents=True, exist_ok=True)
            raise TypeError("a bug nobody foresaw")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("dicommail.receiver.pipeline.open_mail", flaky)
    receiving.pipeline.run_once()
    status, error = receiving.mail_status(poison)
    assert status == "quarantined" and error is not None and "TypeError" in error
    assert receiving.mail_status(good)[0] == "processed"
    assert [s for _, s in receiving.sets()] == ["delivered"]
    [place] = receiving.spool.quarantine_dir.iterdir()
    reason = json.loads((place / "reason.json").read_text())
    assert "a bug nobody foresaw" in reason["detail"]  # kept privately, never logged
    receiving.assert_no_plaintext()
    receiving.pipeline.run_once()  # the poison mail is not retried
    assert len(calls) == 2


@pytest.mark.parametrize("stage", ["verify", "forward", "report"])
def test_an_unexpected_exception_in_a_later_stage_fails_that_item_only(
    stage: str, hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    first = _pack(hospital_site, ct_study[:2], tmp_path / "a")
    second = _pack(hospital_site, ct_study[2:4], tmp_path / "b")
    receiving.store(*first, *second)
    if stage == "verify":
        real_verify = unpack.verify_set
        seen: list[str] = []

        def verify(parts: Any) -> VerifiedSet:
            seen.append(parts[0].set_id)
            if len(seen) == 1:
                raise RecursionError("maximum recursion depth exceeded")
            return real_verify(parts)

        monkeypatch.setattr("dicommail.receiver.pipeline.verify_set", verify)
    elif stage == "forward":
        real_deliver = receiving.destination.deliver
        delivered: list[str] = []

        def deliver(verified: VerifiedSet, *args: Any) -> None:
            delivered.append(verified.set_id)
            if len(delivered) == 1:
                raise ValueError("pynetdicom said something odd")
            real_deliver(verified, *args)

        monkeypatch.setattr(receiving.destination, "deliver", deliver)
    else:
        class Handler:
            def on_report(self, mail_id: int, received: Any) -> None:
                raise KeyError("no such transfer")

        receiving.pipeline.report_handler = Handler()
        report = tmp_path / "report.eml"
        report.write_bytes(b"From: x@y.test\nContent-Type: multipart/report; report-type=disposition-notification;"
                           b" boundary=R\n\n--R\nContent-Type: text/plain\n\nx\n--R--\n")
        [report_id] = receiving.store(report)
    receiving.pipeline.run_once()
    statuses = [s for _, s in receiving.sets()]
    if stage == "report":
        assert statuses == ["delivered", "delivered"]
        assert receiving.mail_status(report_id)[0] == "quarantined"
    else:
        assert sorted(statuses) == ["delivered", "failed"]
        [error] = [r["error"] for r in receiving.db.query("SELECT error FROM inbound_sets WHERE status = 'failed'")]
        assert "Error" in error
        # The failed set's mails are in the quarantine, still encrypted; its decrypted parts are gone.
        assert list(receiving.spool.parts.iterdir()) == []
    receiving.assert_no_plaintext()


def test_deep_mime_from_anyone_is_quarantined_and_the_receiver_goes_on(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    depth = 3000
    nested = b"".join(b'Content-Type: multipart/mixed; boundary="b%d"\n\n--b%d\n' % (i, i) for i in range(depth))
    hostile = tmp_path / "deep.eml"
    hostile.write_bytes(
        b"From: attacker@evil.test\nX-TELEMEDICINE-SETID: 2.25.1\nMIME-Version: 1.0\n"
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary="E"\n\n'
        b"--E\nContent-Type: application/pgp-encrypted\n\nVersion: 1\n--E\n" + nested + b"x\n"
    )
    [bad] = receiving.store(hostile)
    receiving.store(*_pack(hospital_site, ct_study[:2], tmp_path / "a"))
    receiving.pipeline.run_once()
    assert receiving.mail_status(bad)[0] == "quarantined"
    assert [s for _, s in receiving.sets()] == ["delivered"]
    receiving.assert_no_plaintext()


def test_a_wrong_passphrase_stops_the_round_and_quarantines_nothing(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicommail.errors import PassphraseError

    [mail] = receiving.store(*_pack(hospital_site, ct_study[:2], tmp_path / "a"))

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise PassphraseError("the passphrase of our key is wrong", "fix identity.passphrase_file")

    monkeypatch.setattr("dicommail.receiver.pipeline.open_mail", refuse)
    receiving.pipeline.run_once()
    assert receiving.mail_status(mail) == ("stored", None)  # waits for the admin, not lost
    monkeypatch.undo()
    receiving.pipeline.run_once()
    assert [s for _, s in receiving.sets()] == ["delivered"]


# -- trust ---------------------------------------------------------------------------------------


def test_a_set_belongs_to_its_signer(
    hospital_site: Site, peer_b: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Peer B reusing the hospital's set ID makes a set of its own; neither is dropped or failed."""
    monkeypatch.setattr(h, "new_set_id", lambda _root="": "2.25.4711")
    from_b = _pack(peer_b, ct_study[:2], tmp_path / "b")
    from_hospital = _pack(hospital_site, ct_study[2:5], tmp_path / "h", max_mail_size=1024**2)
    receiving.store(*from_b, from_hospital[0])
    receiving.pipeline.run_once()
    assert receiving.sets() == [("2.25.4711", "delivered"), ("2.25.4711", "collecting")]
    receiving.store(*from_hospital[1:])
    receiving.pipeline.run_once()
    assert receiving.sets() == [("2.25.4711", "delivered"), ("2.25.4711", "delivered")]
    signers = {r["signer"] for r in receiving.db.query("SELECT signer FROM inbound_sets")}
    assert signers == {peer_b.fingerprint, hospital_site.fingerprint}
    folders = sorted(p.name for p in receiving.out.iterdir())
    assert folders == ["2.25.4711", f"2.25.4711.{hospital_site.fingerprint[-16:]}"]
    assert len(list((receiving.out / folders[1]).glob("*.dcm"))) == 3


def test_an_injected_part_does_not_fail_the_genuine_set(
    hospital_site: Site, peer_b: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(h, "new_set_id", lambda _root="": "2.25.815")
    genuine = _pack(hospital_site, ct_study[:4], tmp_path / "h", max_mail_size=1024**2)
    assert len(genuine) >= 2
    injected = _pack(peer_b, ct_study[4:5], tmp_path / "b")
    receiving.store(genuine[0], *injected, *genuine[1:])
    receiving.pipeline.run_once()
    statuses = dict((r["signer"], r["status"]) for r in receiving.db.query("SELECT signer, status FROM inbound_sets"))
    assert statuses[hospital_site.fingerprint] == "delivered"


def test_a_set_signed_for_another_site_is_refused(
    hospital_site: Site, practice: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    """What a re-encrypted set looks like here: signed by a certified peer, but its signed To names someone else."""
    site = Receiving(practice, tmp_path / "r", own_addresses={"reading@elsewhere.test"})
    [mail] = site.store(*_pack(hospital_site, ct_study[:2], tmp_path / "a"))
    site.pipeline.run_once()
    status, error = site.mail_status(mail)
    assert status == "quarantined" and error is not None and error.startswith("misaddressed")
    assert site.sets() == []
    site.assert_no_plaintext()
    site.db.close()


def test_a_foreign_sender_without_protected_headers_is_accepted_with_a_warning(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    data = ct_study[0].read_bytes()
    inner = inner_entity([dicom_part(data, "a.dcm")], {h.SETID: "20261201.2041.6970", h.SETPART: "1",
                                                      h.SETTOTAL: "1"})
    mail = encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / "foreign.eml",
                          f"{h.SETID}: 20261201.2041.6970\r\n")
    receiving.store(mail)
    receiving.pipeline.run_once()
    assert receiving.sets() == [("20261201.2041.6970", "delivered")]
    receipt = json.loads(next(receiving.out.glob("*/dicommail-set.json")).read_text())
    assert any("signed no recipient" in w for w in receipt["warnings"])


def test_a_replayed_single_mail_is_not_delivered_twice(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    """A foreign single mail (no set headers) is named by its signed content, not its Message-ID."""
    inner = inner_entity([dicom_part(ct_study[0].read_bytes(), "a.dcm")])
    original = encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / "single.eml", f"{h.SETID}: x\r\n")
    # The same encrypted body under a new Message-ID (the outer header is not signed).
    replay = tmp_path / "replay.eml"
    replay.write_bytes(original.read_bytes().replace(b"<single@forge.test>", b"<replay-1@forge.test>"))
    receiving.store(original)
    receiving.pipeline.run_once()
    receiving.store(replay)
    receiving.pipeline.run_once()
    assert [s for _, s in receiving.sets()] == ["delivered"]
    assert receiving.db.query("SELECT COUNT(*) AS n FROM forwarded_instances")[0]["n"] == 1


# -- fragments ----------------------------------------------------------------------------------


def _forged_fragment(genuine: Path, out: Path, sender: str | None = None) -> Path:
    """The same fragment header (id, number, total) with a body of garbage."""
    data = genuine.read_bytes()
    head, _, body = data.partition(b"\n\n")
    if sender is not None:
        head = b"\n".join(b"From: " + sender.encode() if line.startswith(b"From:") else line
                          for line in head.split(b"\n"))
    out.write_bytes(head + b"\n\n" + bytes(b ^ 1 if b not in (10, 13) else b for b in body[:len(body) // 2]))
    return out


def test_a_forged_fragment_does_not_block_the_genuine_mail(
    hospital_site: Site, receiving: Receiving, multiframe: Path, tmp_path: Path
) -> None:
    fragments = _pack(hospital_site, [multiframe], tmp_path / "h", max_mail_size=1024**2, compression_level=0)
    assert len(fragments) >= 3
    forged = _forged_fragment(fragments[1], tmp_path / "forged.eml")
    [forged_id] = receiving.store(forged)  # the forgery arrives first
    receiving.store(*fragments)
    receiving.pipeline.run_once()
    assert [s for _, s in receiving.sets()] == ["delivered"]
    assert receiving.mail_status(forged_id)[0] == "quarantined"
    receiving.assert_no_plaintext()


@pytest.mark.parametrize("forgeries_first", [True, False])
def test_every_fragment_forged_still_lets_the_genuine_mail_through(
    hospital_site: Site, receiving: Receiving, multiframe: Path, tmp_path: Path, forgeries_first: bool
) -> None:
    # One forgery per number makes 2^n combinations, more than are tried; resends add copies.
    fragments = _pack(hospital_site, [multiframe], tmp_path / "h", max_mail_size=512 * 1024, compression_level=0)
    assert len(fragments) >= 5
    forged = [_forged_fragment(f, tmp_path / f"forged-{n}.eml") for n, f in enumerate(fragments)]
    copies = [tmp_path / f"copy-{n}.eml" for n in range(len(fragments))]
    for fragment, copy in zip(fragments, copies, strict=True):
        copy.write_bytes(fragment.read_bytes())
    first, second = (forged, fragments) if forgeries_first else (fragments, forged)
    receiving.store(*first, *copies[:2])
    receiving.store(*second, *copies[2:])
    receiving.pipeline.run_once()
    assert [s for _, s in receiving.sets()] == ["delivered"]
    receiving.assert_no_plaintext()


def test_fragments_of_two_senders_with_the_same_id_do_not_mix(
    hospital_site: Site, receiving: Receiving, multiframe: Path, tmp_path: Path
) -> None:
    fragments = _pack(hospital_site, [multiframe], tmp_path / "h", max_mail_size=1024**2, compression_level=0)
    others = [_forged_fragment(f, tmp_path / f"other-{i}.eml", sender="other@sender.test")
              for i, f in enumerate(fragments)]
    other_ids = receiving.store(*others)
    receiving.store(*fragments)
    receiving.pipeline.run_once()
    assert [s for _, s in receiving.sets()] == ["delivered"]
    # The other sender's fragments failed as a group of their own and wait (until they expire).
    assert {receiving.mail_status(i)[0] for i in other_ids} == {"stored"}
    receiving.pipeline.set_timeout = 0
    receiving.pipeline.run_once()
    assert {receiving.mail_status(i)[0] for i in other_ids} == {"quarantined"}
    receiving.assert_no_plaintext()


def test_incomplete_fragments_expire(hospital_site: Site, receiving: Receiving, multiframe: Path,
                                     tmp_path: Path) -> None:
    fragments = _pack(hospital_site, [multiframe], tmp_path / "h", max_mail_size=1024**2, compression_level=0)
    ids = receiving.store(*fragments[:-1])
    receiving.pipeline.run_once()
    assert {receiving.mail_status(i)[0] for i in ids} == {"stored"}
    receiving.pipeline.set_timeout = 0
    receiving.pipeline.run_once()
    assert {receiving.mail_status(i)[0] for i in ids} == {"quarantined"}
    assert "expired" in (receiving.mail_status(ids[0])[1] or "")


# -- crashes and orphans -----------------------------------------------------------------------------


def test_a_restart_sweeps_orphans_left_by_a_crash(practice: Site, tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    (spool.work / "0123abcd").mkdir()
    (spool.work / "0123abcd" / "00001.part").write_bytes(b"DICM decrypted patient data")
    (spool.inbox / ".x.eml.abc123.tmp").write_bytes(b"half a mail")
    loose = spool.parts / ("f" * 32) / "00001"
    loose.mkdir(parents=True)
    (loose / "00001.part").write_bytes(b"decrypted, but never recorded")
    notifying = spool.root / "notifications" / "work"
    notifying.mkdir(parents=True)
    (notifying / ".notification-34.asc.abc.part").write_bytes(b"half of gpg's output")
    site = Receiving(practice, tmp_path)
    site.pipeline.run_once()
    assert list(site.spool.work.iterdir()) == []
    assert list(site.spool.inbox.iterdir()) == []
    assert list(site.spool.parts.iterdir()) == []
    assert list(notifying.iterdir()) == []
    site.db.close()


def test_the_quarantine_expires(practice: Site, tmp_path: Path) -> None:
    site = Receiving(practice, tmp_path, quarantine_days=1)
    junk = tmp_path / "junk.eml"
    junk.write_bytes(b"From: a@b.test\nX-TELEMEDICINE-SETID: 2.25.9\nContent-Type: text/plain\n\nno\n")
    site.store(junk)
    site.pipeline.run_once()
    [place] = site.spool.quarantine_dir.iterdir()
    site.pipeline.run_once()
    assert place.exists()
    old = time.time() - 2 * 86400
    os.utime(place / "reason.json", (old, old))
    site.pipeline.run_once()
    assert not place.exists()
    site.db.close()


class _Crash(BaseException):
    """Stands for kill -9: nothing after it runs, no handler sees it."""


class _RecordingFolder(FolderDestination):
    def __init__(self, folder: Path, holds: bool | None) -> None:
        super().__init__(folder)
        self.holds = holds
        self.asked: list[str] = []
        self.crash_after_sending = False

    def deliver(self, verified: VerifiedSet, done: set[str], on_stored: Callable[[str], None],
                on_sending: Callable[[str], None] | None = None) -> None:
        if self.crash_after_sending and on_sending is not None:
            first = next(f.dicom.sop_instance_uid for f in verified.dicom_files if f.dicom)
            on_sending(first)
            raise _Crash()
        super().deliver(verified, done, on_stored, on_sending)

    def has_instance(self, study_uid: str, series_uid: str | None, sop_instance_uid: str) -> bool | None:
        self.asked.append(sop_instance_uid)
        return self.holds


@pytest.mark.parametrize("holds", [True, False, None])
def test_an_instance_in_flight_during_a_crash_is_checked_before_it_is_sent_again(
    holds: bool | None, hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    destination = _RecordingFolder(receiving.out, holds)
    destination.crash_after_sending = True
    receiving.pipeline.destination = destination
    receiving.store(*_pack(hospital_site, ct_study[:3], tmp_path / "a"))
    with pytest.raises(_Crash):
        receiving.pipeline.run_once()
    [row] = receiving.db.query("SELECT state FROM forwarded_instances")
    assert row["state"] == "sending"
    destination.crash_after_sending = False
    receiving.pipeline.run_once()  # "after the restart"
    assert len(destination.asked) == 1
    assert [s for _, s in receiving.sets()] == ["delivered"]
    states = [r["state"] for r in receiving.db.query("SELECT state FROM forwarded_instances")]
    assert states == ["stored"] * 3


# -- the state database ---------------------------------------------------------------------------------

_V1_RECEIVING = """
CREATE TABLE inbound_mails (id INTEGER PRIMARY KEY, account TEXT NOT NULL, server_uid TEXT NOT NULL, message_id TEXT,
    size INTEGER NOT NULL, spool_path TEXT NOT NULL, kind TEXT NOT NULL, status TEXT NOT NULL,
    server_done INTEGER NOT NULL DEFAULT 0, set_id TEXT, set_part INTEGER, fragment_id TEXT, fragment_number INTEGER,
    fragment_total INTEGER, error TEXT, received_at REAL NOT NULL, processed_at REAL, UNIQUE (account, server_uid));
CREATE TABLE inbound_sets (set_id TEXT PRIMARY KEY, sender TEXT, signer TEXT, set_total INTEGER NOT NULL,
    study_uid TEXT, status TEXT NOT NULL, error TEXT, first_seen_at REAL NOT NULL, updated_at REAL NOT NULL,
    delivered_at REAL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0);
CREATE TABLE inbound_parts (set_id TEXT NOT NULL, set_part INTEGER NOT NULL, inbound_id INTEGER,
    directory TEXT NOT NULL, PRIMARY KEY (set_id, set_part));
CREATE TABLE forwarded_instances (set_id TEXT NOT NULL, sop_instance_uid TEXT NOT NULL, forwarded_at REAL NOT NULL,
    PRIMARY KEY (set_id, sop_instance_uid));
CREATE TABLE set_tracking (set_id TEXT PRIMARY KEY, verified_at REAL, missing_reported_at REAL);
CREATE TABLE notifications (id INTEGER PRIMARY KEY, event TEXT NOT NULL UNIQUE, set_id TEXT NOT NULL,
    set_part INTEGER, set_total INTEGER, scope TEXT NOT NULL, outcome TEXT NOT NULL, reason TEXT, missing_parts TEXT,
    report TEXT, recipient TEXT, method TEXT, original_message_id TEXT, message_id TEXT NOT NULL, path TEXT,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT, created_at REAL NOT NULL, sent_at REAL);
INSERT INTO inbound_sets VALUES ('2.25.1', 'h@h.test', 'F1', 2, '1.2', 'complete', NULL, 1, 1, NULL, 0, 0);
INSERT INTO inbound_parts VALUES ('2.25.1', 1, 1, '/spool/parts/2.25.1/00001');
INSERT INTO inbound_parts VALUES ('2.25.1', 2, 2, '/spool/parts/2.25.1/00002');
INSERT INTO forwarded_instances VALUES ('2.25.1', '1.2.3', 5);
INSERT INTO set_tracking VALUES ('2.25.1', 4, NULL);
INSERT INTO inbound_mails (id, account, server_uid, size, spool_path, kind, status, set_id, set_part, received_at)
    VALUES (1, 'a', '1', 1, 'x', 'dicom-mail', 'processed', '2.25.1', 1, 1);
PRAGMA user_version = 1;
"""


def test_a_schema_1_database_is_migrated(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "state.db") as raw:
        raw.executescript(_V1_RECEIVING)
    db = Database(tmp_path / "state.db")
    assert db.query("PRAGMA user_version")[0][0] == 2
    [row] = db.query("SELECT id, set_id, signer, status FROM inbound_sets")
    assert (row["set_id"], row["signer"], row["status"]) == ("2.25.1", "F1", "complete")
    assert [r["set_part"] for r in db.query("SELECT set_part FROM inbound_parts WHERE set_ref = ?", (row["id"],))] == [
        1, 2]
    assert db.query("SELECT set_ref, state FROM forwarded_instances")[0]["state"] == "stored"
    assert db.query("SELECT set_ref FROM set_tracking")[0]["set_ref"] == row["id"]
    assert db.query("SELECT set_ref FROM inbound_mails")[0]["set_ref"] == row["id"]
    db.close()
    Database(tmp_path / "state.db").close()  # opening again changes nothing


def test_a_hostile_set_id_never_names_a_path(hospital_site: Site, tmp_path: Path) -> None:
    del hospital_site
    assert HOSPITAL  # the set key is a hash: no set ID, however odd, reaches the file system
    from dicommail.receiver.pipeline import set_key

    for odd in ("..", "a/../../b", "2.25.1"):
        key = set_key("F" * 40, odd)
        assert len(key) == 32 and key.isalnum()


def test_an_unexpected_failure_while_fetching_does_not_end_the_daemon(practice: Site, tmp_path: Path) -> None:
    import asyncio

    from dicommail.config import parse_config
    from dicommail.receiver.daemon import Receiver

    class Broken:
        async def fetch(self) -> object:
            raise TypeError("an IMAP answer nobody foresaw")

        async def wait_for_mail(self, timeout: float) -> bool:
            return False

        async def close(self) -> None:
            return None

    config = parse_config({"identity": {"address": PRACTICE}}, tmp_path)
    db = Database(config.state_db)
    receiver = Receiver(config, Broken(), FolderDestination(tmp_path / "out"), db, practice.keyring)
    report = asyncio.run(receiver.cycle())
    assert report.fetch_error is not None and "TypeError" in report.fetch_error.message
    assert receiver.pipeline.own_addresses == {PRACTICE}
    db.close()


def test_acknowledgements_go_to_a_certified_user_id_only(
    practice: Site, peer_b: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    """A peer that makes another site's address its primary user ID after we certified its key gains nothing."""
    from dicommail.config import parse_config
    from dicommail.receiver.notify import Notifier

    fingerprint = peer_b.fingerprint
    for args in (["--quick-add-uid", fingerprint, "Victim <victim@hospital.test>"],
                 ["--quick-set-primary-uid", fingerprint, "Victim <victim@hospital.test>"]):
        assert peer_b.keyring.run(["--batch", "--pinentry-mode", "loopback", "--passphrase", "", *args]).returncode == 0
    import_keys(practice.keyring, export_key(peer_b.keyring, fingerprint).encode())
    key = find_key(practice.keyring, fingerprint)
    assert "victim@hospital.test" in key.user_id
    assert key.certified_user_ids == ("Peer B (TEST ONLY) <imaging@peer-b.test>",)
    config = parse_config({"identity": {"address": PRACTICE}}, tmp_path)
    site = Receiving(practice, tmp_path / "r")
    site.pipeline.notifier = Notifier(site.db, config, practice.keyring)
    site.store(*_pack(peer_b, ct_study[:2], tmp_path / "b"))
    site.pipeline.run_once()
    assert [s for _, s in site.sets()] == ["delivered"]
    recipients = {r["recipient"] for r in site.db.query("SELECT recipient FROM notifications")}
    assert recipients == {"imaging@peer-b.test"}
    site.db.close()


@pytest.mark.parametrize("case", ["manifest-types", "manifest-nesting", "dicom-nested", "dicom-length", "dicom-bomb"])
def test_hostile_content_from_a_certified_peer_leaves_no_plaintext(
    case: str, hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    """Each used to leave a decrypted DICOM file in spool/work/<uuid>/ or take the receiver's memory."""
    import hashlib

    from tests.wire import test_hostile_input as hostile

    data = hostile.part10(hostile.identifying())
    manifest = None
    if case == "manifest-types":
        entry = {"content_id": ["IM1"], "name": "IM1.dcm", "kind": "dicom", "size": str(len(data)),
                 "sha256": hashlib.sha256(data).hexdigest(), "sop_instance_uid": hostile.INSTANCE}
        manifest = json.dumps(hostile._manifest(set_id="2.25.77", set_part=1, set_total=1, files=[entry])).encode()
    elif case == "manifest-nesting":
        manifest = b"[" * 100_000
    elif case == "dicom-nested":
        data = hostile.part10(hostile.identifying() + hostile.nested_sequences(20_000, tag=0x00400275))
    elif case == "dicom-length":
        data = hostile.part10(hostile.identifying() + hostile.element(0x7FE00010, "OB", bytes(16), length=0xFFFFFFF0))
    else:
        data = hostile._bomb(1100, level=1)
    parts = [dicom_part(data, "IM1.dcm")]
    if manifest is not None:
        parts.append(f"Content-Type: {h.MANIFEST_TYPE}\r\n\r\n".encode() + manifest + b"\r\n")
    inner = inner_entity(parts, {h.SETID: "2.25.77", h.SETPART: "1", h.SETTOTAL: "1"})
    mail = encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / "hostile.eml", f"{h.SETID}: 2.25.77\r\n")
    [bad] = receiving.store(mail)
    receiving.store(*_pack(hospital_site, ct_study[:2], tmp_path / "a"))
    receiving.pipeline.run_once()
    status, error = receiving.mail_status(bad)
    assert status == "quarantined" and error is not None and error.split(":")[0] in ("malformed", "not-dicom")
    assert [s for _, s in receiving.sets()] == ["delivered"]
    receiving.assert_no_plaintext()


def test_a_passphrase_encrypted_mail_is_refused_and_blocks_nothing(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    """gpg asks for a passphrase for a symmetric packet: that is the mail's fault, not this site's key's.

    Counted as a wrong passphrase file, it would stop every round at this
    mail, for ever, and nothing after it would be processed.
    """
    import re
    import subprocess

    [genuine] = _pack(hospital_site, ct_study[:1], tmp_path / "a")
    symmetric = subprocess.run(
        ["gpg", "--homedir", str(tmp_path), "--batch", "--pinentry-mode", "loopback", "--passphrase", "sesame",
         "--symmetric", "--armor"], input=b"Content-Type: text/plain\r\n\r\nhello\r\n", capture_output=True, check=True,
    ).stdout
    data = genuine.read_bytes()
    forged = re.sub(rb"-----BEGIN PGP MESSAGE-----.*?-----END PGP MESSAGE-----\r?\n",
                    lambda _m: symmetric.replace(b"\n", b"\r\n"), data, flags=re.S)
    assert forged != data
    (tmp_path / "symmetric.eml").write_bytes(forged)
    [bad] = receiving.store(tmp_path / "symmetric.eml")
    [good] = receiving.store(*_pack(hospital_site, ct_study[1:3], tmp_path / "b"))
    receiving.pipeline.run_once()
    status, error = receiving.mail_status(bad)
    assert status == "quarantined" and error is not None and "passphrase" in error.lower()
    assert receiving.mail_status(good)[0] == "processed"
    assert [s for _, s in receiving.sets()] == ["delivered"]
    receiving.assert_no_plaintext()
