"""DIN 6868-159 constancy checks end to end on the test bed: the hospital checks its link to the practice.

The hospital runs ``dicommail constancy run`` (it sends the marked test set
and fetches its own mail until the receipt is in); the practice runs
``dicommail receive``, checks the test set and answers with a receipt.  A
check whose receiver is down is left pending, then fails once its (short,
here) time limit has passed.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicommail import Site
from dicommail.constancy import runner
from dicommail.constancy import store as s
from dicommail.constancy.values import ConstancyMark
from dicommail.dicom import DicomFile
from dicommail.samples import write_ct_study
from testbed import MailServers, Pacs
from testbed.sites import HOSPITAL, PRACTICE, Home, empty_mailbox, imap, make_home, remove_home, wait_for_messages

pytestmark = pytest.mark.integration

LIST_KEYS = ["id", "kind", "peer", "attempt", "started_at", "finished_at", "transfer_time_s", "limit_s", "complete",
             "headers_ok", "quality_ok", "result", "reason"]


def _constancy(time_limit: int = 900, **extra: str) -> str:
    lines = [f"{key} = {value}" for key, value in extra.items()]
    return "\n[constancy]\ndataset_mib = 1\ntime_limit = {}\n{}\n".format(time_limit, "\n".join(lines))


@dataclasses.dataclass
class Link:
    hospital: Home
    practice: Home
    servers: MailServers
    pacs: Pacs
    received: Path  # the practice's constancy.test_destination
    _daemon: subprocess.Popen[bytes] | None = None

    def start_practice(self, log: Path) -> None:
        """The practice's receiver, running as a daemon: it answers test sets as they come."""
        self._daemon = self.practice.daemon("receive", log=log)

    def stop_practice(self) -> None:
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.send_signal(signal.SIGTERM)
            self._daemon.wait(timeout=60)
        self._daemon = None

    def run(self, *args: str) -> tuple[int, dict[str, Any], str]:
        """``dicommail constancy ARGS --json`` at the hospital: exit code, JSON output, log."""
        result = self.hospital.run("constancy", *args, "--json")
        assert result.stdout, result.stderr
        assert "SYNTHETIC" not in result.stderr  # no patient data in the log
        data: dict[str, Any] = json.loads(result.stdout)
        return result.returncode, data, result.stderr

    def checks(self) -> list[dict[str, Any]]:
        result = self.hospital.run("constancy", "list", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        data = json.loads(result.stdout)
        assert list(data) == ["ok", "checks"] and data["ok"] is True
        for check in data["checks"]:
            assert list(check) == LIST_KEYS
        checks: list[dict[str, Any]] = data["checks"]
        return checks


def _link(servers: MailServers, pacs: Pacs, time_limit: int, hospital_extra: str = "") -> Link:
    empty_mailbox(servers, PRACTICE)
    empty_mailbox(servers, HOSPITAL)
    hospital = make_home("hospital", HOSPITAL, servers, pacs, extra=_constancy(time_limit) + hospital_extra)
    practice = make_home("practice", PRACTICE, servers, pacs)
    received = practice.path / "constancy-received"
    with (practice.path / "dicommail.toml").open("a") as config:
        config.write(f'\n[constancy]\ntest_destination = "{received}"\n')
    return Link(hospital, practice, servers, pacs, received)


@pytest.fixture
def link(mail_servers: MailServers, pacs: Pacs) -> Iterator[Link]:
    made = _link(mail_servers, pacs, 900)
    yield made
    made.stop_practice()
    remove_home(made.hospital)
    remove_home(made.practice)


@pytest.fixture
def slow_link(mail_servers: MailServers, pacs: Pacs) -> Iterator[Link]:
    """A link whose checks have 5 s: the practice never answers within it (it does not run)."""
    made = _link(mail_servers, pacs, 5, f'admin_address = "{HOSPITAL}"\n')
    yield made
    remove_home(made.hospital)
    remove_home(made.practice)


def _test_set(home: Home) -> list[str]:
    """SOP Instance UIDs of the synthetic test set the hospital generated."""
    folder = home.path / "spool" / "constancy" / "dataset"
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in folder.glob("*.dcm"))


def test_daily_and_monthly_checks_pass_without_reaching_the_pacs(link: Link, tmp_path: Path) -> None:
    link.start_practice(tmp_path / "practice.log")
    for kind in ("daily", "monthly"):
        code, data, _ = link.run("run", "--to", PRACTICE, "--kind", kind)
        (check,) = data["checks"]
        assert code == 0, (data, (tmp_path / "practice.log").read_text())
        assert data["ok"] is True
        assert (check["kind"], check["attempt"], check["result"]) == (kind, 1, "passed")
        assert (check["complete"], check["headers_ok"], check["quality_ok"]) == (True, True, True)
        assert 0 < check["transfer_time_s"] <= check["limit_s"] == 900
        assert check["reason"] is None and check["finished_at"] is not None
    uids = _test_set(link.hospital)
    assert uids and not set(uids) & set(link.pacs.list_sop_instance_uids())
    assert [c["result"] for c in link.checks()] == ["passed", "passed"]


