"""Editing dicommail.toml in place: comments and other settings stay, nothing broken is ever written."""

from __future__ import annotations

import stat
import tomllib
from pathlib import Path

import pytest

from dicommail.config import load_config, render_template
from dicommail.config_edit import set_settings, toml_string
from dicommail.errors import ConfigError

FPR = "1F5F96E697DB409757EEA95F32945836E0DFA059"


def home_with(tmp_path: Path, text: str) -> Path:
    (tmp_path / "dicommail.toml").write_text(text, encoding="utf-8")
    return tmp_path


def test_the_template_keeps_every_comment_and_setting(tmp_path: Path) -> None:
    template = render_template("site@site.test")
    home = home_with(tmp_path, template)
    updated = set_settings(load_config(home), "identity", {"key": FPR, "passphrase_file": "passphrase"})
    assert updated.identity.key == FPR and updated.identity.passphrase_file == "passphrase"
    text = (home / "dicommail.toml").read_text(encoding="utf-8")
    expected = template.replace('\nkey = ""\n', f'\nkey = "{FPR}"\n', 1).replace(
        '\npassphrase_file = ""\n', '\npassphrase_file = "passphrase"\n', 1
    )
    assert text == expected
    assert stat.S_IMODE((home / "dicommail.toml").stat().st_mode) == 0o600
    assert load_config(home) == updated
    assert [p.name for p in home.iterdir()] == ["dicommail.toml"]  # no temporary file left


def test_trailing_comments_commented_defaults_and_missing_lines(tmp_path: Path) -> None:
    home = home_with(tmp_path, (
        "# my site\n"
        "[identity]\n"
        'address = "a@a.test"  # who we are\n'
        'key = "OLD" # set by hand\n'
        '# passphrase_file = ""\n'
        "\n"
        "[smtp]\n"
        'host = "mail.example"\n'
    ))
    set_settings(load_config(home), "identity", {"key": FPR, "passphrase_file": "p w"})
    assert (home / "dicommail.toml").read_text() == (
        "# my site\n"
        "[identity]\n"
        'address = "a@a.test"  # who we are\n'
        f'key = "{FPR}" # set by hand\n'
        'passphrase_file = "p w"\n'
        "\n"
        "[smtp]\n"
        'host = "mail.example"\n'
    )
    updated = set_settings(load_config(home), "identity", {"passphrase_file": "x"})
    assert updated.identity.passphrase_file == "x" and updated.smtp.host == "mail.example"

    # A setting that is nowhere in its section goes right under the header.
    (tmp_path / "two").mkdir()
    home2 = home_with(tmp_path / "two", "[identity]\n[smtp]\n")
    set_settings(load_config(home2), "identity", {"key": FPR})
    assert (home2 / "dicommail.toml").read_text() == f'[identity]\nkey = "{FPR}"\n[smtp]\n'


def test_an_empty_file_gets_the_section(tmp_path: Path) -> None:
    home = home_with(tmp_path, "")
    updated = set_settings(load_config(home), "identity", {"key": FPR, "passphrase_file": ""})
    assert (home / "dicommail.toml").read_text() == f'[identity]\nkey = "{FPR}"\npassphrase_file = ""\n'
    assert updated.identity.key == FPR
    home_with(tmp_path, '[smtp]\nhost = "x"\n\n\n')
    set_settings(load_config(home), "identity", {"key": FPR})
    assert (home / "dicommail.toml").read_text() == f'[smtp]\nhost = "x"\n\n[identity]\nkey = "{FPR}"\n'


def test_odd_values_round_trip_and_line_endings_stay(tmp_path: Path) -> None:
    odd = 'C:\\keys\\"site"\tpass\x7f'
    assert tomllib.loads(f"v = {toml_string(odd)}")["v"] == odd
    home = tmp_path
    (home / "dicommail.toml").write_bytes(b'[identity]\r\nkey = ""\r\n')
    assert set_settings(load_config(home), "identity", {"key": odd}).identity.key == odd
    assert (home / "dicommail.toml").read_bytes() == b'[identity]\r\nkey = ' + toml_string(odd).encode() + b"\r\n"


@pytest.mark.parametrize(
    "text",
    [
        'identity = { address = "a@a.test" }\n',  # an inline table cannot take a line
        'identity.address = "a@a.test"\n',  # nor can dotted keys at the top
        '[identity]\nkey = """\nmulti\n"""\n',  # a multi-line string
    ],
)
def test_what_a_line_edit_cannot_follow_is_left_alone(tmp_path: Path, text: str) -> None:
    home = home_with(tmp_path, text)
    with pytest.raises(ConfigError) as refused:
        set_settings(load_config(home), "identity", {"key": FPR})
    assert f'key = "{FPR}"' in refused.value.hint and "by hand" in refused.value.hint
    assert (home / "dicommail.toml").read_text() == text
    assert [p.name for p in home.iterdir()] == ["dicommail.toml"]


def test_an_invalid_result_is_never_written(tmp_path: Path) -> None:
    home = home_with(tmp_path, '[identity]\naddress = "a@a.test"\n')
    with pytest.raises(ConfigError, match="not a mail address"):
        set_settings(load_config(home), "identity", {"address": "nobody"})
    assert (home / "dicommail.toml").read_text() == '[identity]\naddress = "a@a.test"\n'


def test_a_symlinked_config_is_edited_where_it_lives(tmp_path: Path) -> None:
    managed = tmp_path / "managed.toml"
    managed.write_text('[identity]\nkey = ""\n')
    home = tmp_path / "home"
    home.mkdir()
    (home / "dicommail.toml").symlink_to(managed)
    set_settings(load_config(home), "identity", {"key": FPR})
    assert (home / "dicommail.toml").is_symlink()
    assert managed.read_text() == f'[identity]\nkey = "{FPR}"\n'
