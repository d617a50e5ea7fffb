"""The scripts in examples/python/ run as a site would run them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import dicommail
from dicommail.samples import write_ct_study
from testbed import MailServers, Pacs
from testbed.sites import HOSPITAL, PRACTICE, Home, empty_mailbox, make_home, remove_home, wait_for_messages

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "python"


def _run(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True, text=True,
                          timeout=300, check=False)


@pytest.fixture
def fresh_home() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="dmx"))
    dicommail.Site.init(home, HOSPITAL)
    yield home
    shutil.rmtree(home, ignore_errors=True)


def test_daily_summary_of_a_new_site(fresh_home: Path) -> None:
    result = _run("daily_summary.py", "--home", str(fresh_home), "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is True and report["sent"] == {} and report["quarantined"] == 0
    text = _run("daily_summary.py", "--home", str(fresh_home))
    assert text.returncode == 0 and "sent:        nothing" in text.stdout


def test_daily_summary_of_a_broken_config_is_one_json_error(tmp_path: Path) -> None:
    (tmp_path / "dicommail.toml").write_text("[identity\n")
    result = _run("daily_summary.py", "--home", str(tmp_path), "--json")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["code"] == "config"


@pytest.mark.integration
def test_send_new_studies_sends_a_settled_folder(mail_servers: MailServers, pacs: Pacs, tmp_path: Path) -> None:
    empty_mailbox(mail_servers, PRACTICE)
    hospital: Home = make_home("hospital", HOSPITAL, mail_servers, pacs)
    try:
        export = tmp_path / "export"
        write_ct_study(export / "CT-ready", 3, 64)
        (export / "notes").mkdir()  # nothing to send in it: it fails and is moved aside
        (export / "notes" / "readme.txt").write_text("not a study")
        result = _run("send_new_studies.py", "--home", str(hospital.path), "--to", PRACTICE, str(export),
                      "--once", "--settle", "0")
        assert result.returncode == 1, result.stderr  # one of the two folders failed
        assert (export / ".sent" / "CT-ready").is_dir() and (export / ".failed" / "notes").is_dir()
        [view] = dicommail.Site.open(hospital.path).transfers()
        assert view.status == "sent" and view.recipient == PRACTICE
        wait_for_messages(mail_servers, PRACTICE, view.mails)
    finally:
        remove_home(hospital)
