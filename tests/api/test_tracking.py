"""The tracking part of the public API: transfers, received sets, the quarantine, check and echo."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

import dicommail
from dicommail.cli import cli
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.dicom import scan
from dicommail.errors import DestinationError, InputError, UnexpectedError
from dicommail.receiver.destinations import FolderDestination
from dicommail.receiver.inbox import store_fetched
from dicommail.receiver.pipeline import Pipeline
from dicommail.receiver.spool import Spool
from dicommail.samples import write_ct_study
from dicommail.site.tracking import (
    EchoResult,
    InvalidArgumentError,
    QuarantinedItem,
    ReceivedSet,
    TransferDetail,
    TransferView,
)
from dicommail.store.db import Database, StateError
from dicommail.wire.pack import PackedSet, Packer, PackOptions
from testbed import Pacs
from testbed.ports import free_ports
from tests.conftest import HOSPITAL, PRACTICE

SET_ID = "2.25.987654321"
OTHER_ID = "2.25.123123123"
ACCOUNT = "imap://practice@localhost:993/INBOX"


# -- sent transfers (an outbox filled by hand, as the sender leaves it) ---------------------------------


def _add_transfer(home: Path, ident: int, set_id: str, status: str, *, at: float, parts: int = 3) -> None:
    db = Database(home / "state.db")
    try:
        with db.transaction() as conn:
            conn.execute(
                "INSERT INTO transfers (id, set_id, recipient, study_uid, files, bytes, set_total, status, "
                "created_at, updated_at, first_sent_at, sent_at) VALUES (?, ?, ?, '1.2.3', 6, 6000, ?, ?, ?, ?, ?, ?)",
                (ident, set_id, PRACTICE, parts, status, at, at, at, at),
            )
            conn.execute(
                "INSERT INTO transfer_tracking (transfer_id, images, patient_name, study_description) "
                "VALUES (?, 6, 'Doe^Jane', 'CT head')",
                (ident,),
            )
            for part in range(1, parts + 1):
                mail = home / f"t{ident}-part{part}.eml"
                mail.write_text("x")
                conn.execute(
                    "INSERT INTO outbound_mails (transfer_id, set_part, message_id, path, size, status, sent_at) "
                    "VALUES (?, ?, ?, ?, 1, 'sent', ?)",
                    (ident, part, f"<t{ident}p{part}@hospital.test>", str(mail), at),
                )
    finally:
        db.close()


@pytest.fixture
def sender_home(tmp_path: Path) -> Path:
    """A home with one transfer waiting for its notifications and one delivered a day ago."""
    (tmp_path / "dicommail.toml").touch()
    now = time.time()
    _add_transfer(tmp_path, 1, SET_ID, "sent", at=now)
    _add_transfer(tmp_path, 2, OTHER_ID, "delivered", at=now - 86400)
    return tmp_path


def test_transfers_lists_and_filters(sender_home: Path) -> None:
    site = dicommail.Site.open(sender_home)
    views = site.transfers()
    assert [(v.id, v.status) for v in views] == [(2, "delivered"), (1, "sent")]  # oldest first, as `status`
    assert [v.id for v in site.transfers(state="waiting")] == [1]
    assert [v.id for v in site.transfers(state="active")] == [1]
    assert [v.id for v in site.transfers(state="done")] == [2]
    assert site.transfers(state="failed") == []
    assert [v.id for v in site.transfers(since=datetime.now() - timedelta(hours=1))] == [1]
    assert site.transfers(since=datetime.now(UTC) + timedelta(hours=1)) == []
    with pytest.raises(InputError, match="not a transfer state"):
        site.transfers(state="lost")
    # The CLI prints what the views say.
    result = CliRunner().invoke(cli, ["--home", str(sender_home), "status", "--json", "--waiting"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"ok": True, "transfers": [views[1].to_json()]}


def test_transfers_expire_overdue_ones_first(tmp_path: Path) -> None:
    (tmp_path / "dicommail.toml").write_text("[tracking]\nack_timeout = 60\n", encoding="utf-8")
    _add_transfer(tmp_path, 1, SET_ID, "sent", at=time.time() - 3600)
    site = dicommail.Site.open(tmp_path)
    [view] = site.transfers()
    assert view.status == "expired" and view.reason == "no-final-notification"
    assert "within 60 s" in (view.error or "")
    assert [v.id for v in site.transfers(state="failed")] == [1]


def test_transfer_detail_is_what_status_ident_prints(sender_home: Path) -> None:
    site = dicommail.Site.open(sender_home)
    detail = site.transfer(SET_ID)
    assert isinstance(detail, TransferDetail)
    assert site.transfer(1) == site.transfer("1") == detail
    assert detail.transfer.set_id == SET_ID and detail.final_report is None
    assert detail.timeline[0].event == "queued"
    assert [e.event for e in detail.timeline].count("mail sent") == 3
    assert detail.timeline == tuple(sorted(detail.timeline, key=lambda e: e.at))
    data = detail.to_json()
    assert "patient_name" not in data["transfer"]  # type: ignore[operator]
    assert detail.to_json(show_patient=True)["transfer"]["patient_name"] == "Doe^Jane"  # type: ignore[index]
    for extra in ([], ["--show-patient"]):
        result = CliRunner().invoke(cli, ["--home", str(sender_home), "status", SET_ID, "--json", *extra])
        assert result.exit_code == 0, result.output
        assert json.loads(result.output) == json.loads(json.dumps(detail.to_json(bool(extra))))


def test_an_unknown_transfer_is_a_state_error(sender_home: Path) -> None:
    site = dicommail.Site.open(sender_home)
    for call in (site.transfer, site.retry, site.cancel, site.delete):
        with pytest.raises(StateError) as unknown:
            call("2.25.404")
        assert isinstance(unknown.value, dicommail.DicommailError)
        assert unknown.value.code == "state" and "no transfer" in unknown.value.message and unknown.value.hint
    with pytest.raises(StateError):
        site.transfer(99)


def test_cancel_retry_delete(sender_home: Path) -> None:
    site = dicommail.Site.open(sender_home)
    asked: list[str] = []

    def refuse(view: TransferView) -> bool:
        asked.append(view.status)
        return False

    with pytest.raises(InputError, match="not confirmed"):
        site.cancel(SET_ID, confirm=refuse)
    assert asked == ["sent"] and site.transfer(SET_ID).transfer.status == "sent"  # nothing changed

    change = site.cancel(SET_ID, confirm=lambda view: True)
    assert (change.action, change.transfer.status) == ("cancel", "sent")  # the transfer as it was
    assert site.transfer(SET_ID).transfer.status == "cancelled"
    with pytest.raises(StateError, match="only active"):
        site.cancel(SET_ID)
    with pytest.raises(StateError, match="only failed, expired or cancelled"):
        site.retry(OTHER_ID)  # delivered

    retried = site.retry(1)
    assert retried.mails_queued == 3 and retried.transfer.status == "cancelled"
    assert site.transfer(SET_ID).transfer.status == "sending"
    with pytest.raises(StateError, match="still sending"):
        site.delete(SET_ID)

    deleted = site.delete(OTHER_ID)
    assert deleted.files_removed == 3 and deleted.action == "delete"
    assert [v.set_id for v in site.transfers()] == [SET_ID]
    assert not list(sender_home.glob("t2-part*.eml"))


def test_cli_confirmation_stays_in_the_cli(sender_home: Path) -> None:
    home = ["--home", str(sender_home)]
    runner = CliRunner()
    refused = runner.invoke(cli, [*home, "transfers", "cancel", SET_ID])  # no terminal, no --yes
    assert refused.exit_code == 1 and "not confirmed" in refused.output and "--yes" in refused.output
    assert dicommail.Site.open(sender_home).transfer(SET_ID).transfer.status == "sent"
    done = runner.invoke(cli, [*home, "transfers", "cancel", SET_ID, "--yes"])
    assert done.exit_code == 0 and f"set {SET_ID} cancelled" in done.output
    again = runner.invoke(cli, [*home, "transfers", "retry", SET_ID, "--yes"])
    assert again.exit_code == 0 and f"3 mail(s) of set {SET_ID} queued again" in again.output
    deleted = runner.invoke(cli, [*home, "transfers", "delete", OTHER_ID, "--yes"])
    assert deleted.exit_code == 0 and "(3 file(s) removed)" in deleted.output


# -- the receiving side: sets and the quarantine, from the real pipeline ---------------------------------


def _pack(keyring: Keyring, files: list[Path], out: Path, max_mail_size: int = 10 * 1024**2) -> PackedSet:
    options = PackOptions(sender=HOSPITAL, recipient=PRACTICE, signer=own_key(keyring).fingerprint,
                          max_mail_size=max_mail_size)
    return Packer(keyring, options).pack(scan(files).files, out)


@pytest.fixture
def receiver_home(short_tmp: Path, hospital: Keyring, practice: Keyring, tmp_path: Path) -> Iterator[Path]:
    """The practice's home after one set was delivered, one is still collecting and one mail was tampered with."""
    (short_tmp / "dicommail.toml").touch()
    db = Database(short_tmp / "state.db")
    spool = Spool(short_tmp / "spool")
    pipeline = Pipeline(db, spool, practice, FolderDestination(tmp_path / "pacs"), max_output=1024**3,
                        set_timeout=3600, retry_interval=1)
    study = write_ct_study(tmp_path / "ct", 6, 128, charset="ISO_IR 100", patient_name="Müller^Jürgen")
    delivered = _pack(hospital, study[:2], tmp_path / "a")
    collecting = _pack(hospital, study[2:], tmp_path / "b", max_mail_size=64 * 1024)
    assert len(collecting.mails) >= 2
    mails = [m.path.read_bytes() for m in delivered.mails] + [collecting.mails[0].path.read_bytes()]
    broken = bytearray(collecting.mails[1].path.read_bytes())
    middle = broken.index(b"\n", len(broken) // 2) + 3
    broken[middle] = ord("A") if broken[middle] != ord("A") else ord("B")
    for number, data in enumerate([*mails, bytes(broken)]):
        store_fetched(db, spool, ACCOUNT, f"1:{number}", data)
    pipeline.run_once()
    db.close()
    (short_tmp / "sets.json").write_text(json.dumps({"delivered": delivered.set_id, "collecting": collecting.set_id}))
    yield short_tmp


def test_received_sets(receiver_home: Path) -> None:
    ids = json.loads((receiver_home / "sets.json").read_text())
    site = dicommail.Site.open(receiver_home)
    sets = site.received_sets()
    assert all(isinstance(s, ReceivedSet) for s in sets)
    by_id = {s.set_id: s for s in sets}
    assert set(by_id) == {ids["delivered"], ids["collecting"]}
    done, waiting = by_id[ids["delivered"]], by_id[ids["collecting"]]
    assert (done.status, done.parts_received, done.instances_forwarded) == ("delivered", done.set_total, 2)
    assert done.delivered_at is not None and done.delivered_at.tzinfo is not None
    assert (waiting.status, waiting.parts_received, waiting.instances_forwarded) == ("collecting", 1, 0)
    assert waiting.delivered_at is None and waiting.set_total >= 2 and waiting.error is None
    assert done.sender == HOSPITAL and done.signer == waiting.signer and len(done.signer) == 40
    # Newest first.
    assert [s.first_seen_at for s in sets] == sorted((s.first_seen_at for s in sets), reverse=True)
    data = done.to_json()
    assert data["delivered_at"] == done.delivered_at.isoformat() and str(data["first_seen_at"]).endswith("+00:00")
    assert waiting.to_json()["delivered_at"] is None
    assert json.loads(json.dumps(data)) == data  # plain JSON types only
    assert "Müller" not in json.dumps([s.to_json() for s in sets])


def test_quarantine(receiver_home: Path) -> None:
    ids = json.loads((receiver_home / "sets.json").read_text())
    spool = Spool(receiver_home / "spool")
    # An unforeseen failure with private detail, and a folder whose reason.json is gone; both older.
    unexpected = UnexpectedError("an item failed unexpectedly", "report it")
    unexpected.detail = "ValueError: Müller^Jürgen"
    old = spool.quarantine_files([], unexpected, "set-9",
                                 {"set_id": ids["collecting"], "detail": unexpected.detail})
    reason = json.loads((old / "reason.json").read_text())
    reason["quarantined_at"] = "2020-01-02T03:04:05Z"
    (old / "reason.json").write_text(json.dumps(reason))
    bare = spool.quarantine_dir / "20190101T000000-mail-7"
    bare.mkdir()
    (bare / "abc.eml").write_text("x")
    os.utime(bare, (1546300800, 1546300800))

    items = dicommail.Site.open(receiver_home).quarantine()
    assert all(isinstance(item, QuarantinedItem) for item in items)
    assert [item.code for item in items] == ["decryption-failed", "error", "unknown"]  # newest first
    tampered, private, unknown = items
    assert tampered.hint and [m.suffix for m in tampered.mails] == [".eml"] and tampered.mails[0].is_file()
    assert tampered.set_id is None and tampered.detail is None
    assert tampered.quarantined_at.tzinfo is not None
    assert private.quarantined_at == datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert private.set_id == ids["collecting"] and private.detail == "ValueError: Müller^Jürgen"
    assert unknown.message == "reason.json is missing or unreadable"
    assert unknown.quarantined_at == datetime(2019, 1, 1, tzinfo=UTC)
    shown = [item.to_json() for item in items]
    assert "Müller" not in json.dumps(shown)  # the detail stays out of the JSON
    assert shown[2] == {
        "name": "20190101T000000-mail-7", "path": str(bare), "code": "unknown",
        "message": "reason.json is missing or unreadable", "hint": None,
        "quarantined_at": "2019-01-01T00:00:00+00:00", "set_id": None, "mails": ["abc.eml"],
    }


def test_nothing_received_yet(tmp_path: Path) -> None:
    (tmp_path / "dicommail.toml").touch()
    site = dicommail.Site.open(tmp_path)
    assert site.received_sets() == [] and site.quarantine() == []


# check: tests/api/test_check.py


# -- echo ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "calling_aet", "argument", "message"),
    [
        ("no-port", None, "target", "'no-port' is not AE@HOST:PORT (e.g. PACS@192.0.2.7:104)"),
        ("PACS@host:70000", None, "target", "'PACS@host:70000' is not AE@HOST:PORT"),
        ("A\\B@host:104", None, "target", "'A\\\\B' is not a DICOM AE title (1-16 characters, no backslash)"),
        (None, "SEVENTEEN-LETTERS", "calling_aet", "'SEVENTEEN-LETTERS' is not a DICOM AE title"),
        (None, "  ", "calling_aet", "'  ' is not a DICOM AE title"),
    ],
)
def test_echo_refuses_bad_arguments(
    tmp_path: Path, target: str | None, calling_aet: str | None, argument: str, message: str
) -> None:
    (tmp_path / "dicommail.toml").touch()
    site = dicommail.Site.open(tmp_path)
    with pytest.raises(InvalidArgumentError) as bad:
        site.echo(target, calling_aet)
    assert isinstance(bad.value, InputError) and bad.value.code == "input"
    assert bad.value.argument == argument and bad.value.message.startswith(message)
    # The CLI keeps click's usage error (exit status 2) with the same text.
    args = [target] if target else []
    args += ["--calling-aet", calling_aet] if calling_aet is not None else []
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "echo", *args])
    assert result.exit_code == 2
    shown = "TARGET" if argument == "target" else "--calling-aet"
    expected = f"Invalid value for {shown}: {bad.value.message}"
    assert " ".join(expected.split()) in " ".join(result.output.split())


