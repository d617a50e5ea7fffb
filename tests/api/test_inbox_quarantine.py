"""What the receiving site holds: ``inbox`` and ``quarantine``, from the real pipeline (real gpg, no servers)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import dicommail
from dicommail.cli import cli
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import certify, import_keys, own_key
from dicommail.dicom import scan
from dicommail.errors import DestinationError, InputError, StateError
from dicommail.receiver.destinations import FolderDestination
from dicommail.receiver.inbox import store_fetched
from dicommail.receiver.notify import Notifier
from dicommail.receiver.pipeline import Pipeline
from dicommail.receiver.spool import Spool
from dicommail.samples import write_ct_study
from dicommail.site.tracking import QuarantineChange, ReceivedSet, ReceivedSetDetail
from dicommail.store.db import Database
from dicommail.wire.pack import PackedSet, Packer, PackOptions
from tests.conftest import HOSPITAL, KEYS_DIR, PRACTICE

ACCOUNT = "imap://practice@localhost:993/INBOX"


class _Down:
    """A PACS that is down: every C-STORE fails, temporarily."""

    def deliver(self, verified: Any, done: set[str], on_stored: Callable[[str], None],
                on_sending: Callable[[str], None] | None = None) -> None:
        raise DestinationError("PACS@127.0.0.1:11112 refused the association", "is the PACS running?")

    def has_instance(self, study_uid: str, series_uid: str | None, sop_instance_uid: str) -> bool | None:
        return None


class Practice:
    """A receiving home (practice) and what its receiver does, one pipeline run at a time."""

    def __init__(self, home: Path, pacs: Path) -> None:
        self.home = home
        self.pacs = pacs
        self.site = dicommail.Site.open(home)
        self._uid = 0

    def store(self, *mails: Path) -> None:
        with self._db() as db:
            for mail in mails:
                self._uid += 1
                store_fetched(db, Spool(self.site.config.spool), ACCOUNT, f"1:{self._uid}", mail.read_bytes())

    def run(self, destination: Any = None) -> None:
        config = self.site.config
        keyring = Keyring(config.gnupg_home)
        try:
            with self._db() as db:
                Pipeline(db, Spool(config.spool), keyring, destination or FolderDestination(self.pacs),
                         max_output=1024**3, set_timeout=3600, retry_interval=60,
                         notifier=Notifier(db, config, keyring), own_addresses={PRACTICE}).run_once()
        finally:
            keyring.close()

    def _db(self) -> Any:
        import contextlib

        @contextlib.contextmanager
        def opened() -> Iterator[Database]:
            db = Database(self.site.config.state_db)
            try:
                yield db
            finally:
                db.close()

        return opened()

    def cli(self, *args: str) -> Result:
        return CliRunner(env={"COLUMNS": "80"}).invoke(cli, ["--home", str(self.home), *args])


def _practice_home(home: Path, *, certified: bool) -> None:
    (home / "dicommail.toml").write_text(f'[identity]\naddress = "{PRACTICE}"\n', encoding="utf-8")
    keyring = Keyring(home / "gnupg")
    try:
        own = next(k for k in import_keys(keyring, (KEYS_DIR / "practice.sec.asc").read_bytes(), allow_secret=True)
                   if k.has_secret)
        certify(keyring, own.fingerprint, signer=own.fingerprint)
        (peer,) = import_keys(keyring, (KEYS_DIR / "hospital.pub.asc").read_bytes())
        if certified:
            certify(keyring, peer.fingerprint, signer=own.fingerprint)
    finally:
        keyring.close()


@pytest.fixture
def practice_home(short_tmp: Path, tmp_path: Path) -> Practice:
    _practice_home(short_tmp, certified=True)
    return Practice(short_tmp, tmp_path / "pacs")


@pytest.fixture
def uncertified_home(short_tmp: Path, tmp_path: Path) -> Practice:
    """The practice before anyone certified the hospital's key: its mails are quarantined."""
    _practice_home(short_tmp, certified=False)
    return Practice(short_tmp, tmp_path / "pacs")


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_ct_study(tmp_path_factory.mktemp("ct"), 6, 128, charset="ISO_IR 100", patient_name="Müller^Jürgen")


