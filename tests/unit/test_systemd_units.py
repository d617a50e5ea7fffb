"""The systemd units of examples/systemd: valid, hardened, and running what the CLI offers.

``systemd-analyze`` works on unit files without systemd running (as in a
container).  The units call /opt/dicommail/bin/dicommail (docs/install.md);
``verify`` insists that ExecStart's program exists, so it checks copies
that call this test's Python instead.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

UNIT_DIR = Path(__file__).resolve().parents[2] / "examples" / "systemd"
SERVICES = sorted(path.name for path in UNIT_DIR.glob("*.service"))
TIMERS = sorted(path.name for path in UNIT_DIR.glob("*.timer"))
PROGRAM = "/opt/dicommail/bin/dicommail"
HOME = "/var/lib/dicommail"
# systemd-analyze security's ratings, best first; the issue allows up to MEDIUM.
ACCEPTED_RATINGS = ("PERFECT", "SAFE", "OK", "MEDIUM")
SANDBOX_MARK = "# --- Sandbox:"

needs_systemd_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                           reason="systemd-analyze is not installed")


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True,
                          env={**os.environ, "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""})


def service_section(name: str) -> list[str]:
    """The [Service] lines of a unit, comments and blank lines dropped."""
    lines: list[str] = []
    section = ""
    for line in (UNIT_DIR / name).read_text().splitlines():
        if line.startswith("["):
            section = line
        elif section == "[Service]" and line.strip() and not line.startswith("#"):
            lines.append(line)
    return lines


def exec_start(name: str) -> list[str]:
    return next(shlex.split(line.partition("=")[2]) for line in service_section(name)
                if line.startswith("ExecStart="))


@pytest.fixture
def runnable_units(tmp_path: Path) -> Path:
    """Copies of all units whose ExecStart names a program that exists here."""
    for path in UNIT_DIR.iterdir():
        if path.suffix in (".service", ".timer"):
            (tmp_path / path.name).write_text(path.read_text().replace(PROGRAM, sys.executable))
    return tmp_path


def test_units_are_there() -> None:
    assert {"dicommail-gateway.service", "dicommail-receive.service", "dicommail-receive-once.service",
            "dicommail-send-pending.service", "dicommail-constancy-daily.service",
            "dicommail-constancy-monthly.service"} <= set(SERVICES)
    for timer in TIMERS:
        assert timer.replace(".timer", ".service") in SERVICES


@needs_systemd_analyze
@pytest.mark.parametrize("name", SERVICES + TIMERS)
def test_verify_passes(runnable_units: Path, name: str) -> None:
    result = analyze("verify", "--man=no", str(runnable_units / name))
    # verify exits 0 on unknown or misspelt settings, which it only reports:
    # any message about our files counts as a failure.
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if str(runnable_units) in line or "dicommail" in line]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


def exposure(unit: Path) -> tuple[float, str]:
    result = analyze("security", "--offline=yes", "--no-pager", str(unit))
    assert result.returncode == 0, result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+) (\w+)", result.stdout)
    assert match, result.stdout
    return float(match[1]), match[2]


@needs_systemd_analyze
@pytest.mark.parametrize("name", SERVICES)
def test_exposure_at_most_medium(name: str) -> None:
    score, rating = exposure(UNIT_DIR / name)
    print(f"{name}: {score} {rating}")
    assert rating in ACCEPTED_RATINGS, f"{name}: {score} {rating}"


@needs_systemd_analyze
def test_gateway_on_port_104_still_at_most_medium(tmp_path: Path) -> None:
    """The documented option for ports below 1024, uncommented, keeps the rating."""
    text = (UNIT_DIR / "dicommail-gateway.service").read_text()
    enabled = re.sub(r"^# ((?:CapabilityBoundingSet|AmbientCapabilities)=CAP_NET_BIND_SERVICE)$", r"\1",
                     text, flags=re.MULTILINE)
    assert enabled.count("=CAP_NET_BIND_SERVICE\n") == 2 and enabled != text
    unit = tmp_path / "dicommail-gateway.service"
    unit.write_text(enabled)
    _, rating = exposure(unit)
    assert rating in ACCEPTED_RATINGS


def sandbox(name: str) -> list[str]:
    text = (UNIT_DIR / name).read_text()
    assert SANDBOX_MARK in text, f"{name} has no sandbox block"
    block = text.split(SANDBOX_MARK, 1)[1].split("\n[", 1)[0]
    return [line for line in block.splitlines()[1:] if line.strip() and not line.startswith("#")]


def test_every_service_has_the_same_sandbox() -> None:
    """One block, copied: a setting added to one unit and forgotten in another shows here."""
    reference = sandbox("dicommail-gateway.service")
    for name in SERVICES:
        assert sandbox(name) == reference, name
    settings = dict(line.split("=", 1) for line in reference if not line.startswith("SystemCallFilter="))
    # gpg talks to its agent over a Unix socket in the keyring.
    assert "AF_UNIX" in settings["RestrictAddressFamilies"].split()
    assert settings["CapabilityBoundingSet"] == ""
    assert settings["StateDirectory"] == "dicommail" and settings["StateDirectoryMode"] == "0700"
    assert settings["UMask"] == "0077"
    for name in SERVICES:
        lines = service_section(name)
        assert "User=dicommail" in lines and "Group=dicommail" in lines, name


@pytest.mark.parametrize("name", SERVICES)
def test_exec_start_is_a_valid_command(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What each unit runs parses as a dicommail command line: command, options and their values."""
    from dicommail.cli import cli

    argv = exec_start(name)
    assert argv[:3] == [PROGRAM, "--home", HOME], argv
    command: click.Command = cli
    for word in argv[3:]:
        if isinstance(command, click.Group) and word in command.commands:
            command = command.commands[word]
    assert command is not cli, argv
    # The command itself does not run (no mail server here): click only
    # parses and converts the arguments and hands them over.
    received: list[dict[str, Any]] = []
    monkeypatch.setattr(command, "callback", lambda **params: received.append(params))
    (tmp_path / "dicommail.toml").touch()
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), *argv[3:]])
    assert result.exit_code == 0 and len(received) == 1, result.output


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("systemd-sysusers") is None,
                    reason="needs root and systemd-sysusers/systemd-tmpfiles")
def test_sysusers_and_tmpfiles_make_user_and_private_home(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    subprocess.run(["systemd-sysusers", f"--root={tmp_path}", str(UNIT_DIR / "dicommail.sysusers")],
                   check=True, capture_output=True)
    entry = next(line.split(":") for line in (tmp_path / "etc" / "passwd").read_text().splitlines()
                 if line.startswith("dicommail:"))
    assert entry[5] == HOME
    subprocess.run(["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(UNIT_DIR / "dicommail.tmpfiles")],
                   check=True, capture_output=True)
    home = (tmp_path / HOME.lstrip("/")).stat()
    assert (home.st_mode & 0o777, home.st_uid, home.st_gid) == (0o700, int(entry[2]), int(entry[3]))
