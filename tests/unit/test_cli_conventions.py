"""What an admin expects of a command line (git, systemctl, dcmtk, restic): --home anywhere, usage errors
exit 2, one JSON document under --json also for usage errors, --version, shell completion, man pages."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

import dicommail
from dicommail.cli import cli
from dicommail.cli.manpage import render_pages
from dicommail.store.db import Database

SENT, FAILED, DELIVERED = "2.25.1001", "2.25.1002", "2.25.1003"


def run(*args: str, **kwargs: Any) -> Result:
    kwargs.setdefault("prog_name", "dicommail")  # as the installed command is called
    return CliRunner().invoke(cli, list(args), **kwargs)


def one_document(text: str) -> dict[str, Any]:
    """The single JSON document ``text`` holds; fails if there is anything before or after it."""
    document, end = json.JSONDecoder().raw_decode(text.lstrip())
    assert text.lstrip()[end:].strip() == "", f"more than one document: {text!r}"
    assert isinstance(document, dict)
    return document


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home made by ``init`` (given --home after the command); the default home is one that does not exist."""
    monkeypatch.setenv("DICOMMAIL_HOME", str(tmp_path / "not-this-one"))
    path = tmp_path / "site"
    result = run("init", "--address", "imaging@hospital.example", "--home", str(path))
    assert result.exit_code == 0, result.output
    return path


def _add_transfer(home: Path, ident: int, set_id: str, status: str) -> None:
    """A transfer of 2 parts, both mails sent and still in the outbox, as the sender leaves it."""
    at = time.time() - 3600
    db = Database(home / "state.db")
    try:
        with db.transaction() as conn:
            conn.execute(
                "INSERT INTO transfers (id, set_id, recipient, study_uid, files, bytes, set_total, status, "
                "created_at, updated_at, first_sent_at, sent_at) "
                "VALUES (?, ?, 'reading@practice.example', '1.2.3', 4, 40960, 2, ?, ?, ?, ?, ?)",
                (ident, set_id, status, at, at, at + 1, at + 2),
            )
            for part in (1, 2):
                mail = home / f"t{ident}p{part}.eml"
                mail.write_text("x")
                conn.execute(
                    "INSERT INTO outbound_mails (transfer_id, set_part, message_id, path, size, status, sent_at) "
                    "VALUES (?, ?, ?, ?, 20480, 'sent', ?)",
                    (ident, part, f"<{set_id}.p{part}@hospital.example>", str(mail), at + part),
                )
    finally:
        db.close()


@pytest.fixture
def sender(home: Path) -> Path:
    """``home`` with a transfer on its way (1), a failed (2) and a delivered one (3)."""
    _add_transfer(home, 1, SENT, "sent")
    _add_transfer(home, 2, FAILED, "failed")
    _add_transfer(home, 3, DELIVERED, "delivered")
    return home


# -- --version -------------------------------------------------------------------------------------------


def test_version_prints_the_name_and_the_version() -> None:
    result = run("--version")
    assert result.exit_code == 0 and result.stdout == f"dicommail {dicommail.__version__}\n"


# -- --home after the command ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", [
    ["status", "--json"],
    ["status", "--json", "--failed"],
    ["keys", "list", "--json"],
    ["inbox", "--json"],
    ["quarantine", "list", "--json"],
    ["quarantine", "show", "mail-12", "--json"],  # a failure (exit 1), the same wherever --home is
    ["stats", "--json"],
], ids=lambda args: " ".join(args))
def test_home_after_the_command_works_as_before_it(sender: Path, args: list[str]) -> None:
    before = run("--home", str(sender), *args)
    assert before.exit_code in (0, 1) and "not a dicommail home" not in before.output, before.output
    for after in ([*args, "--home", str(sender)], [*args, f"--home={sender}"],
                  [args[0], "--home", str(sender), *args[1:]]):
        result = run(*after)
        assert (result.exit_code, result.stdout) == (before.exit_code, before.stdout), after


