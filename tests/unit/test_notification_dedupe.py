"""Error reports about mails that failed decryption cannot be used to fail a good transfer; sent
notification files are removed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from dicommail.config import parse_config
from dicommail.errors import CryptoError
from dicommail.receiver import inbox
from dicommail.receiver.notify import HELD, PENDING, SENT, SUPERSEDED, Notifier
from dicommail.sender import tracking as t
from dicommail.store.db import Database
from dicommail.wire import notifications as n

SET_ID = "2.25.987654321"
HOSPITAL = "hospital@hospital.test"
PRACTICE = "practice@practice.test"


def _notifier(tmp_path: Path) -> tuple[Notifier, Database]:
    config = parse_config({"identity": {"address": PRACTICE}, "peers": {HOSPITAL: {"notification": "rfc"}}},
                          tmp_path)
    db = Database(tmp_path / "state.db")
    return Notifier(db, config, keyring=None), db  # type: ignore[arg-type]


_mail_ids = iter(range(1, 10_000))


def _fail(notifier: Notifier, db: Database, part: int) -> None:
    """A mail naming ``part`` of the set (in headers nobody vouches for) fails decryption."""
    row = {"id": next(_mail_ids), "kind": inbox.DICOM_MAIL, "set_id": SET_ID, "set_part": part,
           "message_id": f"<forged-{part}@evil.test>"}
    with db.transaction() as conn:
        notifier.on_mail_failed(conn, [row], CryptoError("decryption failed"))


def _verify(notifier: Notifier, db: Database, part: int) -> None:
    """What the pipeline does for a part that decrypted and verified."""
    signer = SimpleNamespace(user_id=f"Hospital <{HOSPITAL}>", fingerprint="F" * 40)
    received: Any = SimpleNamespace(set_id=SET_ID, set_part=part, set_total=3, message_id=f"<p{part}@h.test>",
                                    signer=signer)
    now = time.time()
    with db.transaction() as conn:
        conn.execute("INSERT INTO inbound_sets (set_id, sender, signer, set_total, status, first_seen_at,"
                     " updated_at) VALUES (?, ?, ?, 3, 'collecting', ?, ?) ON CONFLICT (signer, set_id) DO NOTHING",
                     (SET_ID, HOSPITAL, signer.fingerprint, now, now))
        set_ref = conn.execute("SELECT id FROM inbound_sets WHERE set_id = ?", (SET_ID,)).fetchone()[0]
        conn.execute("INSERT INTO inbound_parts (set_ref, set_part, inbound_id, directory) VALUES (?, ?, 1, 'x')",
                     (set_ref, part))
        notifier.on_part_verified(conn, received, set_ref, HOSPITAL)


def _errors(db: Database) -> list[tuple[int, str]]:
    return [(r["set_part"], r["status"]) for r in db.query(
        "SELECT set_part, status FROM notifications WHERE outcome = ? ORDER BY set_part, id", (n.ERROR,))]


def test_forged_failures_give_one_error_report_per_part_and_none_for_verified_parts(tmp_path: Path) -> None:
    notifier, db = _notifier(tmp_path)
    for _ in range(5):  # a flood of garbage naming parts 2 and 3 before any part is verified
        _fail(notifier, db, 2)
        _fail(notifier, db, 3)
    assert _errors(db) == [(2, HELD), (3, HELD)]
    _verify(notifier, db, 3)  # part 3 turns up good: its error is moot
    assert _errors(db) == [(2, PENDING), (3, SUPERSEDED)]
    for _ in range(5):  # more garbage, now that the signer is known
        _fail(notifier, db, 2)
        _fail(notifier, db, 3)
        _fail(notifier, db, 1)
    assert _errors(db) == [(1, PENDING), (2, PENDING), (3, SUPERSEDED)]
    _verify(notifier, db, 1)
    _fail(notifier, db, 1)  # part 1 is verified: nothing more about it
    assert _errors(db) == [(1, SUPERSEDED), (2, PENDING), (3, SUPERSEDED)]


class _Client:
    def __init__(self) -> None:
        self.sent: list[tuple[Path, bool]] = []

    async def __aenter__(self) -> _Client:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        return None

    async def send(self, path: Path, sender: str, recipients: list[str]) -> None:
        self.sent.append((path, path.exists()))


def test_a_sent_notification_file_is_removed(tmp_path: Path) -> None:
    notifier, db = _notifier(tmp_path)
    _verify(notifier, db, 1)
    client = _Client()
    assert asyncio.run(notifier.send_due(lambda: client)) == 1  # type: ignore[arg-type, return-value]
    [(path, existed)] = client.sent
    assert existed and not path.exists()
    [row] = db.query("SELECT status, path FROM notifications")
    assert row["status"] == SENT and row["path"] == str(path)


def test_a_notification_waits_while_this_sites_passphrase_is_wrong(tmp_path: Path, monkeypatch: Any) -> None:
    # Marked failed at the first try, it was never rebuilt once the admin fixed the passphrase file.
    from dicommail.errors import PassphraseError

    notifier, db = _notifier(tmp_path)
    _verify(notifier, db, 1)
    client = _Client()

    def locked(_row: object) -> Path:
        raise PassphraseError("wrong passphrase for the key 0123", "check identity.passphrase_file")

    monkeypatch.setattr(notifier, "_built", locked)
    assert asyncio.run(notifier.send_due(lambda: client)) == 0  # type: ignore[arg-type, return-value]
    assert [r["status"] for r in db.query("SELECT status FROM notifications")] == [PENDING]
    monkeypatch.undo()  # fixed
    assert asyncio.run(notifier.send_due(lambda: client)) == 1  # type: ignore[arg-type, return-value]
    assert [r["status"] for r in db.query("SELECT status FROM notifications")] == [SENT]


# -- the sender ------------------------------------------------------------------------------------


def _transfer(tmp_path: Path, resend_limit: int = 2) -> tuple[t.Tracker, Database]:
    db = Database(tmp_path / "sender.db")
    now = time.time()
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO transfers (id, set_id, recipient, study_uid, files, bytes, set_total, status, created_at, "
            "updated_at, first_sent_at, sent_at) VALUES (1, ?, ?, '1.2.3', 6, 6000, 3, 'sent', ?, ?, ?, ?)",
            (SET_ID, PRACTICE, now, now, now, now),
        )
        for part in (1, 2, 3):
            mail = tmp_path / f"part{part}.eml"
            mail.write_text("x")
            conn.execute(
                "INSERT INTO outbound_mails (transfer_id, set_part, message_id, path, size, status, sent_at) "
                "VALUES (1, ?, ?, ?, 1, 'sent', ?)",
                (part, f"<p{part}@hospital.test>", str(mail), now),
            )
    config = parse_config({"peers": {PRACTICE: {"notification": "rfc"}},
                           "tracking": {"resend_limit": resend_limit}}, tmp_path)
    return t.Tracker(db, config, keyring=None), db  # type: ignore[arg-type]


def _report(outcome: str, part: int | None, *, missing: list[int] | None = None) -> n.ReceivedReport:
    scope = n.PART if part is not None else n.SET
    status = n.StatusReport(scope=scope, set_id=SET_ID, status="x", outcome=outcome, set_part=part, set_total=3,
                            reason="decryption-failed" if outcome == n.ERROR else None,
                            missing_parts=missing or [])
    note = n.build_notification(status, original_message_id=f"<p{part or 1}@hospital.test>",
                                final_recipient=PRACTICE, reporting_host="practice.test")
    return n.ReceivedReport(note, None, PRACTICE, "")


def test_errors_about_acknowledged_parts_are_ignored(tmp_path: Path) -> None:
    tracker, db = _transfer(tmp_path, resend_limit=0)
    tracker.on_report(1, _report(n.SUCCESS, 1))
    for mail_id in range(2, 6):  # released errors about part 1: never resent, never failing the transfer
        tracker.on_report(mail_id, _report(n.ERROR, 1))
    view = t.get_transfer(db, SET_ID)
    assert (view.status, view.resends) == ("acknowledged", 0)
    assert [r["status"] for r in db.query("SELECT status FROM outbound_mails ORDER BY set_part")] == ["sent"] * 3


def test_missing_parts_resend_only_the_unacknowledged_ones(tmp_path: Path) -> None:
    tracker, db = _transfer(tmp_path)
    tracker.on_report(1, _report(n.SUCCESS, 1))
    tracker.on_report(2, _report(n.ERROR, None, missing=[1, 2]))
    assert [r["status"] for r in db.query("SELECT status FROM outbound_mails ORDER BY set_part")] == [
        "sent", "queued", "sent"]
    assert t.get_transfer(db, SET_ID).resends == 1
