"""Disposition notifications: both vocabularies, the status JSON, and the sender's state machine."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import pytest

from dicommail.config import parse_config
from dicommail.errors import ConfigError, WireFormatError
from dicommail.receiver.inbox import REPORT, classify
from dicommail.sender import tracking as t
from dicommail.store.db import Database
from dicommail.wire import notifications as n
from dicommail.wire.mime import LineReader, read_headers

SET_ID = "2.25.123456789"


@pytest.mark.parametrize(
    ("value", "outcome"),
    [
        ("automatic-action/MDN-sent-automatically; displayed", n.SUCCESS),
        ("automatic-action/MDN-sent-automatically; displayed/warning", n.WARNING),
        ("automatic-action/MDN-sent-automatically; deleted/error", n.ERROR),
        ("automatic-action/MDN-sent-automatically; deleted", n.FATAL),
        # RFC 8098 and RFC 3798 forms
        ("Automatic-Action/MDN-Sent-Automatically; processed", n.SUCCESS),
        ("automatic-action/MDN-sent-automatically; dispatched", n.SUCCESS),
        ("manual-action/MDN-sent-manually; displayed", n.SUCCESS),
        ("automatic-action/MDN-sent-automatically; processed/error", n.ERROR),
        ("automatic-action/MDN-sent-automatically;  displayed / error", n.ERROR),
        ("automatic-action/MDN-sent-automatically; failed", n.FATAL),
        ("automatic-action/MDN-sent-automatically; deleted/expired", n.FATAL),
        ("automatic-action/MDN-sent-automatically; processed/warning,superseded", n.FATAL),
    ],
)
def test_dispositions_in_both_vocabularies(value: str, outcome: str) -> None:
    assert n.parse_disposition(value).outcome == outcome


@pytest.mark.parametrize("value", ["displayed", "automatic-action; displayed", "a/b; ", "a/b; dis played!"])
def test_malformed_dispositions(value: str) -> None:
    with pytest.raises(WireFormatError):
        n.parse_disposition(value)


def test_we_send_the_drg_vocabulary() -> None:
    for outcome, text in n.DRG_DISPOSITIONS.items():
        assert str(n.disposition_for(outcome)) == text
        assert n.disposition_for(outcome).outcome == outcome


def test_status_json_round_trip_and_validation() -> None:
    report = n.StatusReport(scope=n.SET, set_id=SET_ID, status="incomplete", outcome=n.ERROR, set_total=3,
                            reason="parts-missing", missing_parts=[2], parts_received=2,
                            first_received_at="2026-11-23T08:00:00+00:00")
    data = json.loads(report.to_json())
    assert data["format"] == "dicommail-status" and data["version"] == 1
    assert n.StatusReport.from_json(report.to_json()) == report
    for change in ({"version": 2}, {"format": "x"}, {"set_id": "a b"}, {"files": -1}, {"missing_parts": [0]},
                   {"outcome": "great"}, {"scope": "study"}):
        with pytest.raises(WireFormatError):
            n.StatusReport.from_json(json.dumps({**data, **change}).encode())
    with pytest.raises(WireFormatError):
        n.StatusReport.from_json(b"[1, 2")


def test_plain_mdn_round_trip(tmp_path: Path) -> None:
    report = n.StatusReport(scope=n.PART, set_id=SET_ID, status="failed", outcome=n.ERROR, set_part=2, set_total=3,
                            reason="decryption-failed")
    built = n.build_notification(report, original_message_id="<abc@hospital.test>",
                                 final_recipient="practice@practice.test", reporting_host="practice.test")
    path = tmp_path / "mdn.eml"
    n.write_plain(built, path, sender="practice@practice.test", recipient="hospital@hospital.test",
                  message_id="<m1@practice.test>")
    with path.open("rb") as handle:
        headers = read_headers(LineReader(handle))
    assert classify(headers) == (REPORT, None)
    text = path.read_text()
    assert "Disposition: automatic-action/MDN-sent-automatically; deleted/error" in text
    assert "Auto-Submitted: auto-replied" in text and "X-TELEMEDICINE-SETPART: 2" in text
    parsed = n.parse_report(path.read_bytes())
    assert (parsed.set_id, parsed.set_part, parsed.set_total, parsed.scope) == (SET_ID, 2, 3, n.PART)
    assert parsed.outcome == n.ERROR and parsed.reason == "decryption-failed"
    assert parsed.original_message_id == "<abc@hospital.test>"
    assert parsed.final_recipient == "practice@practice.test"
    assert parsed.status == report
    assert "part 2 of 3" in parsed.text


def test_foreign_rfc8098_mdn_without_status_json() -> None:
    raw = (
        "From: reader@elsewhere.test\r\nTo: hospital@hospital.test\r\nMIME-Version: 1.0\r\n"
        f"X-TELEMEDICINE-SETID: {SET_ID}\r\n"
        'Content-Type: multipart/report; report-type="disposition-notification"; boundary="b1"\r\n\r\n'
        "--b1\r\nContent-Type: text/plain\r\n\r\nYour message was processed.\r\n"
        "--b1\r\nContent-Type: message/disposition-notification\r\n\r\n"
        "Reporting-UA: elsewhere.test; SomeViewer 3.1\r\nFinal-Recipient: rfc822; reader@elsewhere.test\r\n"
        "Original-Message-ID: <orig@hospital.test>\r\n"
        "Disposition: automatic-action/MDN-sent-automatically; processed\r\n"
        "--b1--\r\n"
    ).encode()
    parsed = n.parse_report(raw)
    assert parsed.outcome == n.SUCCESS and parsed.status is None
    assert parsed.set_id == SET_ID and parsed.scope == n.SET
    assert parsed.original_message_id == "<orig@hospital.test>"
    with pytest.raises(WireFormatError, match="report"):
        n.parse_report(raw.replace(b"disposition-notification\"", b"delivery-status\""))


def test_peer_notification_setting() -> None:
    config = parse_config({"peers": {"a@b.test": {"notification": "both", "max_mail_size": "1M"}}}, Path("/x"))
    assert config.notification_for("A@b.test") == "both"
    assert config.notification_for("other@b.test") == "pgp"
    with pytest.raises(ConfigError, match="notification"):
        parse_config({"peers": {"a@b.test": {"notification": "fax"}}}, Path("/x"))
    assert parse_config({"tracking": {"resend_limit": 0}}, Path("/x")).tracking.resend_limit == 0


# -- the sender's state machine, with plain MDNs (no keys needed) ------------------------------------


PEER = "practice@practice.test"


class _Clock:
    def __init__(self) -> None:
        self.at = time.time()

    def __call__(self) -> float:
        return self.at


def _outbox(tmp_path: Path, parts: int = 3, resend_limit: int = 1) -> tuple[t.Tracker, Database, _Clock]:
    db = Database(tmp_path / "state.db")
    clock = _Clock()
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO transfers (id, set_id, recipient, study_uid, files, bytes, set_total, status, created_at, "
            "updated_at, first_sent_at, sent_at) VALUES (1, ?, ?, '1.2.3', 6, 6000, ?, 'sent', ?, ?, ?, ?)",
            (SET_ID, PEER, parts, clock.at, clock.at, clock.at, clock.at),
        )
        for part in range(1, parts + 1):
            mail = tmp_path / f"part{part}.eml"
            mail.write_text("x")
            conn.execute(
                "INSERT INTO outbound_mails (transfer_id, set_part, message_id, path, size, status, sent_at) "
                "VALUES (1, ?, ?, ?, 1, 'sent', ?)",
                (part, f"<p{part}@hospital.test>", str(mail), clock.at),
            )
    config = parse_config({"peers": {PEER: {"notification": "rfc"}},
                           "tracking": {"resend_limit": resend_limit, "ack_timeout": 600}}, tmp_path)
    return t.Tracker(db, config, keyring=None, now=clock), db, clock  # type: ignore[arg-type]


def _report(outcome: str, scope: str = n.PART, part: int | None = 1, *, reason: str | None = None,
            missing: list[int] | None = None, sender: str = PEER, message_id: str = "") -> n.ReceivedReport:
    status = n.StatusReport(scope=scope, set_id=SET_ID, status="x", outcome=outcome, set_part=part, set_total=3,
                            reason=reason, missing_parts=missing or [])
    original = f"<p{part or 1}@hospital.test>"
    note = n.build_notification(status, original_message_id=original, final_recipient=PEER,
                                reporting_host="practice.test")
    return n.ReceivedReport(note, None, sender, message_id)


def _state(db: Database) -> tuple[str, list[str]]:
    transfer = db.query("SELECT status FROM transfers")[0]["status"]
    return transfer, [r["status"] for r in db.query("SELECT status FROM outbound_mails ORDER BY set_part")]


def test_acks_resend_then_delivery(tmp_path: Path) -> None:
    tracker, db, clock = _outbox(tmp_path)
    tracker.on_report(1, _report(n.SUCCESS, part=1))
    tracker.on_report(1, _report(n.SUCCESS, part=1))  # the same mail again (a rerun): handled once
    assert _state(db) == ("acknowledged", ["sent", "sent", "sent"])
    tracker.on_report(2, _report(n.ERROR, part=2, reason="decryption-failed"))
    assert _state(db) == ("sending", ["sent", "queued", "sent"])
    tracker.on_report(3, _report(n.ERROR, part=2, reason="decryption-failed"))  # the rfc twin of the pgp one
    assert t.get_transfer(db, SET_ID).resends == 1
    clock.at += 42.5
    tracker.on_report(4, _report(n.SUCCESS, scope=n.SET, part=None))
    view = t.get_transfer(db, "1")
    assert (view.status, view.transfer_seconds, view.parts_acknowledged) == ("delivered", 42.5, 3)
    tracker.on_report(5, _report(n.FATAL, part=3, reason="integrity"))  # too late: delivered stays
    assert t.get_transfer(db, SET_ID).status == "delivered"
    events = [e.event for e in t.timeline(db, 1)]
    assert events[0] == "queued" and "resend" in events and "delivered" in events
    assert [v.id for v in t.list_transfers(db, t.ACTIVE)] == []
    assert [v.id for v in t.list_transfers(db, (t.DELIVERED,))] == [1]


def test_resend_limit_and_hard_errors(tmp_path: Path) -> None:
    tracker, db, _clock = _outbox(tmp_path, resend_limit=0)
    tracker.on_report(1, _report(n.ERROR, scope=n.SET, part=None, reason="parts-missing", missing=[2, 3]))
    view = t.get_transfer(db, SET_ID)
    assert view.status == "failed" and view.reason == "parts-missing" and "resend limit" in (view.error or "")
    assert t.retry_transfer(db, 1) == 3
    assert _state(db) == ("sending", ["queued", "queued", "queued"])
    tracker.on_report(2, _report(n.FATAL, scope=n.SET, part=None, reason="pacs-refused"))
    assert t.get_transfer(db, SET_ID).status == "failed"
    assert t.get_transfer(db, SET_ID).reason == "pacs-refused"


def test_untrusted_plain_mdns_are_ignored(tmp_path: Path) -> None:
    tracker, db, _clock = _outbox(tmp_path)
    tracker.on_report(1, _report(n.SUCCESS, scope=n.SET, part=None, sender="mallory@evil.test"))
    wrong_id = _report(n.SUCCESS, scope=n.SET, part=None)
    wrong_id.notification.original_message_id = "<other@hospital.test>"
    tracker.on_report(2, wrong_id)
    assert t.get_transfer(db, SET_ID).status == "sent"
    details = [r["detail"] for r in db.query("SELECT detail FROM acknowledgements WHERE accepted = 0")]
    assert len(details) == 2 and "mallory" in details[0] and "Original-Message-ID" in details[1]
    # A pgp-configured peer's plain MDNs are not believed at all.
    strict = t.Tracker(db, parse_config({}, tmp_path), keyring=None)  # type: ignore[arg-type]
    strict.on_report(3, _report(n.SUCCESS, scope=n.SET, part=None))
    assert t.get_transfer(db, SET_ID).status == "sent"


def test_expiry_and_cancel(tmp_path: Path) -> None:
    tracker, db, clock = _outbox(tmp_path)
    clock.at += 601
    assert tracker.expire_overdue() == 1
    assert t.get_transfer(db, SET_ID).status == "expired"
    tracker.on_report(1, _report(n.SUCCESS, scope=n.SET, part=None))  # a late final notification is the truth
    assert t.get_transfer(db, SET_ID).status == "delivered"
    with pytest.raises(Exception, match="only active"):
        t.cancel_transfer(db, 1)
    assert t.delete_transfer(db, 1) == 3
    assert t.list_transfers(db) == []


def test_status_and_transfers_commands(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from dicommail.cli import cli

    (tmp_path / "dicommail.toml").touch()
    tracker, db, _clock = _outbox(tmp_path)
    tracker.on_report(1, _report(n.SUCCESS, part=1))
    db.close()
    runner = CliRunner()
    home = ["--home", str(tmp_path)]
    listing = runner.invoke(cli, [*home, "status", "--json", "--waiting"])
    assert listing.exit_code == 0, listing.output
    (row,) = json.loads(listing.output)["transfers"]
    assert (row["status"], row["parts_acknowledged"]) == ("acknowledged", 1) and "patient_name" not in row
    assert json.loads(runner.invoke(cli, [*home, "status", "--json", "--done"]).output)["transfers"] == []
    assert runner.invoke(cli, [*home, "status", "--since", "yesterday"]).exit_code == 2  # a usage error
    shown = runner.invoke(cli, [*home, "status", SET_ID])
    assert shown.exit_code == 0 and "acknowledged" in shown.output and "notification" in shown.output
    # Without a terminal and without --yes nothing changes.
    refused = runner.invoke(cli, [*home, "transfers", "cancel", SET_ID])
    assert refused.exit_code == 1 and "not confirmed" in refused.output
    assert runner.invoke(cli, [*home, "transfers", "cancel", "1", "--yes"]).exit_code == 0
    assert runner.invoke(cli, [*home, "transfers", "retry", SET_ID, "--yes"]).exit_code == 0
    assert json.loads(runner.invoke(cli, [*home, "status", "--json", "--active"]).output)["transfers"][0][
        "status"] == "sending"
    assert runner.invoke(cli, [*home, "transfers", "delete", SET_ID, "--yes"]).exit_code == 1  # still active


@pytest.mark.parametrize("method", ["both", "pgp"])
def test_plain_mdn_only_from_rfc_peers(tmp_path: Path, method: str) -> None:
    """A peer set to "both" (or "pgp") signs its notifications: a plain one in its name is not believed."""
    _tracker, db, clock = _outbox(tmp_path)
    config = parse_config({"peers": {PEER: {"notification": method}}}, tmp_path)
    tracker = t.Tracker(db, config, keyring=None, now=clock)  # type: ignore[arg-type]
    decision = tracker.decide(1, _report(n.SUCCESS, scope=n.SET, part=None))
    assert not decision.accepted and f'notification = "{method}"' in decision.detail
    assert t.get_transfer(db, SET_ID).status == "sent"
    (row,) = db.query("SELECT method, accepted FROM acknowledgements")
    assert (row["method"], row["accepted"]) == ("rfc", 0)
    # The same MDN from a peer set to "rfc" counts.
    rfc = t.Tracker(db, parse_config({"peers": {PEER: {"notification": "rfc"}}}, tmp_path), keyring=None,  # type: ignore[arg-type]
                    now=clock)
    assert rfc.decide(2, _report(n.SUCCESS, scope=n.SET, part=None)).accepted
    assert t.get_transfer(db, SET_ID).status == "delivered"


def test_signed_ack_counts_only_from_a_certified_user_id(tmp_path: Path, new_keyring: Any) -> None:
    """A certified peer that adds the recipient's address to its key later cannot acknowledge for it."""
    from datetime import UTC, datetime

    from dicommail.crypto.gpg import Verification
    from dicommail.crypto.keys import certify, export_key, generate, import_keys

    ours, other, genuine = new_keyring(), new_keyring(), new_keyring()
    generate(ours, "Hospital (TEST ONLY)", "hospital@hospital.test", algo="ed25519", expires="never")
    sneaky = generate(other, "Other (TEST ONLY)", "other@other.test", algo="ed25519", expires="never")
    real = generate(genuine, "Practice (TEST ONLY)", PEER, algo="ed25519", expires="never")
    for source, key in ((other, sneaky), (genuine, real)):
        import_keys(ours, export_key(source, key.fingerprint).encode())
        certify(ours, key.fingerprint)
    assert other.run(["--quick-add-uid", sneaky.fingerprint, f"Practice <{PEER}>"]).returncode == 0
    import_keys(ours, export_key(other, sneaky.fingerprint).encode())

    _tracker, db, clock = _outbox(tmp_path)
    tracker = t.Tracker(db, parse_config({}, tmp_path), keyring=ours, now=clock)

    def signed(key_fpr: str) -> n.ReceivedReport:
        plain = _report(n.SUCCESS, scope=n.SET, part=None)
        signer = Verification(key_fpr, key_fpr, f"Practice <{PEER}>", datetime.now(UTC), "full")
        return n.ReceivedReport(plain.notification, signer, PEER, "")

    refused = tracker.decide(1, signed(sneaky.fingerprint))
    assert not refused.accepted and "does not belong to the transfer's recipient" in refused.detail
    assert t.get_transfer(db, SET_ID).status == "sent"
    assert tracker.decide(2, signed(real.fingerprint)).accepted
    assert t.get_transfer(db, SET_ID).status == "delivered"


@pytest.mark.parametrize(("written_after", "expected"), [(12.0, 12.0), (None, 70.0), (500.0, 70.0), (-5.0, 0.0)])
def test_the_transfer_time_ends_when_the_receiver_wrote_its_acknowledgement(
        tmp_path: Path, written_after: float | None, expected: float) -> None:
    # Fetched a minute later by a timer, the acknowledgement was written 12 s after the first mail went:
    # the transfer time is 12 s.  An unsigned Date outside [first send, now] is not believed.
    tracker, db, clock = _outbox(tmp_path)
    first_sent = clock.at
    clock.at += 70.0
    report = _report(n.SUCCESS, scope=n.SET, part=None)
    written_at = None if written_after is None else first_sent + written_after
    tracker.on_report(1, dataclasses.replace(report, written_at=written_at))
    assert t.get_transfer(db, "1").transfer_seconds == expected