def test_home_after_the_command_is_used_not_the_default(sender: Path) -> None:
    # The default home ($DICOMMAIL_HOME) does not exist: a --home that was ignored would fail.
    assert run("status", "--json").exit_code == 1
    listing = one_document(run("status", "--json", "--home", str(sender)).stdout)
    assert {t["set_id"] for t in listing["transfers"]} == {DELIVERED, FAILED, SENT}


def test_the_environment_still_names_the_home_and_the_command_line_wins(
    sender: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOMMAIL_HOME", str(sender))
    assert len(one_document(run("status", "--json").stdout)["transfers"]) == 3
    monkeypatch.setenv("DICOMMAIL_HOME", str(tmp_path / "nowhere"))
    assert run("status", "--json").exit_code == 1
    assert run("status", "--json", "--home", str(sender)).exit_code == 0


def test_home_after_a_literal_double_dash_is_an_argument(sender: Path) -> None:
    result = run("--home", str(sender), "status", "--json", "--", "--home")
    document = one_document(result.stdout)
    assert result.exit_code == 1 and "no transfer '--home'" in document["error"]["message"]


@pytest.mark.parametrize("args", [
    ["--home", "{a}", "status", "--home", "{b}"],
    ["status", "--home", "{a}", "--home", "{b}"],
    ["--home", "{a}", "--home", "{b}", "status"],
    ["keys", "--home", "{a}", "list", "--home", "{b}"],
], ids=["root-and-command", "command-twice", "root-twice", "group-and-command"])
def test_two_different_homes_are_a_usage_error(home: Path, tmp_path: Path, args: list[str]) -> None:
    result = run(*(arg.format(a=home, b=tmp_path / "other") for arg in args))
    assert result.exit_code == 2 and "--home" in result.stderr and "given twice" in result.stderr
    assert result.stdout == ""


def test_the_same_home_twice_is_fine(home: Path) -> None:
    assert run("--home", str(home), "status", "--home", f"{home}/").exit_code == 0


def test_every_command_takes_home_and_says_so(home: Path) -> None:
    def walk(command: click.Command, path: list[str]) -> None:
        assert any("--home" in param.opts for param in command.params), path
        result = run(*path, "--help")
        assert result.exit_code == 0 and "--home DIRECTORY" in result.stdout, path
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                walk(sub, [*path, name])

    for name, command in cli.commands.items():
        walk(command, [name])


# -- usage errors: exit 2, and one JSON document with --json -----------------------------------------------

USAGE_ERRORS = [
    ["nosuch"],  # no such command
    ["keys", "nosuch"],  # ... in a group
    ["transfers", "nosuch"],
    ["quarantine", "nosuch"],
    ["constancy", "nosuch"],
    ["status", "--bogus"],  # unknown option
    ["init", "--bogus"],
    ["transfers", "retry"],  # missing argument
    ["quarantine", "show"],
    ["keys", "generate", "--name", "x", "--email", "x@y.example", "--algo", "dsa"],  # bad choice
    ["stats", "--by", "year"],
    ["status", "--since", "yesterday"],  # our own checks of a value
    ["constancy", "list", "--since", "yesterday"],
    ["stats", "--since", "last week"],
    ["send", "--to", "x@y.example", "--max-mail-size", "lots", "{home}"],
    ["quarantine", "purge", "mail-1", "--older-than", "3"],  # a usage error raised by the command
    ["manpage", "nosuch"],
]


def _args(home: Path, args: list[str]) -> list[str]:
    return ["--home", str(home), *(arg.format(home=home) for arg in args)]


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda args: " ".join(args))
def test_usage_errors_exit_2_with_the_text_on_stderr(home: Path, args: list[str]) -> None:
    result = run(*_args(home, args))
    assert result.exit_code == 2, result.output
    assert result.stdout == "" and "Error:" in result.stderr and "--help" in result.stderr


@pytest.mark.parametrize("args", USAGE_ERRORS, ids=lambda args: " ".join(args))
def test_usage_errors_with_json_are_one_document(home: Path, args: list[str]) -> None:
    result = run(*_args(home, [*args, "--json"]))
    assert result.exit_code == 2, result.output
    document = one_document(result.stdout)
    assert document["ok"] is False and set(document["error"]) == {"code", "message", "hint"}
    assert document["error"]["code"] == "usage" and document["error"]["message"]
    assert re.fullmatch(r"see 'dicommail( [a-z]+)* --help'", document["error"]["hint"])
    assert "Error:" in result.stderr  # what a person reads stays where it was