def test_a_check_without_an_answer_is_pending_then_fails(slow_link: Link) -> None:
    started = time.monotonic()
    code, data, _ = slow_link.run("run", "--to", PRACTICE, "--kind", "monthly", "--wait", "0")
    assert code == 75, data
    (check,) = data["checks"]
    assert (check["result"], check["finished_at"], check["complete"]) == ("pending", None, None)
    time.sleep(max(0.0, 6 - (time.monotonic() - started)))  # past the 5 s time limit
    (listed,) = slow_link.checks()
    assert listed["id"] == check["id"] and listed["result"] == "failed"
    assert listed["reason"] == "no receipt within the time limit of 5 s"


def test_a_failed_daily_check_is_tried_twice_and_reported(slow_link: Link) -> None:
    code, data, log = slow_link.run("run", "--to", PRACTICE)  # waits out the 5 s limit, twice
    assert code == 1, data
    # Logged as an error: off a terminal a journal line with priority 3.
    assert any(line.startswith("<3>constancy check") and "FAILED" in line for line in log.splitlines()), log
    (check,) = data["checks"]
    assert (check["kind"], check["attempt"], check["result"]) == ("daily", 2, "failed")
    assert [(c["attempt"], c["result"]) for c in slow_link.checks()] == [(1, "failed"), (2, "failed")]
    # The admin (here: the hospital's own mailbox) got a plain mail without patient data.
    wait_for_messages(slow_link.servers, HOSPITAL, 1)
    client = imap(slow_link.servers, HOSPITAL)
    try:
        client.select("INBOX", readonly=True)
        _, found = client.search(None, "SUBJECT", '"constancy check"')
        (number,) = found[0].split()
        _, fetched = client.fetch(number, "(RFC822)")
    finally:
        client.logout()
    item = fetched[0]
    assert isinstance(item, tuple)
    raw = item[1]
    assert b"FAILED" in raw and b"attempt 2" in raw and b"SYNTHETIC" not in raw


def test_a_receiver_without_the_mark_checks_completeness_only(link: Link, tmp_path: Path) -> None:
    """A foreign receiver acknowledges the set like any other: quality is then "not checked by the receiver"."""
    site = Site.open(link.hospital.path)
    study = write_ct_study(tmp_path / "study", 2, 64)
    with site._database() as db:
        check_id = s.start_check(db, kind="daily", peer=PRACTICE, attempt=1, limit_s=900, mark_id=s.new_mark_id())
    (sent,) = site.send(study, PRACTICE)  # no mark: to the practice it is an ordinary study
    with site._database() as db:
        s.attach_transfer(db, check_id, sent.transfer_id, sent.set_id)
    wait_for_messages(link.servers, PRACTICE, 1)
    assert link.practice.run("receive", "--once").returncode == 0
    wait_for_messages(link.servers, HOSPITAL, 1)
    assert link.hospital.run("receive", "--once").returncode == 0  # the Tracker records the receipt
    (check,) = link.checks()
    assert (check["id"], check["result"], check["complete"]) == (check_id, "passed", True)
    assert check["quality_ok"] is None and check["headers_ok"] is None
    assert "not checked by the receiver" in check["reason"]


def test_a_changed_header_entry_fails_the_check_and_is_named(link: Link, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """What the receiver finds differs from what the sender recorded: the entry is named, never its value."""
    original = runner.build_mark

    def tampered(check_id: str, kind: str, files: list[DicomFile], entries: list[str]) -> ConstancyMark:
        mark = original(check_id, kind, files, entries)
        first = next(iter(mark.instances.values()))
        changed = dataclasses.replace(first, headers={**first.headers, "SliceThickness": "7.5"})
        return dataclasses.replace(mark, instances={**mark.instances, first.sop_instance_uid: changed})

    monkeypatch.setattr(runner, "build_mark", tampered)
    link.start_practice(tmp_path / "practice.log")
    check = Site.open(link.hospital.path).constancy_run(PRACTICE, kind="monthly")
    assert check.result == "failed", check
    assert check.complete is True and check.headers_ok is False and check.quality_ok is True
    assert check.reason is not None and "SliceThickness (instance" in check.reason and "7.5" not in check.reason
