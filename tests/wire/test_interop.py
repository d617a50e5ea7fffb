"""What pack writes is readable by independent tools: gpg, munpack, reformime."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from dicommail.dicom import scan
from tests.wire.conftest import PRACTICE, Site

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("gpg", "munpack", "reformime")),
    reason="needs gpg, munpack (mpack) and reformime (maildrop): run .ci/setup",
)


def _gpg_decrypt(site: Site, armored: Path, out: Path) -> str:
    """Decrypt with the plain gpg CLI; return its status lines."""
    result = subprocess.run(
        [
            "gpg",
            "--homedir",
            str(site.keyring.home),
            "--batch",
            "--status-fd",
            "1",
            "--yes",
            "--output",
            str(out),
            "--decrypt",
            str(armored),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _reformime_extract(mail: Path, out_dir: Path) -> list[Path]:
    """Let reformime pull every part with a filename out of ``mail``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sections = subprocess.run(["reformime", "-i"], stdin=mail.open("rb"), capture_output=True, check=True).stdout
    extracted = []
    for line in sections.decode().splitlines():
        if line.startswith("section: "):
            section = line.split(": ", 1)[1]
            info = subprocess.run(
                ["reformime", "-i", "-s", section], stdin=mail.open("rb"), capture_output=True, check=True
            ).stdout.decode()
            if "content-name: " not in info and "content-disposition-filename" not in info:
                continue
            name = next(
                (
                    x.split(": ", 1)[1]
                    for x in info.splitlines()
                    if x.startswith(("content-name: ", "content-disposition-filename: "))
                ),
                section,
            )
            target = out_dir / name
            with target.open("wb") as handle:
                subprocess.run(["reformime", "-e", "-s", section], stdin=mail.open("rb"), stdout=handle, check=True)
            extracted.append(target)
    return extracted


def test_gpg_and_reformime_read_our_mails(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    packed = hospital_site.packer(PRACTICE, max_mail_size=3 * 1024**2).pack(scan(ct_study).files, tmp_path / "out")
    originals = {p.name: p.read_bytes() for p in ct_study}
    seen: dict[str, bytes] = {}
    for number, mail in enumerate(packed.mails):
        outer = _reformime_extract(mail.path, tmp_path / f"outer{number}")
        [armored] = [p for p in outer if p.name == "encrypted.asc"]
        inner = tmp_path / f"inner{number}.eml"
        status = _gpg_decrypt(practice_site, armored, inner)
        assert "[GNUPG:] GOODSIG" in status
        assert "[GNUPG:] VALIDSIG" in status and hospital_site.fingerprint in status
        for part in _reformime_extract(inner, tmp_path / f"parts{number}"):
            seen[part.name] = part.read_bytes()
    for name, data in originals.items():
        assert seen[name] == data
    assert "dicommail-manifest.json" in seen


def test_munpack_reassembles_our_fragments(
    hospital_site: Site, practice_site: Site, multiframe: Path, tmp_path: Path
) -> None:
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2, compression_level=0).pack(
        scan([multiframe]).files, tmp_path / "out"
    )
    fragments = [m.path for m in packed.mails if m.fragment]
    assert len(fragments) > 2
    work = tmp_path / "munpack"
    work.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path), "HOME": str(tmp_path)}
    for fragment in reversed(fragments):
        subprocess.run(["munpack", "-q", "-C", str(work), str(fragment)], env=env, check=True, capture_output=True)
    armored = work / "encrypted.asc"
    assert armored.exists(), sorted(p.name for p in work.iterdir())
    inner = tmp_path / "inner.eml"
    status = _gpg_decrypt(practice_site, armored, inner)
    assert hospital_site.fingerprint in status
    parts = _reformime_extract(inner, tmp_path / "parts")
    [dicom] = [p for p in parts if p.name == multiframe.name]
    assert dicom.read_bytes() == multiframe.read_bytes()