@pytest.mark.integration
def test_echo_against_the_test_bed(pacs: Pacs, short_tmp: Path) -> None:
    (short_tmp / "dicommail.toml").write_text(
        f'[pacs]\nhost = "{pacs.host}"\nport = {pacs.dicom_port}\ncalled_aet = "{pacs.aet}"\ntimeout = 5\n',
        encoding="utf-8",
    )
    site = dicommail.Site.open(short_tmp)
    result = site.echo()
    assert isinstance(result, EchoResult)
    assert (result.called_aet, result.host, result.port, result.calling_aet) == (
        pacs.aet, pacs.host, pacs.dicom_port, "DICOMMAIL")
    assert 0 < result.seconds < 5
    other = site.echo(f"ANY@{pacs.host}:{pacs.dicom_port}", "OTHER")  # Orthanc answers any called AE by default
    assert other.to_json() == {"ok": True, "called_aet": "ANY", "host": pacs.host, "port": pacs.dicom_port,
                               "calling_aet": "OTHER", "seconds": round(other.seconds, 6)}
    closed = free_ports(1)[0]
    with pytest.raises(DestinationError) as refused:
        site.echo(f"PACS@127.0.0.1:{closed}")
    assert refused.value.temporary and f"PACS@127.0.0.1:{closed}" in refused.value.message
    assert "PACS running" in refused.value.hint