def test_a_group_without_its_command_is_a_usage_error(home: Path) -> None:
    for group in ("keys", "transfers", "quarantine", "constancy"):
        result = run("--home", str(home), group)
        assert result.exit_code == 2 and "Commands:" in result.output, group


def test_a_json_usage_error_names_the_problem(home: Path) -> None:
    error = one_document(run("--home", str(home), "status", "--json", "--since", "yesterday").stdout)["error"]
    assert "--since" in error["message"] and "'yesterday' is not a date" in error["message"]
    assert error["hint"] == "see 'dicommail status --help'"
    error = one_document(run("--home", str(home), "keys", "nosuch", "--json").stdout)["error"]
    assert error["message"] == "No such command 'nosuch'." and error["hint"] == "see 'dicommail keys --help'"


def test_json_after_a_double_dash_is_an_argument(home: Path) -> None:
    result = run("--home", str(home), "transfers", "nosuch", "--", "--json")
    assert result.exit_code == 2 and result.stdout == ""


def test_json_and_csv_together_is_one_usage_document(home: Path) -> None:
    result = run("--home", str(home), "stats", "--json", "--csv")
    assert result.exit_code == 2 and "exclude each other" in one_document(result.stdout)["error"]["message"]


# -- init --json -----------------------------------------------------------------------------------------


def test_init_json_names_the_config_and_the_next_steps(tmp_path: Path) -> None:
    path = tmp_path / "with space"
    result = run("init", "--json", "--address", "imaging@hospital.example", "--home", str(path))
    assert result.exit_code == 0, result.output
    document = one_document(result.stdout)
    assert document["ok"] is True and document["home"] == str(path)
    assert Path(document["config_file"]) == path / "dicommail.toml" and (path / "dicommail.toml").is_file()
    steps = document["next_steps"]
    assert isinstance(steps, list) and all(isinstance(step, str) for step in steps)
    assert "keys generate" in steps[0] and "imaging@hospital.example" in steps[0] and steps[-1].endswith("check")
    assert f"--home '{path}'" in steps[-1]  # quoted for the shell
    assert result.stderr == ""


def test_init_json_failure_is_one_document(home: Path) -> None:
    result = run("--home", str(home), "init", "--json")
    assert result.exit_code == 1
    document = one_document(result.stdout)
    assert document["ok"] is False and document["error"]["code"] == "config"
    assert "already exists" in document["error"]["message"] and "--force" in document["error"]["hint"]


def test_init_without_json_still_prints_the_steps(tmp_path: Path) -> None:
    result = run("--home", str(tmp_path / "site"), "init")
    assert result.exit_code == 0 and result.stdout == ""
    assert "next steps:" in result.stderr and "keys generate" in result.stderr


# -- transfers retry|cancel|delete --json ----------------------------------------------------------------


def test_transfers_json_on_success(sender: Path) -> None:
    base = ["--home", str(sender), "transfers"]
    cancelled = run(*base, "cancel", SENT, "--yes", "--json")
    assert cancelled.exit_code == 0, cancelled.output
    document = one_document(cancelled.stdout)
    assert document["ok"] is True and document["action"] == "cancel"
    assert (document["transfer"]["set_id"], document["transfer"]["status"]) == (SENT, "sent")  # as it was
    assert (document["mails_queued"], document["files_removed"]) == (0, 0)
    assert "patient_name" not in document["transfer"]

    retried = one_document(run(*base, "retry", FAILED, "--yes", "--json").stdout)
    assert retried["action"] == "retry" and retried["mails_queued"] == 2 and retried["transfer"]["status"] == "failed"

    deleted = one_document(run(*base, "delete", "3", "--yes", "--json").stdout)
    assert deleted["action"] == "delete" and deleted["files_removed"] == 2
    assert deleted["transfer"]["created_at"].endswith("+00:00")


