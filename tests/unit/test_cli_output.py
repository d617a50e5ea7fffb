"""What people and scripts read: log lines, error text printed literally, one JSON document per invocation."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from dicommail.cli import logs
from dicommail.cli.main import cli
from dicommail.samples import write_ct_study
from testbed.sites import HOSPITAL, PRACTICE, Home, make_home, remove_home

ISO = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


def invoke(home: Path, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), *args])


def one_document(text: str) -> dict[str, Any]:
    """The single JSON document ``text`` holds; fails if there is anything after it."""
    decoder = json.JSONDecoder()
    document, end = decoder.raw_decode(text.lstrip())
    assert text.lstrip()[end:].strip() == "", f"more than one document: {text!r}"
    assert isinstance(document, dict)
    return document


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """setup_logging replaces the root handlers; put back what pytest had."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("dicommail").level,
             logging.getLogger("pynetdicom").level)
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("dicommail").setLevel(saved[2])
    logging.getLogger("pynetdicom").setLevel(saved[3])


# -- log lines -------------------------------------------------------------------------------------------


def test_journal_lines_one_per_event_with_priority_and_details(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    assert logs.journal_mode(io.StringIO())
    logs.setup_logging(logging.DEBUG)
    log = logging.getLogger("dicommail.test")
    long_message = "x" * 150 + " [receiver] " + "y" * 138  # 300 characters
    assert len(long_message) == 300
    log.warning(long_message, extra={"set_id": "2.25.1", "reason": "two words"})
    log.error("sending failed")
    log.info("polling")
    log.debug("detail")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("unexpected")
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f'<4>{long_message} set_id=2.25.1 reason="two words"'
    assert lines[1:4] == ["<3>sending failed", "<6>polling", "<7>detail"]
    # A traceback stays in its event's line.
    assert len(lines) == 5 and lines[4].startswith("<3>unexpected\\nTraceback") and "ValueError: boom" in lines[4]


def test_terminal_lines_have_iso_timestamps_and_literal_text(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    logging.getLogger().handlers[:] = [logs.TerminalHandler()]
    logging.getLogger("dicommail").setLevel(logging.INFO)
    logging.getLogger("dicommail.test").info("unknown setting(s) in [receiver] :smile:", extra={"port": 104})
    line = capsys.readouterr().err.rstrip("\n")
    assert re.fullmatch(rf"{ISO} INFO    unknown setting\(s\) in \[receiver\] :smile: port=104", line), line


def test_a_terminal_inheriting_journal_stream_keeps_terminal_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

        def fileno(self) -> int:
            return 0

    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    assert not logs.journal_mode(Terminal())
    monkeypatch.setenv("JOURNAL_STREAM", "1:1")  # some other stream: a shell started from a unit
    assert not logs.journal_mode(Terminal())


def test_log_level_options(tmp_path: Path, restore_logging: None) -> None:
    (tmp_path / "dicommail.toml").write_text('[identity]\naddress = "a@b.example"\n')
    for options, level in (([], logging.INFO), (["-q"], logging.WARNING), (["-v"], logging.DEBUG),
                           (["--log-level", "error"], logging.ERROR), (["--log-level", "debug"], logging.DEBUG)):
        result = invoke(tmp_path, "receive", "--once", *options)  # fails: no mailbox configured
        assert result.exit_code == 1, result.output
        assert logging.getLogger("dicommail").level == level
        # pynetdicom's own errors repeat what dicommail reports; only shown when debugging.
        pynetdicom = logging.getLogger("pynetdicom").level
        assert pynetdicom == (logging.INFO if level == logging.DEBUG else logging.CRITICAL)
    assert invoke(tmp_path, "receive", "--once", "-q", "-v").exit_code == 2
    assert invoke(tmp_path, "gateway", "--log-level", "loud").exit_code == 2
    assert "--log-level" in invoke(tmp_path, "constancy", "run", "--help").output


def test_the_receiver_says_what_it_polls() -> None:
    from dicommail.config import parse_config
    from dicommail.receiver.daemon import mailbox_description

    config = parse_config({"mailbox": {"host": "mail.example", "username": "dm@example.org"}}, Path("/h"))
    assert mailbox_description(config) == "imap://dm@example.org@mail.example:993/INBOX with IDLE"
    config = parse_config({"mailbox": {"protocol": "pop3", "host": "mail.example", "port": 995}}, Path("/h"))
    assert mailbox_description(config) == "pop3://mail.example:995"


# -- error text ------------------------------------------------------------------------------------------


def test_brackets_in_errors_and_hints_are_printed(tmp_path: Path) -> None:
    (tmp_path / "dicommail.toml").write_text('[identity]\naddress = "a@b.example"\n')
    result = invoke(tmp_path, "receive", "--once")
    assert result.exit_code == 1
    assert "error: mailbox.username is not set\n" in result.stderr
    assert "hint: set the mail account's login name in [mailbox]\n" in result.stderr


def test_a_misspelt_setting_names_its_line_and_the_right_name(tmp_path: Path) -> None:
    config = tmp_path / "dicommail.toml"
    config.write_text('[identity]\naddress = "a@b.example"\n\n[receiver]\n# every minute\nintervall = 60\n')
    result = invoke(tmp_path, "status")
    assert result.exit_code == 1
    assert f"error: {config}:6: unknown setting(s) in [receiver]: intervall\n" in result.stderr
    assert "hint: did you mean interval? known settings there: interval, " in result.stderr
    document = one_document(invoke(tmp_path, "status", "--json").stdout)
    assert document["error"]["message"] == f"{config}:6: unknown setting(s) in [receiver]: intervall"


def test_config_errors_name_the_line(tmp_path: Path) -> None:
    config = tmp_path / "dicommail.toml"
    config.write_text('[identity]\naddress = "a@b.example"\n[recevier]\ninterval = 60\n')
    result = invoke(tmp_path, "status")
    assert f"error: {config}:3: unknown section(s): recevier\n" in result.stderr
    assert "hint: did you mean receiver? known sections: " in result.stderr
    config.write_text('[peers."x@y.example"]\nmax_mail_size = "10M"\n\n[ pacs ]\n port = "104"\n')
    assert f"error: {config}:5: pacs.port must be a whole number\n" in invoke(tmp_path, "status").stderr
    config.write_text("[pacs]\nport = \n")
    assert f"error: {config}:2:8: not valid TOML: " in invoke(tmp_path, "status").stderr


# -- one JSON document -----------------------------------------------------------------------------------


@pytest.fixture
def unreachable_home() -> Iterator[Home]:
    """A hospital home whose mail servers are not there (port 1 refuses connections)."""
    servers = SimpleNamespace(accounts={HOSPITAL: "x", PRACTICE: "x"}, imaps_port=1, pop3s_port=1, smtp_port=1,
                              ca_file="/etc/ssl/certs/ca-certificates.crt")
    home = make_home("hospital", HOSPITAL, servers, SimpleNamespace(dicom_port=1, aet="PACS"))
    yield home
    remove_home(home)


def test_a_failing_send_prints_one_document(unreachable_home: Home, tmp_path: Path) -> None:
    if not Path("/etc/ssl/certs/ca-certificates.crt").exists():
        pytest.skip("no system CA bundle for the SMTP settings")
    study = write_ct_study(tmp_path / "study", 1, 64)[0].parent
    result = invoke(unreachable_home.path, "send", "--json", "--to", "nobody@nowhere.example", str(study))
    assert result.exit_code == 1
    document = one_document(result.stdout)
    assert document["ok"] is False and document["error"]["code"] == "recipient-key"
    result = invoke(unreachable_home.path, "send", "--json", "--to", PRACTICE, str(study))
    assert result.exit_code == 75  # queued for a retry: the SMTP server is not there
    document = one_document(result.stdout)
    assert document["ok"] is False and document["sets"][0]["status"] == "queued"


@pytest.mark.integration
def test_receive_with_a_wrong_password_prints_one_document(mail_servers: Any, pacs: Any) -> None:
    home = make_home("practice", PRACTICE, mail_servers, pacs, password="wrong-password")
    try:
        result = home.run("receive", "--once", "--json")
        assert result.returncode == 1
        document = one_document(result.stdout)
        assert document["ok"] is False and document["fetch_error"]
        assert "password_file" in result.stderr  # the hint
        # Log lines off a terminal: one per event, with its priority.
        assert any(line.startswith("<3>") for line in result.stderr.splitlines()), result.stderr
    finally:
        remove_home(home)


def test_errors_on_journald_stream_carry_their_priority(tmp_path: Path) -> None:
    """Under a unit, a command's error is filed at priority 3: `journalctl -p err` shows it."""
    import os
    import subprocess
    import sys

    stderr = tmp_path / "journal"
    with stderr.open("w") as stream:
        status = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
        subprocess.run([sys.executable, "-m", "dicommail", "--home", str(tmp_path / "typo"), "status"],
                       stderr=stream, stdout=subprocess.DEVNULL, env=env, check=False)
    lines = stderr.read_text().splitlines()
    assert lines and all(line.startswith("<3>") for line in lines), lines
    assert lines[0].startswith("<3>error: ") and lines[1].startswith("<3>hint: ")
    # Elsewhere (a terminal, cron mail) the lines stay as they were.
    plain = subprocess.run([sys.executable, "-m", "dicommail", "--home", str(tmp_path / "typo"), "status"],
                           capture_output=True, text=True, env={**os.environ, "JOURNAL_STREAM": ""}, check=False)
    assert plain.stderr.startswith("error: ")


def test_commands_named_in_hints_carry_this_home(tmp_path: Path) -> None:
    # A hint copied from a site at /srv/hospital ran on ~/.dicommail, or on another site.
    from dicommail.cli.render import for_this_home, set_home

    home = tmp_path / "my site"
    set_home(home, tmp_path / "default", ["keys", "send", "check", "status", "gateway"])
    try:
        assert for_this_home("then run: dicommail keys certify ABC") == \
            f'then run: dicommail --home "{home}" keys certify ABC'
        assert for_this_home("`dicommail send --pending` from cron") == \
            f'`dicommail --home "{home}" send --pending` from cron'
        # In single quotes (usage hints), and after an option: still one word a shell reads right.
        assert for_this_home("see 'dicommail status --help'") == f"""see 'dicommail --home "{home}" status --help'"""
        assert for_this_home("dicommail --json status") == f'dicommail --home "{home}" --json status'
        unchanged = [f"dicommail --home {home} status", "see dicommail.toml", "the dicommail home",
                     "this home's dicommail daemon runs"]
        assert [for_this_home(text) for text in unchanged] == unchanged
        set_home(home, home)  # the default home: nothing to add
        assert for_this_home("run: dicommail check") == "run: dicommail check"
    finally:
        set_home(home, home)


def test_since_takes_the_same_forms_everywhere() -> None:
    # `stats --since 2026-11` worked while `status --since 2026-12` was refused.
    from datetime import datetime

    from dicommail.cli.render import parse_moment, since_option

    assert since_option("2026-12") == datetime(2026, 12, 1) == parse_moment(" 2026-12 ")
    assert since_option("2026-12-03T08:00") == datetime(2026, 12, 3, 8, 0)
    with pytest.raises(click.BadParameter):
        since_option("last week")
