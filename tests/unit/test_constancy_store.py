"""The sender's record of constancy checks: receipts, time limits, attempts, the list JSON, the config."""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from dicommail.config import ConstancyConfig, parse_config, render_template
from dicommail.constancy import store as s
from dicommail.constancy.values import DEFAULT_HEADER_ENTRIES
from dicommail.errors import ConfigError
from dicommail.store.db import Database

PEER = "practice@practice.test"
LIST_KEYS = ["id", "kind", "peer", "attempt", "started_at", "finished_at", "transfer_time_s", "limit_s", "complete",
             "headers_ok", "quality_ok", "result", "reason"]


@pytest.fixture
def db(tmp_path: Path) -> Database:
    return Database(tmp_path / "state.db")


def _check(db: Database, *, kind: str = "monthly", attempt: int = 1, limit: int = 900, started: float = 1000.0,
           sent: float | None = 1010.0, status: str = "sent") -> tuple[int, int, str]:
    """A check with its test transfer, first mail sent at ``sent``: (check id, transfer id, mark id)."""
    mark = s.new_mark_id()
    check_id = s.start_check(db, kind=kind, peer=PEER, attempt=attempt, limit_s=limit, mark_id=mark, images=2,
                             size=1024, started_at=started)
    with db.transaction() as conn:
        cursor = conn.execute(
            "INSERT INTO transfers (set_id, recipient, study_uid, files, bytes, set_total, status, created_at, "
            "updated_at, first_sent_at) VALUES (?, ?, '1.2.3', 2, 1024, 1, ?, ?, ?, ?)",
            (f"2.25.{check_id}{int(started)}", PEER, status, started, started, sent),
        )
        transfer_id = cursor.lastrowid
    assert transfer_id is not None
    s.attach_transfer(db, check_id, transfer_id, f"2.25.{check_id}")
    return check_id, transfer_id, mark


def _receipt(db: Database, transfer_id: int, report: dict[str, object], at: float) -> s.ConstancyCheck | None:
    with db.transaction() as conn:
        return s.record_receipt(conn, transfer_id, report, at)


def _results(mark: str, **changes: object) -> dict[str, object]:
    found: dict[str, object] = {"check_id": mark, "kind": "monthly", "complete": True, "headers_ok": True,
                                "quality_ok": True, "mismatched": [], "received_at": "2026-11-02T08:00:00+01:00",
                                "verified_at": "2026-11-02T08:00:01+01:00"}
    found.update(changes)
    return {"scope": "set", "status": "delivered", "outcome": "success", "constancy": found}


def test_a_receipt_with_results_passes_and_times_the_transfer(db: Database) -> None:
    check_id, transfer_id, mark = _check(db)
    check = _receipt(db, transfer_id, _results(mark), 1052.5)
    assert check is not None and check.id == check_id
    assert (check.result, check.transfer_time_s, check.reason) == ("passed", 42.5, None)
    assert (check.complete, check.headers_ok, check.quality_ok, check.receiver_checked) == (True, True, True, True)
    # The receipt is recorded once: a second final notification changes nothing.
    assert _receipt(db, transfer_id, _results(mark, complete=False), 1060.0) is None
    assert s.get_check(db, check_id).result == "passed"


def test_changed_header_entries_are_named_and_fail(db: Database) -> None:
    _, transfer_id, mark = _check(db)
    check = _receipt(db, transfer_id, _results(mark, headers_ok=False,
                                               mismatched=["SliceThickness (instance 2)"]), 1020.0)
    assert check is not None and check.result == "failed"
    assert check.headers_ok is False and check.complete is True
    assert check.reason is not None and "SliceThickness (instance 2)" in check.reason


def test_too_slow_or_incomplete_or_foreign_results(db: Database) -> None:
    _, slow, mark = _check(db, limit=30)
    check = _receipt(db, slow, _results(mark), 1041.0)
    assert check is not None and check.result == "failed" and "above the limit of 30 s" in (check.reason or "")
    _, other, _ = _check(db, started=2000.0, sent=2001.0)
    check = _receipt(db, other, _results("someone-elses-check"), 2010.0)
    assert check is not None and check.result == "failed" and "another check" in (check.reason or "")
    _, failed, mark = _check(db, started=3000.0, sent=3001.0)
    check = _receipt(db, failed, {"scope": "set", "status": "failed", "outcome": "fatal", "reason": "pacs-refused"},
                     3010.0)
    assert check is not None and check.result == "failed" and check.complete is False
    assert "pacs-refused" in (check.reason or "")


