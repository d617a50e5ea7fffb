"""``Site.pack``, ``unpack``, ``send`` and ``send_pending`` called from Python.

Offline tests use two homes with the demo keys (real gpg); the sending tests
submit to the throwaway Postfix of the test bed.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from dicommail import ProgressUpdate, Site
from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.errors import (
    AuthenticationError,
    ConfigError,
    IncompleteSetError,
    InputError,
    RecipientKeyError,
)
from dicommail.samples import write_ct_study
from testbed import MailServers
from testbed.sites import HOSPITAL, PRACTICE, empty_mailbox, make_home, remove_home, wait_for_messages
from tests.conftest import short_tempdir

KEYS = Path(__file__).resolve().parents[2] / "keys"


def _offline_site(name: str, address: str) -> Iterator[Site]:
    home = short_tempdir(f"dm{name[0]}")  # gpg-agent's socket path must stay short
    site = Site.init(home, address)
    keyring = Keyring(site.config.gnupg_home)
    try:
        install_demo_site(keyring, name, KEYS)  # type: ignore[arg-type]
        yield site
    finally:
        keyring.close()
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def hospital_site() -> Iterator[Site]:
    yield from _offline_site("hospital", HOSPITAL)


@pytest.fixture(scope="module")
def practice_site() -> Iterator[Site]:
    yield from _offline_site("practice", PRACTICE)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six 256x256 CT slices (128 KiB each) in one folder."""
    folder = tmp_path_factory.mktemp("study")
    write_ct_study(folder, 6, 256)
    return folder


def _check_progress(updates: list[ProgressUpdate], task: str, unit: str = "bytes") -> int:
    """The updates of ``task``: one total, never going back, starting at 0 and ending at the total."""
    mine = [u for u in updates if u.task == task]
    assert mine, f"no {task} updates"
    (total,) = {u.total for u in mine}
    assert {u.unit for u in mine} == {unit}
    completed = [u.completed for u in mine]
    assert completed == sorted(completed) and completed[0] == 0 and completed[-1] == total
    return total


# --- offline: pack and unpack --------------------------------------------------------