@pytest.mark.parametrize(("args", "code", "message"), [
    (["cancel", SENT], "input", "not confirmed"),  # no terminal, no --yes
    (["cancel", DELIVERED, "--yes"], "state", "only active"),
    (["retry", SENT, "--yes"], "state", "only failed, expired or cancelled"),
    (["delete", "42", "--yes"], "state", "no transfer"),
], ids=["not-confirmed", "cancel-delivered", "retry-active", "delete-unknown"])
def test_transfers_json_on_failure(sender: Path, args: list[str], code: str, message: str) -> None:
    result = run("--home", str(sender), "transfers", *args, "--json")
    assert result.exit_code == 1, result.output
    document = one_document(result.stdout)
    assert document["ok"] is False and document["error"]["code"] == code and message in document["error"]["message"]
    # Nothing changed.
    states = {t["set_id"]: t["status"] for t in one_document(run("--home", str(sender), "status", "--json").stdout)[
        "transfers"]}
    assert states == {SENT: "sent", FAILED: "failed", DELIVERED: "delivered"}


def test_transfers_without_json_report_on_stderr(sender: Path) -> None:
    result = run("transfers", "cancel", "1", "--yes", "--home", str(sender))
    assert result.exit_code == 0 and result.stdout == "" and f"set {SENT} cancelled" in result.stderr


# -- shell completion ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shell", "marker"), [
    ("bash", "complete -o nosort -F _dicommail_completion dicommail"),
    ("zsh", "compdef _dicommail_completion dicommail"),
    ("fish", "complete --no-files --command dicommail"),
])
def test_completion_scripts(shell: str, marker: str) -> None:
    result = run(env={"_DICOMMAIL_COMPLETE": f"{shell}_source"})
    assert result.exit_code == 0 and marker in result.stdout


def test_completion_offers_commands_and_home_after_them() -> None:
    def complete(*words: str) -> list[str]:
        env = {"_DICOMMAIL_COMPLETE": "bash_complete", "COMP_WORDS": " ".join(["dicommail", *words]),
               "COMP_CWORD": str(len(words))}
        return run(env=env).stdout.split()

    assert complete("sta") == ["plain,stats", "plain,status"]
    assert "plain,--home" in complete("keys", "list", "--h")


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_the_bash_script_registers_the_completion() -> None:
    command = f'eval "$(_DICOMMAIL_COMPLETE=bash_source {sys.executable} -m dicommail)" && complete -p dicommail'
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, check=False)
    assert result.returncode == 0 and "_dicommail_completion" in result.stdout, result.stderr


# -- man pages -------------------------------------------------------------------------------------------

#: The roff requests a page may use; anything else starting a line would be text read as a request.
REQUESTS = {".TH", ".SH", ".TP", ".PP", ".B", ".nf", ".fi", ".nh"}


def _check_structure(text: str, name: str) -> None:
    lines = text.splitlines()
    assert lines[0].startswith(f'.TH "{name.upper().replace("-", chr(92) + "-")}" "1" ')
    sections = [line[4:] for line in lines if line.startswith(".SH ")]
    assert sections[:2] == ["NAME", "SYNOPSIS"] and "OPTIONS" in sections, sections
    for line in lines:
        if line.startswith((".", "'")):
            assert line.split(" ", 1)[0] in REQUESTS, line
    assert lines[lines.index(".SH NAME") + 1].startswith(name.replace("-", "\\-") + " \\- ")


def test_man_pages_have_the_structure_of_man_pages() -> None:
    pages = {page.name: page.text for page in render_pages(cli)}
    assert {"dicommail", "dicommail-status", "dicommail-keys", "dicommail-keys-list",
            "dicommail-transfers-retry", "dicommail-init"} <= set(pages)
    assert "dicommail-manpage" not in pages  # hidden, as in --help
    for name, text in pages.items():
        _check_structure(text, name)
    root = pages["dicommail"]
    for section in ("COMMANDS", "ENVIRONMENT", "EXIT STATUS", "SEE ALSO"):
        assert f".SH {section}" in root
    assert "\\fBdicommail\\-transfers\\fR(1)" in root
    retry = pages["dicommail-transfers-retry"]
    assert "\\fB\\-\\-json\\fR" in retry and "\\fB\\-\\-home\\fR \\fIDIRECTORY\\fR" in retry
    assert "\\fB\\-h\\fR, \\fB\\-\\-help\\fR" in retry
    assert ".B dicommail transfers retry\n[OPTIONS] IDENT" in retry