def _pack(keyring: Keyring, files: list[Path], out: Path, max_mail_size: int = 10 * 1024**2) -> PackedSet:
    options = PackOptions(sender=HOSPITAL, recipient=PRACTICE, signer=own_key(keyring).fingerprint,
                          max_mail_size=max_mail_size)
    return Packer(keyring, options).pack(scan(files).files, out)


def _assert_fits(result: Result, *keep: str) -> None:
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines and all(len(line) <= 80 for line in lines), result.stdout
    for text in keep:  # never cut, never broken over two lines
        assert any(text in line for line in lines), (text, result.stdout)


def test_an_incomplete_set_lists_its_missing_parts(
    practice_home: Practice, hospital: Keyring, study: list[Path], tmp_path: Path
) -> None:
    packed = _pack(hospital, study, tmp_path / "out", max_mail_size=48 * 1024)
    parts = sorted({m.set_part for m in packed.mails})
    assert len(parts) >= 4
    practice_home.store(*(m.path for m in packed.mails if m.set_part not in (2, 3)))
    practice_home.run()

    [one] = practice_home.site.received_sets()
    assert isinstance(one, ReceivedSet)
    assert (one.state, one.status, one.missing_parts) == ("incomplete", "collecting", (2, 3))
    assert one.sender == HOSPITAL and one.mails == len(packed.mails) - 2
    assert one.bytes == sum(m.stat().st_size for m in (practice_home.site.config.spool / "inbox").iterdir())
    data = one.to_json()
    assert data["state"] == "incomplete" and data["missing_parts"] == [2, 3] and data["next_attempt_at"] is None

    result = practice_home.cli("inbox")
    _assert_fits(result, packed.set_id, f"incomplete {one.parts_received}/{one.set_total}", "missing part(s): 2-3")
    shown = practice_home.cli("inbox", "--json")
    assert json.loads(shown.stdout) == {"ok": True, "sets": [json.loads(json.dumps(data))]}
    assert "Müller" not in shown.stdout


def test_a_set_waiting_for_the_pacs_says_why(
    practice_home: Practice, hospital: Keyring, study: list[Path], tmp_path: Path
) -> None:
    packed = _pack(hospital, study[:3], tmp_path / "out")
    practice_home.store(*(m.path for m in packed.mails))
    practice_home.run(_Down())

    [one] = practice_home.site.received_sets()
    assert (one.state, one.attempts, one.instances_forwarded, one.instances_total) == ("waiting", 1, 0, 3)
    assert one.error == "destination: PACS@127.0.0.1:11112 refused the association"
    assert one.next_attempt_at is not None and one.next_attempt_at > one.updated_at
    assert one.to_json()["next_attempt_at"] == one.next_attempt_at.isoformat()

    listed = practice_home.cli("inbox")
    _assert_fits(listed, packed.set_id, "waiting for the PACS", "refused the association")
    assert "attempt 1, next try" in listed.stdout
    [detail] = practice_home.site.received_set(packed.set_id)
    assert detail.timeline[-1].event == "forwarding failed" and "attempt 1" in detail.timeline[-1].detail
    timeline = practice_home.cli("inbox", packed.set_id)
    _assert_fits(timeline, packed.set_id, "forwarding failed", "refused the association")


