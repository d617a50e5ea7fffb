"""The constancy report: a PDF whose text names every check, and its detached signature by the site key."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import dicommail
from dicommail.constancy.report import month_bounds, render_pdf, summarize, write_report
from dicommail.crypto.gpg import Keyring
from dicommail.errors import InputError, InvalidArgumentError, PassphraseError

pytestmark = pytest.mark.skipif(shutil.which("pdftotext") is None, reason="needs poppler-utils (pdftotext)")

SITE = "hospital@hospital.test"
PEER = "practice@practice.test"
FOREIGN = "pacs@foreign.test"
CET = timezone(timedelta(hours=1))


@dataclass(frozen=True)
class Check:
    """Stands in for store.ConstancyCheck: the same fields."""

    id: int
    kind: str
    peer: str
    attempt: int
    started_at: datetime
    finished_at: datetime | None
    transfer_time_s: float | None
    limit_s: float
    complete: bool | None
    headers_ok: bool | None
    quality_ok: bool | None
    result: str
    reason: str | None


def at(day: int, hour: int = 7, minute: int = 30, month: int = 3) -> datetime:
    return datetime(2026, month, day, hour, minute, tzinfo=CET)


def received(check_id: int, kind: str, peer: str, start: datetime, seconds: float, *, attempt: int = 1,
             complete: bool = True, headers: bool | None = True, quality: bool | None = True,
             result: str = "passed", reason: str | None = None) -> Check:
    return Check(check_id, kind, peer, attempt, start, start + timedelta(seconds=seconds), seconds, 900.0,
                 complete, headers, quality, result, reason)


def unanswered(check_id: int, kind: str, peer: str, start: datetime, *, attempt: int = 1,
               result: str = "failed", reason: str | None = "no receipt within 900 s") -> Check:
    return Check(check_id, kind, peer, attempt, start, None, None, 900.0, None, None, None, result, reason)


def handful() -> list[Check]:
    return [
        received(1, "daily", PEER, at(2), 47.25),
        received(2, "monthly", PEER, at(3, 12), 950.5, headers=False, result="failed",
                 reason="transfer time 950.5 s above the limit of 900 s; header entries changed: Rows (instance 3)"),
        unanswered(3, "daily", PEER, at(4)),
        unanswered(4, "daily", PEER, at(4, 8), attempt=2),
        received(5, "monthly", FOREIGN, at(5, 12), 312.75, headers=None, quality=None,
                 reason="image quality not checked by the receiver"),
        unanswered(6, "daily", PEER, at(31, 6), result="pending", reason=None),
        received(7, "daily", PEER, at(1, 12, month=4), 11.0),  # next month: not in the report
    ]


def pdftotext(pdf: Path, *args: str) -> str:
    return subprocess.run(["pdftotext", *args, str(pdf), "-"], capture_output=True, text=True, check=True).stdout


@pytest.fixture
def rendered(tmp_path: Path) -> tuple[Path, Any]:
    acceptance = received(90, "acceptance", PEER, at(12, 9, month=1), 281.0)
    out = tmp_path / "report.pdf"
    summary = render_pdf(
        handful(), site_name="Hospital (TEST ONLY) <hospital@hospital.test>", site_address=SITE, peer=None,
        month="2026-03", reference={PEER: acceptance, FOREIGN: None}, out=out,
        site_key="0123456789ABCDEF0123456789ABCDEF01234567", today=date(2026, 4, 20), tz=CET,
    )
    return out, summary


def test_the_text_names_the_checks_the_times_and_the_limit(rendered: tuple[Path, Any]) -> None:
    pdf, _ = rendered
    text = pdftotext(pdf, "-layout")
    flat = " ".join(text.split())
    assert SITE in text and "Hospital (TEST ONLY)" in text and "0123 4567 89AB CDEF" in text
    assert PEER in text and FOREIGN in text
    assert "2026-03 (2026-03-01 to 2026-03-31)" in text
    assert "900 s" in text
    for started in ("2026-03-02 07:30", "2026-03-03 12:30", "2026-03-04 07:30", "2026-03-04 08:30",
                    "2026-03-05 12:30", "2026-03-31 06:30"):
        assert started in text
    assert "2026-04-01" not in text
    for seconds in ("47.2 s", "950.5 s", "312.8 s", "281.0 s"):
        assert seconds in text
    assert "none recorded" in text  # no acceptance check with the foreign receiver
    assert "2026-01-12 09:30 (#90)" in text  # the acceptance reference values with the practice
    assert "CHANGED" in text and "header entries changed: Rows (instance 3)" in flat
    assert "not checked" in text and "not checked by the receiver" in flat
    assert "pending" in text
    assert "6: 2 passed, 3 failed, 1 pending" in flat


def test_the_text_fits_an_a4_page(rendered: tuple[Path, Any]) -> None:
    pdf, _ = rendered
    info = subprocess.run(["pdfinfo", str(pdf)], capture_output=True, text=True, check=True).stdout
    assert re.search(r"Page size:\s+595\.\d+ x 841\.\d+ pts \(A4\)", info)
    words = re.findall(r'<word xMin="([\d.]+)" yMin="([\d.]+)" xMax="([\d.]+)" yMax="([\d.]+)"',
                       pdftotext(pdf, "-bbox"))
    assert len(words) > 100
    for x_min, y_min, x_max, y_max in words:
        assert float(x_min) >= 20 and float(x_max) <= 595 - 20
        assert float(y_min) >= 20 and float(y_max) <= 842 - 20


def test_summary_counts_working_days_without_a_passed_daily_check(rendered: tuple[Path, Any]) -> None:
    _, summary = rendered
    assert (summary.checks, summary.passed, summary.failed, summary.pending) == (6, 2, 3, 1)
    assert summary.working_days == 22  # March 2026: Monday 2nd to Tuesday 31st
    # The foreign receiver had no daily check at all: every working day lacks one.
    assert len(summary.days_without_passed_daily) == 22
    only_practice = summarize(handful()[:6], [PEER], "2026-03", today=date(2026, 4, 20), tz=CET)
    assert len(only_practice.days_without_passed_daily) == 21
    assert date(2026, 3, 2) not in only_practice.days_without_passed_daily


def test_the_current_month_counts_only_days_up_to_today() -> None:
    summary = summarize([received(1, "daily", PEER, at(2), 30.0)], [PEER], "2026-03", today=date(2026, 3, 4), tz=CET)
    assert summary.working_days == 3
    assert summary.days_without_passed_daily == (date(2026, 3, 3), date(2026, 3, 4))
    assert summarize([], [PEER], "2026-05", today=date(2026, 3, 4), tz=CET).working_days == 0


def test_one_peer_only_and_an_empty_month(tmp_path: Path) -> None:
    out = tmp_path / "one.pdf"
    summary = render_pdf(handful(), site_name="Hospital", site_address=SITE, peer=FOREIGN, month="2026-03",
                         reference={FOREIGN: None}, out=out, today=date(2026, 4, 20), tz=CET)
    assert summary.checks == 1
    text = pdftotext(out)
    assert "312.8 s" in text and "47.2 s" not in text and PEER not in text
    empty = tmp_path / "empty.pdf"
    render_pdf([], site_name="Hospital", site_address=SITE, peer=None, month="2026-02", reference={}, out=empty,
               today=date(2026, 4, 20), tz=CET)
    text = pdftotext(empty)
    assert "No checks were recorded in this period." in text and "900 s" in text


@pytest.mark.parametrize("month", ["2026-13", "2026-3", "March", "", "2026-00"])
def test_a_bad_month_is_an_argument_error(month: str) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        month_bounds(month)
    assert caught.value.argument == "month"


def test_month_bounds_are_local_midnights() -> None:
    start, end = month_bounds("2026-12", UTC)
    assert (start, end) == (datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC))
    local_start, _ = month_bounds("2026-03")
    assert local_start.utcoffset() is not None and (local_start.hour, local_start.day) == (0, 1)


# -- the signed report ------------------------------------------------------------------------------


@pytest.fixture
def site() -> Iterator[dicommail.Site]:
    home = Path(tempfile.mkdtemp(prefix="dmr"))
    made = dicommail.Site.init(home, SITE)
    made.keys.generate("Hospital (TEST ONLY)", SITE, algo="ed25519", passphrase=None)
    yield made
    Keyring(home / "gnupg").close()
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture
def verifier() -> Iterator[Path]:
    home = Path(tempfile.mkdtemp(prefix="dmv"))
    os.chmod(home, 0o700)
    yield home
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], capture_output=True, check=False)
    shutil.rmtree(home, ignore_errors=True)


def plain_gpg(home: Path, *args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", *args], input=data, capture_output=True,
                          check=False)


def stub_store(monkeypatch: pytest.MonkeyPatch, checks: list[Check]) -> list[dict[str, Any]]:
    """Make store.list_checks return ``checks`` (filtered as the store filters); returns the calls seen."""
    from dicommail.constancy import store

    calls: list[dict[str, Any]] = []

    def list_checks(db: object, *, since: float | None = None, until: float | None = None,
                    peer: str | None = None) -> list[Check]:
        calls.append({"since": since, "until": until, "peer": peer})
        return [c for c in checks
                if (since is None or c.started_at.timestamp() >= since)
                and (until is None or c.started_at.timestamp() < until)
                and (peer is None or c.peer == peer)]

    monkeypatch.setattr(store, "list_checks", list_checks)
    return calls


def test_write_report_signs_it_so_that_plain_gpg_verifies_it(
    site: dicommail.Site, verifier: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("dicommail.constancy.store")
    checks = [*handful(), received(90, "acceptance", PEER, at(12, 9, month=1), 281.0)]
    calls = stub_store(monkeypatch, checks)
    out = tmp_path / "reports" / "2026-03.pdf"
    result = write_report(site, "2026-03", out)
    assert result.pdf == out and result.signature == tmp_path / "reports" / "2026-03.pdf.asc"
    assert (result.checks, result.passed, result.failed, result.pending) == (6, 2, 3, 1)
    assert result.peers == (FOREIGN, PEER)
    start, end = month_bounds("2026-03")
    assert {"since": start.timestamp(), "until": end.timestamp(), "peer": None} in calls
    assert result.to_json()["signature"] == str(result.signature)
    assert sorted(p.name for p in out.parent.iterdir()) == ["2026-03.pdf", "2026-03.pdf.asc"]  # no leftovers
    text = pdftotext(out)
    assert "Hospital (TEST ONLY)" in text and "2026-01-12" in text and "900 s" in text
    assert result.signature.read_text().startswith("-----BEGIN PGP SIGNATURE-----")

    public = site.keys.export(site.keys.own().fingerprint)
    assert plain_gpg(verifier, "--import", data=public.encode()).returncode == 0
    good = plain_gpg(verifier, "--verify", str(result.signature), str(out))
    assert good.returncode == 0, good.stderr.decode()
    assert b"Good signature" in good.stderr
    tampered = tmp_path / "tampered.pdf"
    data = bytearray(out.read_bytes())
    data[len(data) // 2] ^= 0x01
    tampered.write_bytes(bytes(data))
    assert plain_gpg(verifier, "--verify", str(result.signature), str(tampered)).returncode != 0


def test_write_report_for_one_peer(site: dicommail.Site, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("dicommail.constancy.store")
    calls = stub_store(monkeypatch, handful())
    result = write_report(site, "2026-03", tmp_path / "r.pdf", peer=FOREIGN)
    assert result.peers == (FOREIGN,) and result.checks == 1 and result.passed == 1
    assert all(call["peer"] == FOREIGN for call in calls)
    assert "none recorded" in pdftotext(result.pdf)


def test_a_signing_failure_leaves_no_report(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("dicommail.constancy.store")
    stub_store(monkeypatch, handful())
    home = Path(tempfile.mkdtemp(prefix="dmp"))
    try:
        protected = dicommail.Site.init(home, SITE)
        # A protected key, but no identity.passphrase_file: the PDF renders, then signing fails.
        protected.keys.generate("Hospital (TEST ONLY)", SITE, algo="ed25519", passphrase="correct horse")
        out = tmp_path / "r.pdf"
        out.write_bytes(b"an older report")
        with pytest.raises(PassphraseError):
            write_report(protected, "2026-03", out)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["r.pdf"]
        assert out.read_bytes() == b"an older report"
    finally:
        Keyring(home / "gnupg").close()
        shutil.rmtree(home, ignore_errors=True)


def test_detach_sign_file_names_a_missing_input(site: dicommail.Site, tmp_path: Path) -> None:
    with site._keyring() as keyring, pytest.raises(InputError):
        keyring.detach_sign_file(tmp_path / "missing.pdf", tmp_path / "missing.pdf.asc", signer=SITE, passphrase=None)
    assert not (tmp_path / "missing.pdf.asc").exists()


def test_write_report_reads_the_checks_from_the_state_database(site: dicommail.Site, tmp_path: Path) -> None:
    from dicommail.constancy import store

    def started(day: int, month: int = 3) -> float:
        return datetime(2026, month, day, 10, 0).astimezone().timestamp()

    with site._database() as db:
        first = store.start_check(db, kind="daily", peer=PEER, attempt=1, limit_s=900, mark_id=store.new_mark_id(),
                                  started_at=started(9))
        store.fail_check(db, first, "no receipt within 900 s", at=started(9) + 900)
        store.start_check(db, kind="monthly", peer=PEER, attempt=1, limit_s=600, mark_id=store.new_mark_id(),
                          started_at=started(10))
        store.start_check(db, kind="daily", peer=PEER, attempt=1, limit_s=900, mark_id=store.new_mark_id(),
                          started_at=started(1, month=4))
    result = write_report(site, "2026-03", tmp_path / "march.pdf")
    assert (result.checks, result.passed, result.failed, result.pending) == (2, 0, 1, 1)
    assert result.peers == (PEER,)
    text = pdftotext(result.pdf, "-layout")
    assert "2026-03-09 10:00" in text and "2026-03-10 10:00" in text and "2026-04-01" not in text
    assert "configured: 600 s" in text and "no receipt within 900 s" in text
