"""``dicommail status`` in 80 columns (piped, on a terminal, in a pty) and the JSON times of status and check."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from rich.console import Console

from dicommail.cli import cli
from dicommail.config import parse_config
from dicommail.sender.tracking import Tracker
from dicommail.store.db import Database
from dicommail.wire import notifications as n

RECIPIENT = "radiologie-eingang.teleradiologie@praxis-am-stadtpark.example"  # 61 characters
# Set IDs as the sender makes them (2.25. and a UUID as a number: up to 44 characters).
DELIVERED = "2.25.329800735698586629295641978511506172918"
FAILED = "2.25.187237542907812908459871234987120938471"
WAITING = "2.25.9182736450918273645091827364509182736"
ERROR = ("the receiver reports a hard error (decrypt-failed): its key does not decrypt the mail; "
         "ask the peer which key they published [receiver] and import it")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _add_transfer(home: Path, db: Database, ident: int, set_id: str, status: str, *, at: float,
                  recipient: str = RECIPIENT, seconds: float | None = None, error: str | None = None) -> None:
    """A transfer as the sender leaves it in ``state.db`` and the outbox: 2 parts, both mails sent."""
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO transfers (id, set_id, recipient, study_uid, files, bytes, set_total, status, error, "
            "created_at, updated_at, first_sent_at, sent_at) VALUES (?, ?, ?, '1.2.3', 4, 40960, 2, ?, ?, ?, ?, ?, ?)",
            (ident, set_id, recipient, status, error, at, at, at + 1, at + 2),
        )
        conn.execute(
            "INSERT INTO transfer_tracking (transfer_id, images, patient_name, study_description, finished_at, "
            "transfer_seconds) VALUES (?, 4, 'Doe^Jane', 'CT head', ?, ?)",
            (ident, at + 1 + seconds if seconds is not None else None, seconds),
        )
        for part in (1, 2):
            mail = home / f"t{ident}p{part}.eml"
            mail.write_text("x")
            conn.execute(
                "INSERT INTO outbound_mails (transfer_id, set_part, message_id, path, size, status, sent_at) "
                "VALUES (?, ?, ?, ?, 20480, 'sent', ?)",
                (ident, part, f"<{set_id}.p{part}@hospital.example>", str(mail), at + part),
            )
        conn.execute("INSERT INTO transfer_events (transfer_id, at, event, set_part, detail) VALUES (?, ?, ?, ?, ?)",
                     (ident, at + 3, "failed" if error else "note", None, error or "a short detail"))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return make_home(tmp_path)


def make_home(tmp_path: Path) -> Path:
    """A sending site with a delivered, a failed and a waiting transfer (ids 7, 1042 and 99999)."""
    (tmp_path / "dicommail.toml").write_text("[tracking]\nack_timeout = 864000\n", encoding="utf-8")
    now = time.time()
    db = Database(tmp_path / "state.db")
    try:
        _add_transfer(tmp_path, db, 7, DELIVERED, "delivered", at=now - 3 * 86400, seconds=754.2)
        _add_transfer(tmp_path, db, 1042, FAILED, "failed", at=now - 5 * 3600, error=ERROR)
        _add_transfer(tmp_path, db, 99999, WAITING, "sent", at=now - 90, recipient="short@x.example")
    finally:
        db.close()
    return tmp_path


def _run(home: Path, *args: str) -> Result:
    result = CliRunner().invoke(cli, ["--home", str(home), "status", *args])
    assert result.exit_code == 0, result.output
    return result


def _terminal(monkeypatch: pytest.MonkeyPatch) -> Console:
    """From now on ``status`` prints to a rich console that believes it is an 80-column colour terminal."""
    console = Console(file=io.StringIO(), width=80, force_terminal=True, color_system="standard", record=True,
                      highlight=False, soft_wrap=True)
    monkeypatch.setattr("dicommail.cli.status.out", console)
    return console


def _buffer(console: Console) -> io.StringIO:
    assert isinstance(console.file, io.StringIO)
    return console.file


def _assert_narrow(text: str) -> None:
    lines = text.splitlines()
    assert lines[0].split() == ["ID", "STATE", "RECIPIENT", "AGE", "TRANSFER", "TIME"]
    too_long = [line for line in lines if len(line) > 80]
    assert not too_long, too_long
    for set_id in (DELIVERED, FAILED, WAITING):
        # On a line of its own, whole, under its row.
        assert sum(line.split() == ["set", set_id] for line in lines) == 1, set_id
    rows = {line.split()[0]: line.split() for line in lines[1:] if line[:6].strip().isdigit()}
    assert rows["7"][1:2] == ["delivered"] and "12 min 34 s" in " ".join(rows["7"])
    assert rows["7"][-8:-6] == ["3", "d"]  # age
    assert rows["99999"][:3] == ["99999", "sent", "short@x.example"] and rows["99999"][4:] == ["min", "-"]
    shortened = re.search(r"  (\S+)…  ", next(line for line in lines if line.split()[:1] == ["7"]))
    assert shortened and RECIPIENT.startswith(shortened.group(1)) and len(shortened.group(1)) > 30
    # The error, word-wrapped and whole: brackets are text, not markup.
    error_text = " ".join(" ".join(lines).split())
    assert f"error: {ERROR}" in error_text
    for wide_only in ("CREATED", "ACKNOWLEDGED", "PARTS SENT", "IMAGES"):
        assert wide_only not in lines[0]


def test_piped_status_fits_80_columns(home: Path) -> None:
    _assert_narrow(_run(home).stdout)


def test_terminal_status_fits_80_columns(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    piped = _run(home).stdout
    terminal = _terminal(monkeypatch)
    _run(home)
    raw = _buffer(terminal).getvalue()
    assert "\x1b[" in raw  # a terminal gets colours ...
    _assert_narrow(terminal.export_text())  # ... and the same lines
    assert _ages_masked(ANSI.sub("", raw)) == _ages_masked(piped)


def test_output_does_not_depend_on_the_width(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A narrow or a wide terminal, or a pipe: the same lines (the terminal wraps what it cannot show)."""
    outputs = set()
    for width in (40, 80, 200):
        console = Console(file=io.StringIO(), width=width, force_terminal=True, color_system=None, highlight=False,
                          soft_wrap=True)
        monkeypatch.setattr("dicommail.cli.status.out", console)
        for wide in (False, True):
            _run(home, *(["--wide"] if wide else []))
            outputs.add((wide, _ages_masked(_buffer(console).getvalue())))
            _buffer(console).seek(0)
            _buffer(console).truncate()
    assert len(outputs) == 2


