"""Pack and unpack against real GnuPG: sets, fragments, notes, attachments, any order."""

from __future__ import annotations

import json
import random
from pathlib import Path

from dicommail.dicom import scan
from dicommail.wire.unpack import unpack_files
from tests.wire.conftest import PRACTICE, Site

MAX = 1024**3


def _files(paths: list[Path]) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in paths}


def test_study_round_trip_in_any_order_with_duplicates(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    report_pdf = tmp_path / "report.pdf"
    report_pdf.write_bytes(b"%PDF-1.4 not really a report\n")
    packer = hospital_site.packer(
        PRACTICE, max_mail_size=2 * 1024**2, note="Bitte Befund bis 14 Uhr – Dr. Ärztin", attachments=(report_pdf,)
    )
    packed = packer.pack(scan(ct_study).files, tmp_path / "out")
    assert packed.set_total >= 2
    assert all(m.size <= 2 * 1024**2 for m in packed.mails)
    assert all(m.fragment == 0 for m in packed.mails)
    mails = [m.path for m in packed.mails]
    shuffled = mails + mails[:2]
    random.Random(3).shuffle(shuffled)

    report = unpack_files(shuffled, practice_site.keyring, tmp_path / "in", max_output=MAX)
    assert report.ok, (report.rejected, report.sets)
    [outcome] = report.sets
    assert outcome.set_id == packed.set_id
    assert outcome.dicom_files == 20 and outcome.other_files == 1
    assert outcome.signer == hospital_site.fingerprint
    assert outcome.directory is not None
    received = {p.name: p.read_bytes() for p in outcome.directory.iterdir()}
    for name, data in _files(ct_study).items():
        assert received[name] == data
    assert received["report.pdf"] == report_pdf.read_bytes()
    assert "14 Uhr – Dr. Ärztin" in received["dicommail-note.txt"].decode()
    receipt = json.loads(received["dicommail-set.json"])
    assert receipt["set_id"] == packed.set_id and len(receipt["files"]) == 21
    # Nothing else was left behind in the output directory.
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == [packed.set_id]


def test_huge_file_is_fragmented_and_reassembled(
    hospital_site: Site, practice_site: Site, multiframe: Path, mr_study: list[Path], tmp_path: Path
) -> None:
    limit = 1024**2
    packer = hospital_site.packer(PRACTICE, max_mail_size=limit, compression_level=0)
    packed = packer.pack(scan([multiframe]).files, tmp_path / "out")
    fragments = [m for m in packed.mails if m.fragment]
    assert len(fragments) >= 5 and all(m.size <= limit for m in packed.mails)
    report = unpack_files(
        list(reversed([m.path for m in packed.mails])), practice_site.keyring, tmp_path / "in", max_output=MAX
    )
    assert report.ok, (report.rejected, report.sets)
    assert report.sets[0].directory is not None
    assert (report.sets[0].directory / multiframe.name).read_bytes() == multiframe.read_bytes()


def test_several_studies_and_emergency_headers(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], mr_study: list[Path], tmp_path: Path
) -> None:
    packer = hospital_site.packer(PRACTICE, emergency=True, workers=2)
    studies = scan([*ct_study[:3], *mr_study]).studies()
    packed = [packer.pack(files, tmp_path / "out") for files in studies.values()]
    assert len(packed) == 2
    head = packed[0].mails[0].path.read_bytes().split(b"\r\n\r\n", 1)[0]
    assert b"Subject: EMERGENCY: DICOM-Mail " in head
    assert b"X-Priority: 1 (Highest)" in head and b"Importance: high" in head
    report = unpack_files(
        [m.path for p in packed for m in p.mails], practice_site.keyring, tmp_path / "in", max_output=MAX
    )
    assert report.ok and len(report.sets) == 2


def test_compressed_samples_travel_byte_identical(hospital_site: Site, practice_site: Site, tmp_path: Path) -> None:
    from dicommail.samples import pydicom_sample

    samples = [
        pydicom_sample(n) for n in ("JPEG-lossy.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm")
    ]
    scanned = scan(samples)
    assert len(scanned.files) == len(samples), scanned.skipped
    packer = hospital_site.packer(PRACTICE)
    mails = [m.path for files in scanned.studies().values() for m in packer.pack(files, tmp_path / "out").mails]
    report = unpack_files(mails, practice_site.keyring, tmp_path / "in", max_output=MAX)
    assert report.ok, (report.rejected, report.sets)
    received = {p.name: p.read_bytes() for s in report.sets if s.directory for p in s.directory.iterdir()}
    for sample in samples:
        assert received[sample.name] == sample.read_bytes()