def test_pack_then_unpack(hospital_site: Site, practice_site: Site, study: Path, tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    report_pdf = tmp_path / "report.pdf"
    report_pdf.write_bytes(b"%PDF-1.4 not really\n")
    updates: list[ProgressUpdate] = []
    skipped: list[tuple[Path, str]] = []

    sets = hospital_site.pack(
        [study, junk],
        PRACTICE,
        tmp_path / "out",
        note="for the tumour board",
        attachments=[report_pdf],
        max_mail_size=300 * 1024,
        progress=updates.append,
        on_skip=lambda path, reason: skipped.append((path, reason)),
    )

    assert [path for path, _reason in skipped] == [junk]
    (packed,) = sets
    assert packed.recipient == PRACTICE and packed.set_total >= 2 and packed.file_count == 7
    total = _check_progress(updates, "packing")
    assert total == packed.byte_count  # the six slices and the attachment
    shown = packed.to_json()
    assert shown["set_id"] == packed.set_id and shown["files"] == 7
    assert [m["path"] for m in shown["mails"]] == [str(m.path) for m in packed.mails]
    assert json.loads(json.dumps(shown)) == shown  # plain JSON types only

    mails = sorted((tmp_path / "out").glob("*.eml"))
    assert len(mails) == len(packed.mails)
    updates.clear()
    # Any order, with a duplicate: still one verified set.
    report = practice_site.unpack([*reversed(mails), mails[0]], tmp_path / "in", progress=updates.append)
    assert report.ok, report.to_json()
    (outcome,) = report.sets
    assert (outcome.set_id, outcome.dicom_files, outcome.other_files) == (packed.set_id, 6, 1)  # + the PDF
    assert _check_progress(updates, "unpacking", "mails") == len(mails) + 1
    shown_report = report.to_json()
    assert shown_report["ok"] and shown_report["rejected"] == []
    assert shown_report["sets"][0]["directory"] == str(outcome.directory)
    assert shown_report["sets"][0]["error"] is None


def test_unpack_counts_fragments_and_reports_a_missing_part(
    hospital_site: Site, practice_site: Site, study: Path, tmp_path: Path
) -> None:
    # 64 KiB mails: each 128 KiB slice travels as message/partial fragments.
    packed = hospital_site.pack([study], PRACTICE, tmp_path / "out", max_mail_size=64 * 1024)[0]
    assert all(m.fragment for m in packed.mails)
    keep = [m.path for m in packed.mails if m.set_part != 2]
    updates: list[ProgressUpdate] = []

    report = practice_site.unpack(keep, tmp_path / "in", progress=updates.append)

    assert not report.ok and not report.rejected
    (outcome,) = report.sets
    assert isinstance(outcome.error, IncompleteSetError) and outcome.error.missing_parts == [2]
    assert _check_progress(updates, "unpacking", "mails") == len(keep)
    error = report.to_json()["sets"][0]["error"]
    assert error["code"] == "incomplete" and error["missing_parts"] == [2] and error["hint"]
    assert not any((tmp_path / "in").iterdir())  # nothing of an incomplete set is written


def test_unpack_rejects_what_is_no_dicom_mail(practice_site: Site, tmp_path: Path) -> None:
    plain = tmp_path / "hello.eml"
    plain.write_text("From: a@b.test\nSubject: hi\n\nhello\n")
    report = practice_site.unpack([plain], tmp_path / "in")
    assert not report.ok and not report.sets
    (rejected,) = report.to_json()["rejected"]
    assert rejected["mail"] == str(plain) and rejected["error"]["code"] == "malformed"


def test_pack_errors_are_the_documented_types(hospital_site: Site, study: Path, tmp_path: Path) -> None:
    with pytest.raises(RecipientKeyError) as caught:
        hospital_site.pack([study], "nobody@nowhere.test", tmp_path / "out")
    assert "nobody@nowhere.test" in caught.value.message and caught.value.hint
    assert not list(tmp_path.rglob("*.eml"))

    with pytest.raises(InputError, match="not a mail address"):
        hospital_site.pack([study], "not-an-address", tmp_path / "out")

    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    with pytest.raises(InputError, match="no DICOM files") as none:
        hospital_site.pack([tmp_path / "text"], PRACTICE, tmp_path / "out")
    assert "pack" in none.value.hint

    with pytest.raises(InputError, match="does not exist"):
        hospital_site.pack([tmp_path / "missing"], PRACTICE, tmp_path / "out")


def test_send_refuses_a_bad_smtp_section_before_packing(study: Path) -> None:
    home = short_tempdir("dmx")
    try:
        (home / "dicommail.toml").write_text(
            f'[identity]\naddress = "{HOSPITAL}"\n[smtp]\nhost = "localhost"\npassword_file = "missing.pass"\n',
            encoding="utf-8",
        )
        site = Site.open(home)
        # No keys in this home either: the [smtp] check comes first, before the keyring is asked.
        with pytest.raises(ConfigError, match=r"smtp\.password_file"):
            site.send([study], PRACTICE)
        with pytest.raises(ConfigError, match=r"smtp\.password_file"):
            site.send_pending()
        assert not (home / "spool").exists() or not list((home / "spool").rglob("*.eml"))
    finally:
        shutil.rmtree(home, ignore_errors=True)


# --- against the test bed: send and send_pending ------------------------------------


@pytest.fixture
def sender_home(mail_servers: MailServers) -> Iterator[Path]:
    empty_mailbox(mail_servers, PRACTICE)
    no_pacs = SimpleNamespace(dicom_port=1, aet="NONE")  # sending needs no PACS
    home = make_home("hospital", HOSPITAL, mail_servers, no_pacs)
    yield home.path
    remove_home(home)


def _query(home: Path, sql: str) -> list[sqlite3.Row]:
    conn = sqlite3.connect(home / "state.db")
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


@pytest.mark.integration
def test_send_delivers_and_reports_progress(
    sender_home: Path, mail_servers: MailServers, study: Path, tmp_path: Path
) -> None:
    site = Site.open(sender_home)
    updates: list[ProgressUpdate] = []

    (result,) = site.send([study], PRACTICE, max_mail_size=300 * 1024, progress=updates.append)

    assert result.done and result.status == "sent" and result.recipient == PRACTICE
    assert result.mails == result.mails_sent == result.sent_now == len(result.outbound_mails) >= 2
    _check_progress(updates, "packing")
    sent_bytes = _check_progress(updates, "sending")
    assert sent_bytes == sum(m.size for m in result.outbound_mails)
    # Packing comes first, then sending.
    assert [u.task for u in updates].index("sending") > max(i for i, u in enumerate(updates) if u.task == "packing")
    shown = result.to_json()
    assert shown["status"] == "sent" and shown["hint"] is None
    assert [m["status"] for m in shown["mails"]] == ["sent"] * result.mails
    wait_for_messages(mail_servers, PRACTICE, result.mails)
    (row,) = _query(sender_home, "SELECT t.status, k.images FROM transfers t JOIN transfer_tracking k"
                                 " ON k.transfer_id = t.id")
    assert (row["status"], row["images"]) == ("sent", 6)

    assert site.send_pending() == []  # nothing left to send


@pytest.mark.integration
def test_send_with_a_refused_login_stays_queued_for_send_pending(
    sender_home: Path, mail_servers: MailServers, study: Path
) -> None:
    password = sender_home / "mail.pass"
    right = password.read_text()
    password.write_text("not-the-password\n")
    site = Site.open(sender_home)

    with pytest.raises(AuthenticationError) as caught:
        site.send([study], PRACTICE, max_mail_size=300 * 1024)
    (transfer,) = _query(sender_home, "SELECT id, status FROM transfers")
    assert getattr(caught.value, "queued_transfers", None) == (transfer["id"],)
    assert transfer["status"] == "queued"

    password.write_text(right)
    waits: list[None] = []
    updates: list[ProgressUpdate] = []
    (result,) = site.send_pending(progress=updates.append, on_wait=lambda: waits.append(None))
    assert result.transfer_id == transfer["id"] and result.done and result.sent_now == result.mails
    assert _check_progress(updates, "sending") == sum(m.size for m in result.outbound_mails)
    assert waits == []  # nobody else was sending
    wait_for_messages(mail_servers, PRACTICE, result.mails)