def _ages_masked(text: str) -> str:
    """The output with its ages (which move on while a test runs) blanked out."""
    return re.sub(r"\b\d+ (s|min|h \d\d min|d \d\d h)  ", "AGE  ", text)


def test_wide_shows_every_column_on_one_line(home: Path) -> None:
    lines = _run(home, "--wide").stdout.splitlines()
    assert len(lines) == 4  # the header and one line per transfer
    for column in ("ID", "SET", "STATE", "CREATED", "RECIPIENT", "PARTS SENT", "ACKNOWLEDGED", "IMAGES",
                   "TRANSFER TIME", "ERROR"):
        assert column in lines[0]
    assert "PATIENT" not in lines[0]
    failed = next(line for line in lines if FAILED in line)
    assert RECIPIENT in failed and ERROR in failed and " 2/2 " in failed
    assert lines[0].index("SET") == failed.index(FAILED)  # columns line up
    with_patient = _run(home, "--wide", "--show-patient").stdout
    assert "PATIENT" in with_patient and "Doe^Jane" in with_patient and "CT head" in with_patient
    assert "Doe^Jane" not in _run(home).stdout
    assert "patient: Doe^Jane; study: CT head" in _run(home, "--show-patient").stdout


def test_status_ident_is_readable_at_80_columns(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    piped = [_run(home, ident).stdout for ident in (FAILED, "7")]
    terminal = _terminal(monkeypatch)
    shown = []
    for ident in (FAILED, "7"):
        _run(home, ident)
        shown.append(_last(terminal))
    assert shown == piped
    for set_id, output in zip((FAILED, DELIVERED), piped, strict=True):
        lines = output.splitlines()
        assert lines[0].startswith(f"set {set_id} (transfer ")
        assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
        assert lines[lines.index("") + 1].split() == ["TIME", "PART", "EVENT"]
        # Message IDs (which hold the set ID) are never cut.
        assert f"<{set_id}.p1@hospital.example>," in output.split()
        words = " ".join(output.split())
        if set_id == FAILED:
            assert f"error: {ERROR}" in words
        else:
            assert "transfer time 12 min 34 s" in words


def _last(console: Console) -> str:
    text = console.export_text()  # and clears the record
    _buffer(console).seek(0)
    _buffer(console).truncate()
    return text


# -- what a person sees: a real terminal of 80 columns ----------------------------------------------------------


def _in_pty(home: Path, *args: str, columns: int = 80) -> str:
    """Run ``dicommail status`` in a pseudo-terminal of ``columns`` columns; what it shows, without colours."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TERM")}
    env["TERM"] = "xterm-256color"
    process = subprocess.Popen(
        [sys.executable, "-m", "dicommail", "--home", str(home), "status", *args],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    assert process.wait() == 0
    raw = b"".join(chunks).decode()
    assert "\x1b[" in raw  # it did believe it was on a terminal
    return ANSI.sub("", raw).replace("\r\n", "\n")


@pytest.mark.skipif(sys.platform == "win32", reason="needs a pty")
def test_what_a_person_sees_in_80_columns(home: Path) -> None:
    seen = _in_pty(home)
    _assert_narrow(seen)
    assert _ages_masked(seen) == _ages_masked(_in_pty(home, columns=132))
    assert all(len(line) <= 80 for line in _in_pty(home, FAILED).splitlines())


# -- JSON: times in ISO 8601 with offset, absent ones null -----------------------------------------------------


def _assert_time(value: Any, name: str) -> None:
    assert isinstance(value, str), (name, value)
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None, (name, value)


def test_status_json_times_are_iso_with_offset(home: Path) -> None:
    transfers = json.loads(_run(home, "--json").stdout)["transfers"]
    assert {t["set_id"] for t in transfers} == {DELIVERED, FAILED, WAITING}
    for transfer in transfers:
        times = {k: v for k, v in transfer.items() if k.endswith("_at")}
        assert set(times) == {"created_at", "first_sent_at", "sent_at", "finished_at"}
        for name, value in times.items():
            if name == "finished_at" and transfer["status"] != "delivered":
                assert value is None
            else:
                _assert_time(value, name)
        assert transfer["transfer_seconds"] is None or isinstance(transfer["transfer_seconds"], float)
    delivered = next(t for t in transfers if t["set_id"] == DELIVERED)
    finished = datetime.fromisoformat(delivered["finished_at"]) - datetime.fromisoformat(delivered["first_sent_at"])
    assert abs(finished.total_seconds() - 754.2) < 0.01


def test_status_ident_json_times_are_iso_with_offset(home: Path) -> None:
    data = json.loads(_run(home, FAILED, "--json").stdout)
    transfer, timeline = data["transfer"], data["timeline"]
    for name in ("created_at", "first_sent_at", "sent_at"):
        _assert_time(transfer[name], name)
    assert transfer["finished_at"] is None and data["final_report"] is None
    assert [e["event"] for e in timeline] == ["queued", "mail sent", "mail sent", "failed"]
    for entry in timeline:
        _assert_time(entry["at"], "at")
    assert [datetime.fromisoformat(e["at"]) for e in timeline] == sorted(datetime.fromisoformat(e["at"])
                                                                         for e in timeline)


# check --json: stable machine ids in tests/api/test_check.py


# -- a transfer the tracker saw through: acknowledgements, a resend, the receiver's final report -------------------


def _notify(tracker: Tracker, mail_id: int, outcome: str, scope: str, part: int | None, **report: Any) -> None:
    status = n.StatusReport(scope=scope, set_id=WAITING, status="delivered" if scope == n.SET else "verified",
                            outcome=outcome, set_part=part, set_total=2, **report)
    note = n.build_notification(status, original_message_id=f"<{WAITING}.p{part or 1}@hospital.example>",
                                final_recipient="short@x.example", reporting_host="practice.example")
    tracker.on_report(mail_id, n.ReceivedReport(note, None, "short@x.example", f"<n{mail_id}@practice.example>"))


def test_a_tracked_transfer_in_80_columns_and_json(home: Path) -> None:
    config = parse_config({"peers": {"short@x.example": {"notification": "rfc"}}}, home)
    db = Database(home / "state.db")
    try:
        tracker = Tracker(db, config, keyring=None)  # type: ignore[arg-type]  # unsigned notifications only
        _notify(tracker, 1, n.ERROR, n.PART, 2, reason="decryption-failed")
        _notify(tracker, 2, n.SUCCESS, n.PART, 1)
        received = datetime.now(UTC).isoformat(timespec="seconds")
        _notify(tracker, 3, n.SUCCESS, n.SET, None, files=4, dicom_instances=4, first_received_at=received,
                verified_at=received, forwarded_at=received, reported_at=received)
    finally:
        db.close()
    data = json.loads(_run(home, WAITING, "--json").stdout)
    assert data["transfer"]["status"] == "delivered" and data["transfer"]["resends"] == 1
    for name in ("created_at", "first_sent_at", "sent_at", "finished_at"):
        _assert_time(data["transfer"][name], name)
    events = [e["event"] for e in data["timeline"]]
    assert "resend" in events and "delivered" in events and "set notification (rfc): success" in events
    for entry in data["timeline"]:
        _assert_time(entry["at"], "at")
    for name in ("first_received_at", "verified_at", "forwarded_at", "reported_at"):
        _assert_time(data["final_report"][name], name)
    shown = _run(home, WAITING).stdout
    assert all(len(line) <= 80 for line in shown.splitlines())
    assert "receiver: 4 file(s), 4 DICOM instance(s) forwarded" in " ".join(shown.split())
    listing = _run(home, "--done").stdout.splitlines()
    assert len(listing) == 5  # the header, two delivered transfers of two lines each, oldest first
    assert listing[3].split()[:3] == ["99999", "delivered", "short@x.example"]
    assert listing[4].split() == ["set", WAITING]


def test_what_cannot_be_done_is_refused_before_the_operator_is_asked(home: Path) -> None:
    # `transfers retry` asked "Send ... again?" for a delivered set, then said it cannot be retried.
    from dicommail import Site
    from dicommail.errors import StateError

    asked: list[str] = []
    site = Site.open(home)
    for action, ident in (("retry", DELIVERED), ("cancel", FAILED), ("delete", WAITING)):
        with pytest.raises(StateError):
            getattr(site, action)(ident, confirm=lambda view: asked.append(view.set_id) or True)
    assert asked == []
