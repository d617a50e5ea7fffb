"""Constancy checks on the wire and at the receiver (real gpg, no servers).

A test transfer carries its mark inside the encryption; the receiver never
forwards it to the clinical destination, compares every instance with the
sender's expectations and puts the results into the final notification.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from dicommail.config import parse_config
from dicommail.constancy import values
from dicommail.constancy.values import DEFAULT_HEADER_ENTRIES, ConstancyMark, InstanceExpectation, expected_values
from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.dicom import scan
from dicommail.errors import IntegrityError, WireFormatError
from dicommail.receiver.destinations import FolderDestination
from dicommail.receiver.inbox import store_fetched
from dicommail.receiver.notify import Notifier
from dicommail.receiver.pipeline import Pipeline
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database
from dicommail.wire import headers as h
from dicommail.wire import notifications as n
from dicommail.wire.unpack import open_mail, verify_set
from tests.wire.conftest import KEYS, PRACTICE, Site
from tests.wire.forge import dicom_part, encrypted_mail, inner_entity

ACCOUNT = "imap://practice@localhost:993/INBOX"
_uids = iter(range(1, 1_000_000))


def _mark(files: list[Path], check_id: str = "c-20261201-1", kind: str = "monthly") -> ConstancyMark:
    expectations = [expected_values(f, DEFAULT_HEADER_ENTRIES) for f in files]
    return ConstancyMark(check_id, kind, DEFAULT_HEADER_ENTRIES, {e.sop_instance_uid: e for e in expectations})


def _pack(site: Site, files: list[Path], out: Path, **kwargs: Any) -> list[Path]:
    packed = site.packer(PRACTICE, **kwargs).pack(scan(files).files, out)
    return [m.path for m in packed.mails]


@pytest.fixture
def practice() -> Iterator[Site]:
    home = Path(tempfile.mkdtemp(prefix="dmp"))
    keyring = Keyring(home / "gnupg")
    install_demo_site(keyring, "practice", KEYS)
    yield Site(home, keyring, PRACTICE)
    keyring.close()
    shutil.rmtree(home, ignore_errors=True)


class Receiving:
    """A receiving home: the clinical destination and the test destination are folders."""

    def __init__(self, practice: Site, root: Path) -> None:
        self.db = Database(root / "state.db")
        self.spool = Spool(root / "spool")
        self.clinical = root / "clinical-pacs"
        self.test_folder = root / "constancy-tests"
        config = parse_config({"identity": {"address": PRACTICE}}, root)
        self.pipeline = Pipeline(
            self.db, self.spool, practice.keyring, FolderDestination(self.clinical), max_output=1024**3,
            set_timeout=3600, retry_interval=0.01, own_addresses={PRACTICE},
            notifier=Notifier(self.db, config, practice.keyring),
            test_destination=FolderDestination(self.test_folder),
        )

    def store(self, *mails: Path) -> list[int]:
        return [store_fetched(self.db, self.spool, ACCOUNT, f"1:{next(_uids)}", m.read_bytes()).id for m in mails]

    def sets(self) -> list[str]:
        return [r["status"] for r in self.db.query("SELECT status FROM inbound_sets ORDER BY id")]

    def final_report(self) -> n.StatusReport:
        [row] = self.db.query("SELECT report FROM notifications WHERE scope = 'set' AND event LIKE '%/set/final/%'")
        return n.StatusReport.from_json(row["report"].encode())

    def mail_status(self, mail_id: int) -> tuple[str, str | None]:
        [row] = self.db.query("SELECT status, error FROM inbound_mails WHERE id = ?", (mail_id,))
        return row["status"], row["error"]


@pytest.fixture
def receiving(practice: Site, tmp_path: Path) -> Iterator[Receiving]:
    site = Receiving(practice, tmp_path / "r")
    yield site
    site.db.close()


# -- values: expectations, comparison, the mark's JSON ------------------------------------------------------


def test_an_unchanged_instance_passes_and_a_changed_one_names_keywords_only(ct_study: list[Path],
                                                                             tmp_path: Path) -> None:
    expected = expected_values(ct_study[0], DEFAULT_HEADER_ENTRIES)
    assert expected.headers["Rows"] == "512" and expected.headers["Modality"] == "CT"
    assert expected.headers["SliceThickness"] == ""  # absent
    assert "PatientName" not in expected.headers
    check = values.compare(ct_study[0], expected, DEFAULT_HEADER_ENTRIES)
    assert (check.headers_ok, check.mismatched, check.quality_ok, check.reason) == (True, (), True, "")

    ds = pydicom.dcmread(ct_study[0])
    ds.Modality = "MR"
    pixels = bytearray(ds.PixelData)
    pixels[100] ^= 0xFF
    ds.PixelData = bytes(pixels)
    changed = tmp_path / "changed.dcm"
    ds.save_as(changed)
    check = values.compare(changed, expected, DEFAULT_HEADER_ENTRIES)
    assert check.mismatched == ("Modality",) and not check.headers_ok and not check.quality_ok
    assert "MR" not in check.reason and "CT" not in check.reason
    assert "Modality" in check.reason

    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"not dicom at all")
    check = values.compare(broken, expected, DEFAULT_HEADER_ENTRIES)
    assert not check.headers_ok and not check.quality_ok and "cannot be read" in check.reason


def test_the_mark_round_trips_through_json(ct_study: list[Path]) -> None:
    mark = _mark(ct_study[:3])
    data = mark.to_json()
    assert data.isascii() and b"\r\n" in data
    assert ConstancyMark.from_json(data) == mark
    assert values.parse_header(mark.header_value()) == (mark.check_id, mark.kind)


def _document(mark: ConstancyMark) -> dict[str, Any]:
    parsed = json.loads(mark.to_json())
    assert isinstance(parsed, dict)
    return parsed


@pytest.mark.parametrize("change", [
    {"version": 2}, {"version": True}, {"format": "dicommail-manifest"}, {"kind": "weekly"},
    {"check_id": "../../etc"}, {"check_id": 7}, {"entries": ["PatientName", "NoSuchKeyword"]},
    {"entries": "Rows"}, {"instances": {"a": 1}},
    {"instances": [{"sop_instance_uid": "1.2", "headers": {}, "pixel_sha256": ""}]},
    {"instances": [{"sop_instance_uid": "1.2", "headers": {"Rows": 512}, "pixel_sha256": ""}]},
    {"instances": [{"sop_instance_uid": "01.2", "headers": {"Rows": "512"}, "pixel_sha256": ""}]},
    {"instances": [{"sop_instance_uid": "1.2", "headers": {"Rows": "5\x0012"}, "pixel_sha256": ""}]},
    {"instances": [{"sop_instance_uid": "1.2", "headers": {"Rows": "512"}, "pixel_sha256": "xyz"}]},
    {"instances": [{"sop_instance_uid": "1.2", "headers": {"Rows": "512"}, "pixel_sha256": "", "x": 1}]},
    {"instances": [{"sop_instance_uid": "1.2", "headers": {"Rows": "512"}, "pixel_sha256": ""}] * 2},
])
def test_a_malformed_mark_is_a_wire_format_error(change: dict[str, Any]) -> None:
    mark = ConstancyMark("c1", "daily", ("Rows",), {"1.2": InstanceExpectation("1.2", {"Rows": "512"}, "")})
    with pytest.raises(WireFormatError):
        ConstancyMark.from_json(json.dumps({**_document(mark), **change}).encode())


@pytest.mark.parametrize("data", [b"[" * 200_000, b'{"format": "dicommail-constancy", "x": ' + b"[" * 50 + b"]" * 50,
                                  b"\xff\xfe", b"", b"{" + b" " * (values.MAX_MARK_SIZE + 1) + b"}", b"1e999999"])
def test_hostile_mark_bytes_are_refused_quickly(data: bytes) -> None:
    with pytest.raises(WireFormatError):
        ConstancyMark.from_json(data)


# -- packing and unpacking --------------------------------------------------------------------------


def test_each_mail_carries_the_expectations_of_its_own_instances(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    files = ct_study[:6]
    mark = _mark(files)
    mails = _pack(hospital_site, files, tmp_path / "out", max_mail_size=1024**2, constancy=mark)
    assert len(mails) >= 3
    parts = [open_mail(m, practice_site.keyring, tmp_path / f"w{i}", max_output=1024**3)
             for i, m in enumerate(mails)]
    for part in parts:
        assert part.constancy is not None
        assert set(part.constancy.instances) == {f.dicom.sop_instance_uid for f in part.files if f.dicom}
        assert (part.constancy.check_id, part.constancy.kind) == (mark.check_id, mark.kind)
        assert all(f.kind == "dicom" for f in part.files)  # the mark is no file of the set
    verified = verify_set(parts)
    assert verified.constancy == mark
    for item in verified.dicom_files:
        assert item.dicom is not None
        check = values.compare(item.path, mark.instances[item.dicom.sop_instance_uid], mark.entries)
        assert check.headers_ok and check.quality_ok
    # Outside the encryption nothing tells a test transfer from any other.
    for mail in mails:
        assert b"CONSTANCY" not in mail.read_bytes().upper()


def test_a_mark_without_an_instance_of_the_set_is_refused_by_the_packer(
    hospital_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    from dicommail.errors import InputError

    with pytest.raises(InputError, match="no expected values"):
        _pack(hospital_site, ct_study[:3], tmp_path / "out", constancy=_mark(ct_study[:2]))
    assert not list((tmp_path / "out").glob("*.eml"))


def test_parts_that_disagree_about_the_mark_do_not_make_a_set(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(h, "new_set_id", lambda _root="": "2.25.6868159")
    files = ct_study[:4]
    marked = _pack(hospital_site, files, tmp_path / "m", max_mail_size=1024**2, constancy=_mark(files))
    plain = _pack(hospital_site, files, tmp_path / "p", max_mail_size=1024**2)
    other = _pack(hospital_site, files, tmp_path / "o", max_mail_size=1024**2, constancy=_mark(files, "c-other"))
    assert len(marked) == len(plain) == len(other) >= 2

    def opened(*mails: Path) -> list[Any]:
        return [open_mail(m, practice_site.keyring, tmp_path / f"w{next(_uids)}", max_output=1024**3) for m in mails]

    with pytest.raises(IntegrityError, match="some parts carry a constancy mark"):
        verify_set(opened(marked[0], *plain[1:]))
    with pytest.raises(IntegrityError, match="different checks"):
        verify_set(opened(marked[0], *other[1:]))


# -- the receiver ----------------------------------------------------------------------------------


def test_a_test_set_goes_to_the_test_destination_never_to_the_clinical_one(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    files = ct_study[:4]
    mark = _mark(files)
    receiving.store(*_pack(hospital_site, files, tmp_path / "t", max_mail_size=1024**2, constancy=mark))
    receiving.pipeline.run_once()
    assert receiving.sets() == ["delivered"]
    assert not receiving.clinical.exists() or not any(receiving.clinical.iterdir())
    [folder] = receiving.test_folder.iterdir()
    assert len(list(folder.glob("*.dcm"))) == 4
    report = receiving.final_report()
    assert report.status == "delivered" and report.outcome == n.SUCCESS
    assert report.constancy is not None
    constancy = report.constancy
    assert {k: constancy[k] for k in ("check_id", "kind", "complete", "headers_ok", "quality_ok", "mismatched")} == {
        "check_id": mark.check_id, "kind": "monthly", "complete": True, "headers_ok": True, "quality_ok": True,
        "mismatched": []}
    assert str(constancy["received_at"]).endswith("+00:00") and str(constancy["verified_at"]).endswith("+00:00")
    assert "not forwarded to the archive" in n.human_text(report)
    # An ordinary set still reaches the clinical destination, and its report has no constancy object.
    receiving.store(*_pack(hospital_site, ct_study[4:6], tmp_path / "c"))
    receiving.pipeline.run_once()
    assert receiving.sets() == ["delivered", "delivered"]
    assert len(list(receiving.clinical.glob("*/*.dcm"))) == 2
    rows = receiving.db.query("SELECT report FROM notifications WHERE event LIKE '%/set/final/%' ORDER BY id")
    assert "constancy" not in json.loads(rows[-1]["report"])


def test_without_a_test_destination_a_test_set_is_checked_and_discarded(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    receiving.pipeline.test_destination = None
    receiving.store(*_pack(hospital_site, ct_study[:2], tmp_path / "t", constancy=_mark(ct_study[:2], kind="daily")))
    receiving.pipeline.run_once()
    assert receiving.sets() == ["delivered"]
    assert not receiving.clinical.exists() and not receiving.test_folder.exists()
    assert list(receiving.spool.parts.iterdir()) == []  # the decrypted test set is gone
    constancy = receiving.final_report().constancy
    assert constancy is not None and constancy["complete"] is True and constancy["kind"] == "daily"


def test_a_header_entry_that_differs_from_the_senders_fails_headers_ok_by_keyword(
    hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    """The sender's expectation is changed before packing: as if the entry had been changed in transit."""
    files = ct_study[:3]
    mark = _mark(files)
    target = expected_values(files[1], DEFAULT_HEADER_ENTRIES).sop_instance_uid
    altered = dataclasses.replace(mark.instances[target], headers={**mark.instances[target].headers,
                                                                  "Rows": "4711"})
    mark = dataclasses.replace(mark, instances={**mark.instances, target: altered})
    receiving.store(*_pack(hospital_site, files, tmp_path / "t", constancy=mark))
    receiving.pipeline.run_once()
    constancy = receiving.final_report().constancy
    assert constancy is not None
    assert (constancy["complete"], constancy["headers_ok"], constancy["quality_ok"]) == (True, False, True)
    assert constancy["mismatched"] == ["Rows (instance 2)"]
    shown = json.dumps(constancy)
    assert "4711" not in shown and '"512"' not in shown  # keywords, never values
    assert not receiving.clinical.exists()