def test_a_delivered_sets_timeline(
    practice_home: Practice, hospital: Keyring, study: list[Path], tmp_path: Path
) -> None:
    packed = _pack(hospital, study, tmp_path / "out", max_mail_size=96 * 1024)
    practice_home.store(*(m.path for m in packed.mails))
    practice_home.run()

    [detail] = practice_home.site.received_set(packed.set_id)
    assert isinstance(detail, ReceivedSetDetail)
    one = detail.set
    assert (one.state, one.instances_forwarded, one.missing_parts) == ("delivered", 6, ())
    events = [e.event for e in detail.timeline]
    assert events[0] == "first seen" and events[-1] == "delivered"
    assert events.count("part verified") == one.set_total
    assert {"complete", "forwarding", "forwarded"} <= set(events)
    assert [e.at for e in detail.timeline] == sorted(e.at for e in detail.timeline)
    notes = {n.event: n for n in detail.notifications}
    assert "set final" in notes and notes["set final"].outcome == "success"
    assert all(f"part {n} verified" in notes for n in range(1, one.set_total + 1))
    assert {n.status for n in detail.notifications} == {"pending"}  # nothing sent offline
    assert practice_home.site.received_set(one.id) == [detail]  # the record number names it too
    with pytest.raises(StateError, match="no received set"):
        practice_home.site.received_set("2.25.404")

    data: dict[str, Any] = detail.to_json()
    assert data["state"] == "delivered" and str(data["delivered_at"]).endswith("+00:00")
    assert all(str(e["at"]).endswith("+00:00") for e in data["timeline"])
    assert data["notifications"][0]["sent_at"] is None
    shown = practice_home.cli("inbox", packed.set_id, "--json")
    assert json.loads(shown.stdout) == {"ok": True, "sets": [json.loads(json.dumps(data))]}
    assert "Müller" not in shown.stdout

    text = practice_home.cli("inbox", packed.set_id)
    _assert_fits(text, f"set {packed.set_id}: delivered", one.signer, "first seen", "set final: success")
    missing = practice_home.cli("inbox", "2.25.404")
    assert missing.exit_code == 1 and "no received set" in missing.output


def test_a_set_id_of_two_signers_shows_both(
    practice_home: Practice, hospital: Keyring, study: list[Path], tmp_path: Path
) -> None:
    packed = _pack(hospital, study[:2], tmp_path / "out")
    practice_home.store(*(m.path for m in packed.mails))
    practice_home.run()
    # A second signer's set of the same ID (as the pipeline records one), without parts.
    with practice_home._db() as db, db.transaction() as conn:
        conn.execute("INSERT INTO inbound_sets (set_id, signer, sender, set_total, status, first_seen_at, "
                     "updated_at) VALUES (?, ?, 'b@peer-b.test', 2, 'collecting', 1, 1)", (packed.set_id, "B" * 40))
    details = practice_home.site.received_set(packed.set_id)
    assert [d.set.signer == "B" * 40 for d in details] == [True, False]  # oldest first: B's in 1970
    text = practice_home.cli("inbox", packed.set_id)
    _assert_fits(text, "B" * 40, own_key(hospital).fingerprint, "missing part(s): 1-2")
    assert text.stdout.count(f"set {packed.set_id}:") == 2


def test_an_uncertified_signers_mail_is_retried_after_keys_certify(
    uncertified_home: Practice, hospital: Keyring, study: list[Path], tmp_path: Path
) -> None:
    home = uncertified_home
    packed = _pack(hospital, study[:2], tmp_path / "out")
    home.store(*(m.path for m in packed.mails))
    home.run()
    assert home.site.received_sets() == []
    [item] = home.site.quarantine()
    assert item.name.endswith("-mail-1") and item.hint

    listed = home.cli("quarantine", "list")
    _assert_fits(listed, item.name, item.code)
    shown = home.cli("quarantine", "show", "mail-1")  # the end of the name will do
    _assert_fits(shown, item.name, item.code, "hint:")
    assert json.loads(home.cli("quarantine", "show", item.name, "--json").stdout)["item"] == item.to_json()
    unknown = home.cli("quarantine", "retry", "mail-99", "--json")
    assert unknown.exit_code == 1 and json.loads(unknown.stdout)["error"]["code"] == "state"

    # Retrying before the key is certified: back in the quarantine, with the same reason.
    assert home.site.retry_quarantined(item.name).mails_requeued == 1
    home.run()
    [again] = home.site.quarantine()
    assert again.code == item.code and again.path.is_dir() and home.site.received_sets() == []

    home.site.keys.certify(own_key(hospital).fingerprint)
    retried = home.cli("quarantine", "retry", again.name, "--json")
    assert retried.exit_code == 0, retried.output
    change = json.loads(retried.stdout)
    assert change["action"] == "retry" and change["mails_requeued"] == 1 and change["items"][0]["name"] == again.name
    assert home.site.quarantine() == []
    home.run()
    [one] = home.site.received_sets()
    assert (one.set_id, one.state) == (packed.set_id, "delivered")
    assert one.instances_forwarded == 2 and one.sender == HOSPITAL


