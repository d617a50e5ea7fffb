"""Private files: the home, the state and the spool are readable by this user only, whatever the umask."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from dicommail.cli.main import cli
from dicommail.store.files import SPOOL_FOLDERS, atomic_writer, make_private, open_private, pid_lock, scratch_dir


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@contextlib.contextmanager
def umask(value: int) -> Iterator[None]:
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture
def open_home(tmp_path: Path) -> Path:
    """A home as a careless setup leaves it: made with umask 022, everything readable by others."""
    home = tmp_path / "home"
    with umask(0o022):
        home.mkdir(mode=0o755)
        (home / "dicommail.toml").write_text("")
        for name in SPOOL_FOLDERS:
            (home / "spool" / name).mkdir(parents=True)
        (home / "spool" / "parts" / "decoded.part").write_bytes(b"DICM")
        sqlite3.connect(home / "state.db").close()
    assert mode(home) == 0o755 and mode(home / "state.db") == 0o644 and mode(home / "spool" / "inbox") == 0o755
    return home


def test_cli_makes_an_existing_open_home_private(open_home: Path) -> None:
    with umask(0o022):
        result = CliRunner().invoke(cli, ["--home", str(open_home), "status", "--json"])
        assert result.exit_code == 0, result.output
        # The CLI's umask does not outlive the command for callers in-process.
        assert os.umask(0o022) == 0o022
    assert mode(open_home) == 0o700
    assert mode(open_home / "dicommail.toml") == 0o600
    assert mode(open_home / "state.db") == 0o600
    assert mode(open_home / "spool") == 0o700
    for name in SPOOL_FOLDERS:
        assert mode(open_home / "spool" / name) == 0o700, name
    # Deeper files are behind a private folder already.
    assert mode(open_home / "spool" / "parts" / "decoded.part") == 0o644


def test_cli_creates_what_is_new_private(tmp_path: Path) -> None:
    home = tmp_path / "new"
    with umask(0o022):
        runner = CliRunner()
        assert runner.invoke(cli, ["--home", str(home), "init"]).exit_code == 0
        result = runner.invoke(cli, ["--home", str(home), "status", "--json"])
        assert result.exit_code == 0, result.output
    assert mode(home) == 0o700 and mode(home / "dicommail.toml") == 0o600
    created = [home / "state.db", *home.glob("state.db-*")]
    assert created and all(mode(p) == 0o600 for p in created), [(p.name, oct(mode(p))) for p in created]


def test_init_fixes_an_existing_open_home(tmp_path: Path) -> None:
    home = tmp_path / "made-by-hand"
    with umask(0o022):
        home.mkdir(mode=0o755)
        assert CliRunner().invoke(cli, ["--home", str(home), "init"]).exit_code == 0
    assert mode(home) == 0o700 and mode(home / "dicommail.toml") == 0o600


def test_file_helpers_are_private_whatever_the_umask(tmp_path: Path) -> None:
    with umask(0o022):
        with atomic_writer(tmp_path / "written.bin") as handle:
            handle.write(b"x")
        with scratch_dir(tmp_path, ".work-") as scratch:
            assert mode(scratch) == 0o700
            with open_private(scratch / "part") as handle:
                handle.write(b"DICM")
            assert mode(scratch / "part") == 0o600
        loose = tmp_path / "loose"
        loose.write_bytes(b"old")
        assert mode(loose) == 0o644
        with open_private(loose) as handle:
            handle.write(b"new")
        with pid_lock(tmp_path / "daemon.lock") as locked:
            assert locked
    assert mode(tmp_path / "written.bin") == 0o600
    assert mode(loose) == 0o600 and loose.read_bytes() == b"new"
    assert mode(tmp_path / "daemon.lock") == 0o600


def test_make_private_leaves_links_and_missing_paths_alone(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    target.chmod(0o644)
    link = tmp_path / "link"
    link.symlink_to(target)
    assert not make_private(link) and mode(target) == 0o644
    assert not make_private(tmp_path / "missing")
    executable = tmp_path / "tool"
    executable.write_bytes(b"")
    executable.chmod(0o755)
    assert make_private(executable) and mode(executable) == 0o700
    assert not make_private(executable)
