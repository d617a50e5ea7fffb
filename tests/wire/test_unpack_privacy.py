"""No patient data on the terminal: ``unpack`` names a file by its place in the set, never by its name."""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

from click.testing import CliRunner

from dicommail.cli import cli
from tests.wire.conftest import PRACTICE, Site
from tests.wire.forge import dicom_part, encrypted_mail, inner_entity

HOSTILE = "../Müller^Jürgen PID-4711.dcm"
PIECES = ("Müller", "Jürgen", "Muller", "Jurgen", "PID", "4711", "M_ller")


def _rfc2231_part(data: bytes, filename: str) -> bytes:
    """A DICOM part whose file name is RFC 2231 encoded (how non-ASCII names travel)."""
    plain = dicom_part(data, "x")
    encoded = "utf-8''" + quote(filename, safe="")
    return plain.replace(b'name="x"', f"name*={encoded}".encode()).replace(
        b'filename="x"', f"filename*={encoded}".encode()
    )


def test_unpack_warnings_quote_positions_not_file_names(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    data = [p.read_bytes() for p in ct_study[:3]]
    inner = inner_entity(
        [dicom_part(data[0], "fine.dcm"), _rfc2231_part(data[1], HOSTILE), dicom_part(data[2], "/tmp/PID-4711.dcm")],
        {"X-TELEMEDICINE-SETID": "2.25.4242", "X-TELEMEDICINE-SETPART": "1", "X-TELEMEDICINE-SETTOTAL": "1"},
    )
    mail = encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / "names.eml")
    runner = CliRunner()
    home = ["--home", str(practice_site.home)]

    shown = runner.invoke(cli, [*home, "unpack", str(mail), "-o", str(tmp_path / "in")])
    assert shown.exit_code == 0, shown.output
    assert "set 2.25.4242 part 1 file 2" in shown.stderr and "set 2.25.4242 part 1 file 3" in shown.stderr
    assert "file 1" not in shown.stderr  # its name was safe: nothing to say
    as_json = runner.invoke(cli, [*home, "unpack", str(mail), "-o", str(tmp_path / "again"), "--json"])
    assert as_json.exit_code == 0, as_json.output
    (outcome,) = json.loads(as_json.stdout)["sets"]
    renamed = [w for w in outcome["warnings"] if "file name" in w]
    assert [w.partition(":")[0] for w in renamed] == ["set 2.25.4242 part 1 file 2", "set 2.25.4242 part 1 file 3"]
    for output in (shown.stdout, shown.stderr, as_json.stdout, as_json.stderr):
        assert not any(piece in output for piece in PIECES), output

    # The receipt beside the files may name them: the files hold the same data anyway.
    receipt = json.loads((tmp_path / "in" / "2.25.4242" / "dicommail-set.json").read_text(encoding="utf-8"))
    assert [f.get("name_in_mail") for f in receipt["files"]] == [None, HOSTILE, "/tmp/PID-4711.dcm"]
    assert all("/" not in f["name"] for f in receipt["files"])