def test_manpage_command_prints_one_page_or_writes_all(home: Path, tmp_path: Path) -> None:
    printed = run("--home", str(home), "manpage", "keys", "list")
    assert printed.exit_code == 0 and printed.stdout.startswith('.TH "DICOMMAIL\\-KEYS\\-LIST"')
    output = tmp_path / "man1"
    written = run("--home", str(home), "manpage", "--output", str(output), "--json")
    assert written.exit_code == 0, written.output
    files = [Path(name) for name in one_document(written.stdout)["files"]]
    assert output / "dicommail.1" in files and output / "dicommail-keys-list.1" in files
    assert (output / "dicommail-keys-list.1").read_text() == printed.stdout
    assert (output / "dicommail.1").stat().st_mode & 0o777 == 0o644  # for every user, unlike the home


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db is not installed")
def test_man_renders_the_pages_without_warnings(tmp_path: Path) -> None:
    for page in render_pages(cli):
        path = tmp_path / page.file_name
        path.write_text(page.text)
        if page.name not in ("dicommail", "dicommail-status", "dicommail-keys"):
            continue
        result = subprocess.run(["man", "-l", str(path)], capture_output=True, text=True, check=False,
                                env={"MANWIDTH": "80", "MAN_KEEP_FORMATTING": "", "PATH": "/usr/bin:/bin",
                                     "MANROFFOPT": "-ww", "LC_ALL": "C.UTF-8"})
        assert result.returncode == 0 and "NAME" in result.stdout and "SYNOPSIS" in result.stdout, result.stderr
        assert result.stderr == ""
        assert max(len(line) for line in result.stdout.splitlines()) <= 80
    shown = subprocess.run(["man", "-l", str(tmp_path / "dicommail-status.1")], capture_output=True, text=True,
                           check=False, env={"MANWIDTH": "80", "PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"}).stdout
    assert "--since TEXT" in re.sub(".\b", "", shown)


_SLEEPY = """
import sys, time
from pathlib import Path
import click
from dicommail.cli import cli
from dicommail.cli.render import handle_errors
from dicommail.store.files import scratch_dir

@click.command("sleepy")
@click.option("--json", "as_json", is_flag=True)
@handle_errors
def sleepy(as_json: bool) -> None:
    with scratch_dir(Path(sys.argv[1]), ".dicommail-work-") as work:
        (work / "decrypted.dcm").write_text("plaintext")
        print("ready", flush=True)
        time.sleep(60)

cli.add_command(sleepy)
cli(["sleepy", *sys.argv[2:]], prog_name="dicommail")
"""


@pytest.mark.parametrize("as_json", [False, True])
def test_sigterm_unwinds_a_command_and_removes_its_plaintext(tmp_path: Path, as_json: bool) -> None:
    # cron's `timeout` and systemd send SIGTERM: scratch directories with decrypted data must go.
    child = subprocess.Popen([sys.executable, "-c", _SLEEPY, str(tmp_path), *(["--json"] if as_json else [])],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.stdout is not None
    assert child.stdout.readline() == "ready\n"
    child.terminate()
    out, err = child.communicate(timeout=30)
    assert child.returncode == 143, err
    assert list(tmp_path.iterdir()) == []
    assert "terminated" in err
    if as_json:
        assert json.loads(out)["error"]["code"] == "terminated"


def test_receive_json_without_once_is_a_usage_error(tmp_path: Path) -> None:
    # The daemon prints no document: --json alone printed nothing, exit 0.
    (tmp_path / "dicommail.toml").touch()
    result = run("--home", str(tmp_path), "receive", "--json")
    assert result.exit_code == 2
    assert json.loads(result.stdout)["error"]["code"] == "usage"


def test_an_interrupted_cycle_is_not_ok() -> None:
    from dicommail.receiver.daemon import CycleReport

    report = CycleReport(interrupted=True)
    assert not report.ok and report.to_json()["interrupted"] is True