def test_a_foreign_receiver_checks_completeness_and_time_only(db: Database) -> None:
    _, transfer_id, _ = _check(db)
    check = _receipt(db, transfer_id, {"scope": "set", "status": "delivered", "outcome": "success"}, 1100.0)
    assert check is not None
    assert check.result == "passed" and check.complete is True
    assert check.quality_ok is None and check.headers_ok is None and check.receiver_checked is False
    assert "not checked by the receiver" in (check.reason or "")
    assert check.to_json()["quality_ok"] is None


def test_no_receipt_within_the_limit_fails_and_a_late_one_changes_nothing(db: Database) -> None:
    check_id, transfer_id, mark = _check(db, limit=5)
    assert s.settle(db, now=lambda: 1014.0) == []
    assert s.get_check(db, check_id).pending
    (finished,) = s.settle(db, now=lambda: 1016.0)
    assert finished.id == check_id and finished.result == "failed"
    assert finished.reason == "no receipt within the time limit of 5 s"
    assert _receipt(db, transfer_id, _results(mark), 1017.0) is None
    assert s.get_check(db, check_id).result == "failed"


def test_settle_fails_a_check_whose_transfer_failed(db: Database) -> None:
    check_id, _, _ = _check(db, status="failed")
    (finished,) = s.settle(db, now=lambda: 1011.0)
    assert finished.id == check_id and finished.reason == "the test transfer failed"


def test_the_second_daily_attempt_of_a_day(db: Database) -> None:
    now = datetime(2026, 11, 2, 9, 0).timestamp()
    assert s.next_attempt(db, "daily", PEER, now=lambda: now) == 1
    check_id, _, _ = _check(db, kind="daily", started=now - 3600, sent=now - 3590, limit=900)
    s.settle(db, now=lambda: now)
    assert s.get_check(db, check_id).result == "failed"
    assert s.next_attempt(db, "daily", PEER, now=lambda: now) == 2
    assert s.next_attempt(db, "monthly", PEER, now=lambda: now) == 1
    assert s.next_attempt(db, "daily", PEER, now=lambda: now + 86400) == 1  # another day


def test_list_json_is_the_issues_shape(db: Database) -> None:
    _, transfer_id, mark = _check(db)
    _receipt(db, transfer_id, _results(mark), 1012.25)
    _check(db, kind="daily", started=5000.0, sent=None, status="queued")
    checks = s.list_checks(db)
    assert [list(c.to_json()) for c in checks] == [LIST_KEYS, LIST_KEYS]
    first, second = (c.to_json() for c in checks)
    assert first["transfer_time_s"] == 2.25 and first["result"] == "passed" and first["limit_s"] == 900
    assert datetime.fromisoformat(str(first["started_at"])).utcoffset() is not None
    assert second["finished_at"] is None and second["complete"] is None and second["result"] == "pending"
    assert [c.id for c in s.list_checks(db, since=2000.0)] == [checks[1].id]
    assert [c.id for c in s.list_checks(db, until=2000.0, peer=PEER.upper())] == [checks[0].id]


def test_records_outlive_deleted_transfers_and_are_pruned_after_years(db: Database) -> None:
    check_id, transfer_id, mark = _check(db)
    _receipt(db, transfer_id, _results(mark), 1020.0)
    with db.transaction() as conn:
        conn.execute("DELETE FROM transfers WHERE id = ?", (transfer_id,))
    assert s.get_check(db, check_id).transfer_id is None
    assert s.prune_checks(db, 10, now=lambda: 1000.0 + 9 * 365 * 86400) == 0
    assert s.prune_checks(db, 10, now=lambda: 1000.0 + 11 * 365 * 86400) == 1


def test_constancy_config() -> None:
    config = parse_config(tomllib.loads(render_template("a@b.example")), Path("/x"))
    assert config.constancy == ConstancyConfig()
    assert config.constancy.header_entries == DEFAULT_HEADER_ENTRIES
    assert (config.constancy.time_limit, config.constancy.dataset_mib, config.constancy.retention_years) == (
        900, 20, 10)
    parsed = parse_config({"constancy": {"peers": ["p@q.example"], "time_limit": 5,
                                         "header_entries": ["Rows", "Columns"]}}, Path("/x"))
    assert parsed.constancy.peers == ("p@q.example",) and parsed.constancy.header_entries == ("Rows", "Columns")
    for bad in ({"time_limit": 901}, {"time_limit": 0}, {"header_entries": ["NotAKeyword"]},
                {"peers": ["nobody"]}, {"admin_address": "x"}, {"retention_years": 0}):
        with pytest.raises(ConfigError):
            parse_config({"constancy": bad}, Path("/x"))
