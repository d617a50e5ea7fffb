"""``dicommail pack`` and ``unpack`` as a user runs them: exit codes, messages, JSON."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from dicommail.cli import cli
from tests.wire.conftest import PRACTICE, Site


def _run(site: Site, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["--home", str(site.home), *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_pack_then_unpack_with_json(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], mr_study: list[Path], tmp_path: Path
) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image")
    code, out, err = _run(
        hospital_site,
        "pack",
        str(ct_study[0].parent),
        str(mr_study[0].parent),
        str(junk),
        "--to",
        PRACTICE,
        "--max-mail-size",
        "3M",
        "-o",
        str(tmp_path / "out"),
        "--json",
    )
    assert code == 0, err
    assert "notes.txt" in err and "skipped" in err
    sets = json.loads(out)["sets"]
    assert len(sets) == 2 and all(s["set_id"].startswith("2.25.") for s in sets)
    mails = sorted(str(p) for p in (tmp_path / "out").glob("*.eml"))
    assert len(mails) == sum(len(s["mails"]) for s in sets)

    code, out, err = _run(practice_site, "unpack", *mails, "-o", str(tmp_path / "in"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["ok"] and {s["set_id"] for s in result["sets"]} == {s["set_id"] for s in sets}
    assert sum(s["dicom_files"] for s in result["sets"]) == len(ct_study) + len(mr_study)

    # The table, in 80 columns: every set ID whole on one line, no line wider.
    result_80 = CliRunner().invoke(cli, ["--home", str(practice_site.home), "unpack", *mails, "-o",
                                         str(tmp_path / "in80")], catch_exceptions=False, env={"COLUMNS": "80"})
    assert result_80.exit_code == 0, result_80.stderr
    lines = result_80.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), lines
    assert all(any(s["set_id"] in line for line in lines) for s in sets)


def test_unpack_incomplete_set_fails_with_missing_parts(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    code, out, err = _run(
        hospital_site,
        "pack",
        *map(str, ct_study),
        "--to",
        PRACTICE,
        "--max-mail-size",
        "1M",
        "-o",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    assert "2.25." in out
    mails = sorted(str(p) for p in (tmp_path / "out").glob("*.eml"))
    code, out, err = _run(practice_site, "unpack", *mails[1:], "-o", str(tmp_path / "in"))
    assert code == 1
    assert "missing: 1" in err and "hint:" in err
    assert not (tmp_path / "in").exists() or not any((tmp_path / "in").iterdir())


def test_pack_refuses_an_unknown_recipient(hospital_site: Site, ct_study: list[Path], tmp_path: Path) -> None:
    code, _, err = _run(hospital_site, "pack", str(ct_study[0]), "--to", "nobody@nowhere.test", "-o", str(tmp_path))
    assert code == 1
    assert "nobody@nowhere.test" in err and "hint:" in err
    assert not list(tmp_path.glob("*.eml"))


def test_pack_nothing_dicom(hospital_site: Site, tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("x")
    code, _, err = _run(hospital_site, "pack", str(tmp_path), "--to", PRACTICE, "-o", str(tmp_path / "o"))
    assert code == 1 and "no DICOM files" in err


def test_init_writes_a_valid_config(tmp_path: Path) -> None:
    home = tmp_path / "home"
    runner = CliRunner()
    result = runner.invoke(cli, ["--home", str(home), "init", "--address", "a@b.test"])
    assert result.exit_code == 0, result.output
    assert 'address = "a@b.test"' in (home / "dicommail.toml").read_text()
    again = runner.invoke(cli, ["--home", str(home), "init"])
    assert again.exit_code == 1 and "already exists" in again.stderr
    (home / "dicommail.toml").write_text("[packing]\nmax_mail_size = 'huge'\n")
    broken = runner.invoke(cli, ["--home", str(home), "pack", str(home), "--to", "x@y.test", "-o", str(tmp_path)])
    assert broken.exit_code == 1 and "max_mail_size" in broken.stderr
