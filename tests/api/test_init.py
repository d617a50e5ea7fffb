"""init validates before it writes, and says what to do next."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import dicommail
from dicommail.cli import cli


def test_a_bad_address_leaves_no_file_behind(tmp_path: Path) -> None:
    home = tmp_path / "site"
    with pytest.raises(dicommail.ConfigError, match="not a mail address"):
        dicommail.Site.init(home, "not an address")
    assert not home.exists()
    result = CliRunner().invoke(cli, ["--home", str(home), "init", "--address", "still not one"])
    assert result.exit_code == 1 and "not a mail address" in result.output
    assert not (home / "dicommail.toml").exists()


def test_init_writes_a_private_config_and_names_the_next_steps(tmp_path: Path) -> None:
    home = tmp_path / "site"
    result = CliRunner().invoke(cli, ["--home", str(home), "init", "--address", "imaging@hospital.example"])
    assert result.exit_code == 0, result.output
    assert (home / "dicommail.toml").stat().st_mode & 0o077 == 0
    assert "next steps" in result.output and "keys generate" in result.output and "check" in result.output
    assert dicommail.Site.open(home).config.identity.address == "imaging@hospital.example"


@pytest.mark.parametrize("args", [
    ["status"], ["inbox"], ["quarantine", "list"], ["check"], ["keys", "list"], ["stats"],
    ["receive", "--once"], ["cleanup", "--dry-run"], ["transfers", "retry", "1"],
])
@pytest.mark.parametrize("made", [False, True], ids=["missing", "empty"])
def test_every_command_but_init_refuses_a_home_without_config(tmp_path: Path, args: list[str], made: bool) -> None:
    home = tmp_path / "typo"
    if made:
        home.mkdir()
    result = CliRunner().invoke(cli, ["--home", str(home), *args])
    assert result.exit_code == 1, result.output
    assert "is not a dicommail home" in result.output and "init" in result.output
    # Nothing is created there: no state.db, no spool, no keyring.
    assert (list(home.iterdir()) == []) if made else not home.exists()


def test_a_wrong_home_is_one_json_document(tmp_path: Path) -> None:
    import json

    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "typo"), "status", "--json"])
    document = json.loads(result.stdout)
    assert result.exit_code == 1 and document["ok"] is False and "not a dicommail home" in document["error"]["message"]


def test_the_library_refuses_it_too(tmp_path: Path) -> None:
    with pytest.raises(dicommail.ConfigError, match="not a dicommail home"):
        dicommail.Site.open(tmp_path)
    assert list(tmp_path.iterdir()) == []