def test_a_failed_set_is_retried_unless_something_was_forwarded(
    practice_home: Practice, hospital: Keyring, study: list[Path], tmp_path: Path
) -> None:
    packed = _pack(hospital, study[:2], tmp_path / "out")
    practice_home.store(*(m.path for m in packed.mails))

    class Refusing(_Down):
        def deliver(self, *args: Any, **kwargs: Any) -> None:
            raise DestinationError("the PACS refused the study", temporary=False)

    practice_home.run(Refusing())
    [failed] = practice_home.site.received_sets()
    assert failed.state == "failed" and "refused the study" in (failed.error or "")
    [item] = practice_home.site.quarantine()
    assert item.set_id == packed.set_id and "-set-" in item.name

    change = practice_home.site.retry_quarantined(item.name)
    assert isinstance(change, QuarantineChange) and (change.sets_reset, change.mails_requeued) == (1, 1)
    assert practice_home.site.received_sets() == []
    practice_home.run()
    [one] = practice_home.site.received_sets()
    assert one.state == "delivered"
    [detail] = practice_home.site.received_set(packed.set_id)
    assert [n.event for n in detail.notifications].count("set final") == 1  # the new set's own final report

    # A set some of whose instances reached the PACS is not retried: they would be sent twice.
    with practice_home._db() as db, db.transaction() as conn:
        conn.execute("UPDATE inbound_sets SET status = 'failed' WHERE id = ?", (one.id,))
    spool = Spool(practice_home.site.config.spool)
    error = DestinationError("refused", temporary=False)
    spool.quarantine_files([], error, f"set-{one.id}", {"set_id": one.set_id, "set_ref": one.id})
    [partly] = practice_home.site.quarantine()
    with pytest.raises(StateError, match="forwarded already"):
        practice_home.site.retry_quarantined(partly.name)
    assert practice_home.site.quarantine() == [partly]


def test_purge(uncertified_home: Practice, hospital: Keyring, study: list[Path], tmp_path: Path) -> None:
    home = uncertified_home
    for number in range(3):
        home.store(*(m.path for m in _pack(hospital, study[number:number + 1], tmp_path / str(number)).mails))
    home.run()
    items = home.site.quarantine()
    assert len(items) == 3
    old = items[-1]
    reason = json.loads((old.path / "reason.json").read_text())
    reason["quarantined_at"] = "2020-01-02T03:04:05Z"
    (old.path / "reason.json").write_text(json.dumps(reason))

    refused = home.cli("quarantine", "purge")  # no terminal, no --yes
    assert refused.exit_code == 1 and "not confirmed" in refused.output and len(home.site.quarantine()) == 3
    with pytest.raises(InputError, match="not confirmed"):
        home.site.purge_quarantine(confirm=lambda items: False)
    both = home.cli("quarantine", "purge", "x", "--older-than", "3")
    assert both.exit_code == 2

    aged = home.cli("quarantine", "purge", "--older-than", "30", "--yes", "--json")
    assert aged.exit_code == 0, aged.output
    assert [i["name"] for i in json.loads(aged.stdout)["items"]] == [old.name]
    assert home.site.purge_quarantine(older_than=timedelta(days=30)).items == ()
    newest = home.site.quarantine()[0]
    one = home.cli("quarantine", "purge", newest.name, "--yes")
    assert one.exit_code == 0 and "removed 1 item(s)" in one.output
    assert [i.name for i in home.site.quarantine()] == [items[1].name]
    rest = home.site.purge_quarantine(confirm=lambda items: True)
    assert [i.name for i in rest.items] == [items[1].name] and home.site.quarantine() == []
    assert home.cli("quarantine", "list", "--json").stdout.strip() == '{\n  "ok": true,\n  "items": []\n}'
    assert not [p for p in (home.site.config.spool / "quarantine").iterdir() if not p.name.startswith(".")]
    assert os.listdir(home.site.config.spool / "inbox")  # the original mails stay where they were


def test_nothing_received(short_tmp: Path) -> None:
    (short_tmp / "dicommail.toml").touch()
    runner = CliRunner()
    for args in (["inbox"], ["quarantine", "list"]):
        result = runner.invoke(cli, ["--home", str(short_tmp), *args])
        assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(runner.invoke(cli, ["--home", str(short_tmp), "inbox", "--json"]).stdout) == {
        "ok": True, "sets": []}
