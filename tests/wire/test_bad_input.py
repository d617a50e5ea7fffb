"""Bad input: each case gives a clear error and writes nothing into the output directory."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import certify, export_key, generate, import_keys
from dicommail.dicom import scan
from dicommail.errors import (
    DecryptionError,
    IncompleteSetError,
    NotDicomError,
    SignatureError,
    WireFormatError,
)
from dicommail.samples import write_ct_study
from dicommail.wire.unpack import UnpackReport, unpack_files
from tests.wire.conftest import PRACTICE, Site
from tests.wire.forge import dicom_part, encrypted_mail, inner_entity

MAX = 1024**3


def _unpack(site: Site, mails: list[Path], out: Path, max_output: int = MAX) -> UnpackReport:
    report = unpack_files(mails, site.keyring, out, max_output=max_output)
    return report


def _nothing_written(out: Path) -> None:
    assert not out.exists() or list(out.iterdir()) == []


@pytest.fixture
def small_set(hospital_site: Site, ct_study: list[Path], tmp_path: Path) -> list[Path]:
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2).pack(scan(ct_study[:6]).files, tmp_path / "sent")
    assert packed.set_total >= 3
    return [m.path for m in packed.mails]


def _tamper(path: Path) -> None:
    data = bytearray(path.read_bytes())
    start = data.index(b"-----BEGIN PGP MESSAGE-----")
    middle = start + (len(data) - start) // 2
    middle = data.index(b"\n", middle) + 5
    data[middle] = ord("A") if data[middle] != ord("A") else ord("B")
    path.write_bytes(bytes(data))


def test_tampered_ciphertext(practice_site: Site, small_set: list[Path], tmp_path: Path) -> None:
    _tamper(small_set[1])
    report = _unpack(practice_site, small_set, tmp_path / "in")
    assert not report.ok
    [(path, error)] = report.rejected
    assert path == small_set[1] and isinstance(error, DecryptionError)
    [outcome] = report.sets
    assert isinstance(outcome.error, IncompleteSetError) and outcome.error.missing_parts == [2]
    _nothing_written(tmp_path / "in")


def test_mail_for_another_key(hospital_site: Site, small_set: list[Path], tmp_path: Path) -> None:
    report = _unpack(hospital_site, small_set[:1], tmp_path / "in")
    [(_, error)] = report.rejected
    assert isinstance(error, DecryptionError) and "not to this site" in error.message
    _nothing_written(tmp_path / "in")


@pytest.fixture(scope="module")
def stranger(practice_site: Site) -> Iterator[Site]:
    """A third site whose key the practice has never certified."""
    home = Path(tempfile.mkdtemp(prefix="dms"))
    keyring = Keyring(home / "gnupg")
    generate(keyring, "Stranger (TEST ONLY)", "stranger@stranger.test", algo="ed25519", expires="never")
    import_keys(keyring, export_key(practice_site.keyring, PRACTICE).encode())
    certify(keyring, PRACTICE)
    try:
        yield Site(home, keyring, "stranger@stranger.test")
    finally:
        keyring.close()
        shutil.rmtree(home, ignore_errors=True)


def test_unknown_then_uncertified_signer(
    stranger: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    packed = stranger.packer(PRACTICE).pack(scan(ct_study[:2]).files, tmp_path / "sent")
    mails = [m.path for m in packed.mails]
    report = _unpack(practice_site, mails, tmp_path / "in")
    [(_, error)] = report.rejected
    assert isinstance(error, SignatureError)
    # Known but not certified: still refused, naming the fingerprint.
    import_keys(practice_site.keyring, export_key(stranger.keyring, stranger.address).encode())
    report = _unpack(practice_site, mails, tmp_path / "in")
    [(_, error)] = report.rejected
    assert isinstance(error, SignatureError)
    assert error.fingerprint == stranger.fingerprint and stranger.fingerprint in error.message
    assert "certify" in error.hint
    _nothing_written(tmp_path / "in")


def test_missing_duplicated_and_truncated_fragments(
    hospital_site: Site, practice_site: Site, multiframe: Path, tmp_path: Path
) -> None:
    packed = hospital_site.packer(PRACTICE, max_mail_size=1024**2, compression_level=0).pack(
        scan([multiframe]).files, tmp_path / "sent"
    )
    fragments = [m.path for m in packed.mails]
    # Missing: one fragment left out.
    report = _unpack(practice_site, [*fragments[:2], *fragments[3:]], tmp_path / "in")
    [(_, error)] = report.rejected
    assert isinstance(error, IncompleteSetError) and error.missing_parts == [3]
    # Truncated: one fragment cut in half (duplicates of others are fine).
    cut = tmp_path / "cut.eml"
    cut.write_bytes(fragments[2].read_bytes()[: fragments[2].stat().st_size // 2])
    report = _unpack(practice_site, [*fragments[:2], cut, *fragments[3:], fragments[0]], tmp_path / "in")
    [(named, error)] = report.rejected
    assert isinstance(error, DecryptionError | WireFormatError)
    assert named == fragments[0]  # a fragment given, not the scratch file it was joined into
    _nothing_written(tmp_path / "in")


def test_fragment_claiming_huge_total(practice_site: Site, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.eml"
    bogus.write_bytes(
        b'From: x@y.test\r\nSubject: x\r\nContent-Type: message/partial; id="a"; number=1; total=100000\r\n\r\nx\r\n'
    )
    report = _unpack(practice_site, [bogus], tmp_path / "in")
    [(_, error)] = report.rejected
    assert isinstance(error, WireFormatError) and "100000" in error.message


def test_compression_bomb_is_bounded(practice_site: Site, small_set: list[Path], tmp_path: Path) -> None:
    report = _unpack(practice_site, small_set, tmp_path / "in", max_output=64 * 1024)
    assert len(report.rejected) == len(small_set)
    assert all(
        isinstance(e, DecryptionError) and "max_decrypted_size" in e.message + e.hint for _, e in report.rejected
    )
    _nothing_written(tmp_path / "in")


def test_non_dicom_labelled_application_dicom(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"this is a text file, not DICOM\n" * 100)
    real = scan(ct_study[:1]).files[0]
    disguised = dataclasses.replace(real, path=fake, size=fake.stat().st_size, sop_instance_uid="1.2.3.4")
    packed = hospital_site.packer(PRACTICE).pack([disguised], tmp_path / "sent")
    report = _unpack(practice_site, [m.path for m in packed.mails], tmp_path / "in")
    [(_, error)] = report.rejected
    assert isinstance(error, NotDicomError) and "not a DICOM file" in error.message
    _nothing_written(tmp_path / "in")


def test_hostile_file_names_stay_inside(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    data = [p.read_bytes() for p in ct_study[:3]]
    inner = inner_entity(
        [dicom_part(data[0], "../../evil.dcm"), dicom_part(data[1], "/etc/evil.dcm"), dicom_part(data[2], "..")],
        {"X-TELEMEDICINE-SETID": "2.25.777", "X-TELEMEDICINE-SETPART": "1", "X-TELEMEDICINE-SETTOTAL": "1"},
    )
    mail = encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / "hostile.eml")
    out = tmp_path / "deep" / "in"
    report = _unpack(practice_site, [mail], out)
    assert report.ok, report.rejected
    [outcome] = report.sets
    assert outcome.directory == out / "2.25.777"
    names = sorted(p.name for p in outcome.directory.iterdir() if p.suffix == ".dcm")
    assert names == sorted(["evil.dcm", "evil-2.dcm", f"{scan(ct_study[2:3]).files[0].sop_instance_uid}.dcm"])
    assert not (tmp_path / "evil.dcm").exists() and not (tmp_path / "deep" / "evil.dcm").exists()
    assert any("not safe" in w for w in outcome.warnings)


def test_reserved_long_and_repeated_file_names_are_renamed_and_kept(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    # A name of dicommail's own files once sent the renaming into an endless loop; a name of
    # 190 CJK characters is 570 bytes, over the file system's 255; 40 copies of one name.
    data = [p.read_bytes() for p in ct_study[:3]]
    long_name = "SECRET^PATIENT_" + "\u65e5" * 190 + ".dcm"
    parts = [dicom_part(data[0], "dicommail-set.json"), dicom_part(data[1], "dicommail-report.dcm"),
             dicom_part(data[2], long_name)] + [dicom_part(data[i % 3], "same.dcm") for i in range(40)]
    inner = inner_entity(parts, {"X-TELEMEDICINE-SETID": "2.25.778", "X-TELEMEDICINE-SETPART": "1",
                                 "X-TELEMEDICINE-SETTOTAL": "1"})
    mail = encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / "names.eml")
    report = _unpack(practice_site, [mail], tmp_path / "in")
    assert report.ok, report.rejected
    [outcome] = report.sets
    assert outcome.directory is not None
    names = {p.name for p in outcome.directory.iterdir()}
    assert {"_dicommail-set.json", "_dicommail-report.dcm", "same.dcm", "same-2.dcm", "same-40.dcm"} <= names
    assert "dicommail-set.json" in names  # the receipt, not a file from the mail
    [cut] = [n for n in names if n.startswith("SECRET")]
    assert cut.endswith(".dcm") and len(cut.encode()) <= 200
    assert len(names) == 43 + 1


def test_foreign_sender_without_manifest(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    """Older @GIT senders: one file per mail, no manifest, complete by SETTOTAL."""
    mails = []
    for number, path in enumerate(ct_study[:3], 1):
        headers = {
            "X-TELEMEDICINE-SETID": "1.2.3.999",
            "X-TELEMEDICINE-SETPART": str(number),
            "X-TELEMEDICINE-SETTOTAL": "3",
            "X-TELEMEDICINE-STUDYID": "1.2.3",
        }
        inner = inner_entity([dicom_part(path.read_bytes(), path.name)], headers)
        mails.append(encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / f"m{number}.eml"))
    report = _unpack(practice_site, mails[:2], tmp_path / "in")
    [outcome] = report.sets
    assert isinstance(outcome.error, IncompleteSetError) and outcome.error.missing_parts == [3]
    _nothing_written(tmp_path / "in")
    report = _unpack(practice_site, mails, tmp_path / "in")
    assert report.ok and report.sets[0].dicom_files == 3
    assert any("no manifest" in w for w in report.sets[0].warnings)


def test_outer_set_headers_must_match_signed_ones(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    packed = hospital_site.packer(PRACTICE).pack(scan(ct_study[:1]).files, tmp_path / "sent")
    mail = packed.mails[0].path
    mail.write_bytes(mail.read_bytes().replace(b"X-TELEMEDICINE-SETTOTAL: 1\n", b"X-TELEMEDICINE-SETTOTAL: 2\n", 1))
    report = _unpack(practice_site, [mail], tmp_path / "in")
    [(_, error)] = report.rejected
    assert isinstance(error, WireFormatError) and "altered" in error.hint


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x00\xff garbage without headers",
        b"From: a@b.test\r\nContent-Type: text/plain\r\n\r\nhello\r\n",
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"\r\n\r\nno boundary\r\n',
        b'Content-Type: multipart/encrypted; protocol="application/pgp-encrypted"; boundary=E\r\n\r\n--E\r\n'
        b"Content-Type: application/pgp-encrypted\r\n\r\nVersion: 1\r\n--E\r\n"
        b"Content-Type: application/octet-stream\r\n\r\n-----BEGIN PGP MESSAGE-----\r\n\r\nhQ\r\n",
    ],
)
def test_malformed_mail(practice_site: Site, raw: bytes, tmp_path: Path) -> None:
    mail = tmp_path / "bad.eml"
    mail.write_bytes(raw)
    report = _unpack(practice_site, [mail], tmp_path / "in")
    assert not report.ok
    [(_, error)] = report.rejected
    assert error.message
    _nothing_written(tmp_path / "in")


def test_patient_data_never_in_outer_headers(hospital_site: Site, practice_site: Site, tmp_path: Path) -> None:
    names = ["Müller^Jürgen", "Evil\r\nBcc: victim@example.org^X"]
    for charset, name in zip(["ISO_IR 192", "ISO_IR 100"], names, strict=True):
        study = write_ct_study(tmp_path / charset, 2, 64, charset=charset, patient_name=name)
        weird = study[0].with_name("IM\r\nBcc: x@example.org.dcm")
        study[0].rename(weird)
        packed = hospital_site.packer(PRACTICE).pack(scan([weird, study[1]]).files, tmp_path / "sent")
        for mail in packed.mails:
            raw = mail.path.read_bytes()
            head = raw.split(b"\n\n", 1)[0]
            assert b"Bcc" not in head and b"Evil" not in head and b"SYNTHETIC" not in head
            # Outside the armor everything is ASCII: no name in any charset can hide there.
            assert b"M\xc3\xbcller" not in raw and b"M\xfcller" not in raw
        report = _unpack(practice_site, [m.path for m in packed.mails], tmp_path / f"in-{charset}")
        assert report.ok, report.rejected
        directory = report.sets[0].directory
        assert directory is not None
        assert (directory / study[1].name).read_bytes() == study[1].read_bytes()
        assert not any("\n" in p.name for p in directory.iterdir())


@pytest.mark.parametrize(("part", "total"), [("0", "0"), ("0", "1"), ("1", "0")])
def test_a_set_part_or_total_of_zero_is_malformed(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path, part: str, total: str
) -> None:
    inner = inner_entity([dicom_part(ct_study[0].read_bytes(), "a.dcm")],
                         {"X-TELEMEDICINE-SETID": "2.25.779", "X-TELEMEDICINE-SETPART": part,
                          "X-TELEMEDICINE-SETTOTAL": total})
    mail = encrypted_mail(hospital_site, PRACTICE, inner, tmp_path / "zero.eml")
    report = _unpack(practice_site, [mail], tmp_path / "in")
    [(_, error)] = report.rejected
    assert "out of range" in error.message
    _nothing_written(tmp_path / "in")