@pytest.mark.parametrize("fault", ["header", "pixels"])
def test_a_receiver_side_fault_is_found(
    fault: str, hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    """An injected fault: a spooled file is changed after decryption, before the check."""
    files = ct_study[:3]
    receiving.store(*_pack(hospital_site, files, tmp_path / "t", constancy=_mark(files)))
    receiving.pipeline.process_stored()
    [victim] = [p for p in receiving.spool.parts.rglob("*.part")
                if pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber == 3]
    ds = pydicom.dcmread(victim)
    if fault == "header":
        ds.Modality = "OT"
    else:
        pixels = bytearray(ds.PixelData)
        pixels[-1] ^= 1
        ds.PixelData = bytes(pixels)
    ds.save_as(victim)
    receiving.pipeline.run_once()
    constancy = receiving.final_report().constancy
    assert constancy is not None and constancy["complete"] is True
    if fault == "header":
        assert (constancy["headers_ok"], constancy["quality_ok"]) == (False, True)
        assert constancy["mismatched"] == ["Modality (instance 3)"]
        assert "OT" not in json.dumps(constancy["mismatched"])
    else:
        assert (constancy["headers_ok"], constancy["quality_ok"]) == (True, False)
        assert constancy["mismatched"] == []


def _forged(site: Site, data: bytes, out: Path, *, header: str | None, part: bytes | None) -> Path:
    set_headers = {h.SETID: "2.25.6868", h.SETPART: "1", h.SETTOTAL: "1", "To": PRACTICE}
    if header is not None:
        set_headers[values.HEADER] = header
    parts = [dicom_part(data, "IM1.dcm")]
    if part is not None:
        parts.append(f"Content-Type: {values.MEDIA_TYPE}\r\n\r\n".encode() + part + b"\r\n")
    return encrypted_mail(site, PRACTICE, inner_entity(parts, set_headers), out, f"{h.SETID}: 2.25.6868\r\n")


@pytest.mark.parametrize("case", ["garbled", "nested", "types", "header-only", "part-only", "other-check",
                                  "bad-header", "two-headers"])
def test_a_hostile_mark_from_a_certified_peer_is_quarantined(
    case: str, hospital_site: Site, receiving: Receiving, ct_study: list[Path], tmp_path: Path
) -> None:
    data = ct_study[0].read_bytes()
    good = _mark(ct_study[:1], check_id="c9")
    document = _document(good)
    header: str | None = good.header_value()
    part: bytes | None = good.to_json()
    if case == "garbled":
        part = b'{"format": "dicommail-constancy", "version": 1, "instances": [{"sop' + bytes(range(256))
    elif case == "nested":
        part = b'{"format": "dicommail-constancy", "instances": ' + b"[" * 100_000
    elif case == "types":
        document["instances"][0]["headers"]["Rows"] = [512]
        part = json.dumps(document).encode()
    elif case == "header-only":
        part = None
    elif case == "part-only":
        header = None
    elif case == "other-check":
        header = "c10; kind=monthly"
    elif case == "bad-header":
        header = "c9; kind=weekly"
    else:
        header = good.header_value() + "\r\n" + f"{values.HEADER}: {good.header_value()}"
    mail = _forged(hospital_site, data, tmp_path / "hostile.eml", header=header, part=part)
    [bad] = receiving.store(mail)
    receiving.store(*_pack(hospital_site, ct_study[1:3], tmp_path / "a"))
    receiving.pipeline.run_once()
    status, error = receiving.mail_status(bad)
    assert status == "quarantined" and error is not None and error.startswith("malformed"), error
    assert receiving.sets() == ["delivered"]  # the ordinary set, to the clinical destination
    assert len(list(receiving.clinical.glob("*/*.dcm"))) == 2
    assert not receiving.test_folder.exists()
    assert list(receiving.spool.work.iterdir()) == []


# -- the receipt in the status JSON -----------------------------------------------------------------------


def _status(constancy: object) -> bytes:
    report = n.StatusReport(scope=n.SET, set_id="2.25.1", status="delivered", outcome=n.SUCCESS)
    data = json.loads(report.to_json())
    data["constancy"] = constancy
    return json.dumps(data).encode()


def test_the_receipt_round_trips_and_hostile_receipts_are_refused() -> None:
    receipt: dict[str, object] = {
        "check_id": "c1", "kind": "acceptance", "complete": True, "headers_ok": False, "quality_ok": True,
        "mismatched": ["Rows (instance 2)"], "received_at": "2026-12-01T08:00:00+00:00",
        "verified_at": "2026-12-01T08:00:05+00:00", "reason": "header entries differ in 1 instance(s)",
    }
    report = n.StatusReport.from_json(_status(receipt))
    assert report.constancy == receipt
    assert n.StatusReport.from_json(report.to_json()) == report
    unknown = n.StatusReport.from_json(_status({**receipt, "extra": {"deep": [1]}}))
    assert unknown.constancy == receipt  # unknown fields are dropped
    for change in ({"complete": 1}, {"kind": "weekly"}, {"check_id": "a b"}, {"mismatched": "Rows"},
                   {"mismatched": ["x" * 201]}, {"mismatched": ["Rows"] * 1001}, {"received_at": 5}):
        with pytest.raises(WireFormatError):
            n.StatusReport.from_json(_status({**receipt, **change}))
    with pytest.raises(WireFormatError):
        n.StatusReport.from_json(_status(["not", "an", "object"]))


def test_a_test_image_too_large_to_check_fails_the_check_without_being_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A peer's test set could hold a deflated object of 900 MiB in a 1 MiB mail: read whole by pydicom,
    # then decoded, it took 1.9 GB.  Bounded like everything else from a mail.
    from dicommail.samples import write_ct_study

    [image] = write_ct_study(tmp_path / "ct", 1, 64)
    expectation = expected_values(image, DEFAULT_HEADER_ENTRIES)
    assert values.compare(image, expectation, DEFAULT_HEADER_ENTRIES).quality_ok
    monkeypatch.setattr(values, "MAX_TEST_IMAGE", image.stat().st_size // 2)
    check = values.compare(image, expectation, DEFAULT_HEADER_ENTRIES)
    assert not check.quality_ok and "cannot be checked" in check.reason
    monkeypatch.setattr(values, "MAX_TEST_IMAGE", image.stat().st_size + 1)  # the file fits, its pixels do not
    monkeypatch.setattr(values, "_decoded_size", lambda _ds: image.stat().st_size + 2)
    check = values.compare(image, expectation, DEFAULT_HEADER_ENTRIES)
    assert not check.quality_ok and "too large to decode" in check.reason
