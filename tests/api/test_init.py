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
