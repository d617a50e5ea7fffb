"""Running a site for months: retention (``Site.cleanup``), the disk guard and statistics (``Site.stats``)."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import logging
import os
import time
from datetime import datetime
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, build_context

from dicommail import Site
from dicommail.cli import cli
from dicommail.config import parse_config, parse_free_space
from dicommail.crypto.gpg import Keyring
from dicommail.errors import ConfigError, InputError
from dicommail.receiver.daemon import Receiver
from dicommail.receiver.destinations import FolderDestination
from dicommail.site.operations import CleanupReport, Operations, StatsReport, free_space_short, percentile
from dicommail.store.db import Database
from testbed import MailServers, Pacs, dcmtk_tool
from testbed.ports import free_ports, port_listening
from testbed.sites import HOSPITAL, PRACTICE, gateway_config, make_home, remove_home

DAY = 86400.0
OTHER = "reading@other.test"
ROUTE = "PRACTICE_DR"
CT = "1.2.840.10008.5.1.4.1.1.2"


class OpsSite(Site, Operations):
    """A Site with the operations (until the lead adds Operations to Site's own bases)."""


@pytest.fixture
def home(tmp_path: Path) -> Path:
    (tmp_path / "dicommail.toml").write_text(f'[identity]\naddress = "{HOSPITAL}"\n')
    return tmp_path


@pytest.fixture
def with_operations(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI opens an :class:`OpsSite`."""
    monkeypatch.setattr("dicommail.Site", OpsSite)


def _db(home: Path) -> Database:
    return Database(home / "state.db")


# -- config -----------------------------------------------------------------------------------------


def test_retention_settings_and_their_defaults(tmp_path: Path) -> None:
    defaults = parse_config({}, tmp_path).retention
    assert (defaults.outbox_days, defaults.inbox_days, defaults.notifications_days) == (30, 30, 7)
    assert defaults.min_free_space == 1024**3
    config = parse_config({"retention": {"min_free_space": "1000T", "outbox_days": 0}}, tmp_path)
    assert config.retention.min_free_space == 1000 * 1024**4 and config.retention.outbox_days == 0
    assert parse_free_space("0") == 0 and parse_free_space(0) == 0 and parse_free_space("512M") == 512 * 1024**2
    with pytest.raises(ConfigError, match="min_free_space"):
        parse_config({"retention": {"min_free_space": "lots"}}, tmp_path)
    with pytest.raises(ConfigError, match="inbox_days"):
        parse_config({"retention": {"inbox_days": -1}}, tmp_path)
    assert free_space_short(tmp_path, 0) is None
    assert free_space_short(tmp_path / "not" / "yet", 1000 * 1024**4) is not None


# -- retention --------------------------------------------------------------------------------------


def _mail(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    return path


def _transfer(db: Database, home: Path, ident: int, status: str, *, at: float, finished: float | None = None,
              parts: int = 2, size: int = 100, outside: bool = False) -> list[Path]:
    folder = home if outside else home / "spool" / "outbox" / f"set-{ident}"
    paths = [_mail(folder / f"t{ident}-part{part}.eml", size) for part in range(1, parts + 1)]
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO transfers (id, set_id, recipient, study_uid, files, bytes, set_total, status, created_at,"
            " updated_at, first_sent_at, sent_at) VALUES (?, ?, ?, '1.2.3', 4, 4000, ?, ?, ?, ?, ?, ?)",
            (ident, f"2.25.{ident}", PRACTICE, parts, status, at, at, at, at),
        )
        conn.execute("INSERT INTO transfer_tracking (transfer_id, images, finished_at) VALUES (?, 4, ?)",
                     (ident, finished))
        for part, path in enumerate(paths, 1):
            conn.execute("INSERT INTO outbound_mails (transfer_id, set_part, message_id, path, size, status, sent_at)"
                         " VALUES (?, ?, ?, ?, ?, 'sent', ?)", (ident, part, f"<t{ident}p{part}@h.test>", str(path),
                                                                  size, at))
    return paths


def _received(db: Database, home: Path, ident: int, status: str, *, at: float, mails: int = 2, size: int = 50
              ) -> list[Path]:
    paths = [_mail(home / "spool" / "inbox" / f"s{ident}-{n}.eml", size) for n in range(mails)]
    with db.transaction() as conn:
        conn.execute("INSERT INTO inbound_sets (id, set_id, signer, sender, set_total, status, first_seen_at,"
                     " updated_at, delivered_at) VALUES (?, ?, 'F00D', ?, ?, ?, ?, ?, ?)",
                     (ident, f"2.25.9{ident}", HOSPITAL, mails, status, at, at,
                      at if status == "delivered" else None))
        for n, path in enumerate(paths):
            conn.execute("INSERT INTO inbound_mails (account, server_uid, size, spool_path, kind, status, set_ref,"
                         " received_at, processed_at) VALUES ('imap://x', ?, ?, ?, 'dicom-mail', 'processed', ?, ?, ?)",
                         (f"{ident}:{n}", size, str(path), ident, at, at))
    return paths


@pytest.fixture
def aged_home(home: Path) -> dict[str, list[Path]]:
    """Files of finished work 40 days old, and files that must stay whatever their age."""
    old, recent = time.time() - 40 * DAY, time.time() - DAY
    db = _db(home)
    try:
        files = {
            "delivered": _transfer(db, home, 1, "delivered", at=old, finished=old),
            "cancelled": _transfer(db, home, 2, "cancelled", at=old),
            "sending": _transfer(db, home, 3, "sending", at=old),
            "failed": _transfer(db, home, 4, "failed", at=old),
            "expired": _transfer(db, home, 5, "expired", at=old),
            "delivered-recently": _transfer(db, home, 6, "delivered", at=old, finished=recent),
            "outside-the-spool": _transfer(db, home, 7, "delivered", at=old, finished=old, outside=True),
            "set-delivered": _received(db, home, 1, "delivered", at=old),
            "set-failed": _received(db, home, 2, "failed", at=old, mails=1),
            "set-collecting": _received(db, home, 3, "collecting", at=old),
            "set-delivered-recently": _received(db, home, 4, "delivered", at=recent),
        }
        report_mail = _mail(home / "spool" / "inbox" / "report.eml", 30)
        stored_mail = _mail(home / "spool" / "inbox" / "stored.eml", 30)
        sent_note = _mail(home / "spool" / "notifications" / "notification-1.eml", 20)
        pending_note = _mail(home / "spool" / "notifications" / "notification-2.eml", 20)
        with db.transaction() as conn:
            for uid, path, kind, status in (("r", report_mail, "report", "processed"),
                                            ("s", stored_mail, "dicom-mail", "stored"),
                                            ("big", None, "other", "too-large")):
                conn.execute("INSERT INTO inbound_mails (account, server_uid, size, spool_path, kind, status,"
                             " received_at, processed_at) VALUES ('imap://x', ?, 30, ?, ?, ?, ?, ?)",
                             (uid, str(path) if path else "", kind, status, old, old))
            for ident, path, status in ((1, sent_note, "sent"), (2, pending_note, "pending")):
                conn.execute("INSERT INTO notifications (id, event, set_id, scope, outcome, message_id, path,"
                             " status, created_at, sent_at) VALUES (?, ?, '2.25.1', 'set', 'success', ?, ?, ?, ?, ?)",
                             (ident, f"e{ident}", f"<n{ident}@p.test>", str(path), status, old,
                              old if status == "sent" else None))
        files.update(report=[report_mail], stored=[stored_mail], sent_note=[sent_note], pending_note=[pending_note])
    finally:
        db.close()
    old_item = home / "spool" / "quarantine" / "20200101T000000-mail-9"
    _mail(old_item / "reason.json", 10)
    _mail(old_item / "m.eml", 90)
    os.utime(old_item / "reason.json", (old, old))
    files["quarantined"] = [old_item / "reason.json", old_item / "m.eml"]
    return files


GONE = ("delivered", "cancelled", "set-delivered", "set-failed", "report", "sent_note", "quarantined")


def _rows(home: Path) -> tuple[int, ...]:
    db = _db(home)
    try:
        return tuple(db.query(f"SELECT COUNT(*) FROM {table}")[0][0]
                     for table in ("transfers", "outbound_mails", "inbound_sets", "inbound_mails", "notifications"))
    finally:
        db.close()


def test_cleanup_removes_files_of_finished_work_and_keeps_the_records(home: Path,
                                                                       aged_home: dict[str, list[Path]]) -> None:
    site = OpsSite.open(home)
    rows = _rows(home)
    dry = site.cleanup(dry_run=True)
    assert isinstance(dry, CleanupReport) and dry.dry_run
    assert all(p.exists() for paths in aged_home.values() for p in paths)  # a dry run removes nothing
    expected = {"outbox": (4, 400), "inbox": (4, 180), "notifications": (1, 20), "quarantine": (2, 100)}
    assert {c.kind: (c.files, c.bytes) for c in dry.counts} == expected

    done = site.cleanup()
    assert not done.dry_run and done.errors == ()
    assert {c.kind: (c.files, c.bytes) for c in done.counts} == expected
    assert (done.files, done.bytes) == (11, 700)
    for kind, paths in aged_home.items():
        assert all(not p.exists() for p in paths) if kind in GONE else all(p.exists() for p in paths), kind
    assert _rows(home) == rows  # records stay
    assert not (home / "spool" / "outbox" / "set-1").exists()  # the emptied folders go too
    assert (home / "spool" / "outbox").is_dir()
    # What `status` shows is still there.
    assert [t.status for t in site.transfers()][:2] == ["delivered", "cancelled"]
    # Nothing more to do, and the JSON is the report's.
    again = site.cleanup()
    assert again.files == 0
    assert again.to_json() == {
        "ok": True, "dry_run": False, "files": 0, "bytes": 0, "errors": [],
        "kinds": [{"kind": k, "days": d, "files": 0, "bytes": 0}
                  for k, d in (("outbox", 30), ("inbox", 30), ("notifications", 7), ("quarantine", 30))],
    }


def test_cleanup_cli_dry_run_and_json(home: Path, aged_home: dict[str, list[Path]], with_operations: None) -> None:
    runner = CliRunner()
    shown = runner.invoke(cli, ["--home", str(home), "cleanup", "--dry-run"])
    assert shown.exit_code == 0, shown.output
    assert "would remove 11 file(s)" in shown.output and "nothing was removed" in shown.output
    assert all(len(line) <= 80 for line in shown.output.splitlines())
    assert all(p.exists() for paths in aged_home.values() for p in paths)
    result = runner.invoke(cli, ["--home", str(home), "cleanup", "--json"])
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["ok"] is True and document["dry_run"] is False and document["files"] == 11
    assert not aged_home["delivered"][0].exists() and aged_home["sending"][0].exists()


def test_zero_days_keeps_files_for_ever(home: Path, aged_home: dict[str, list[Path]]) -> None:
    (home / "dicommail.toml").write_text("[retention]\noutbox_days = 0\ninbox_days = 0\nnotifications_days = 0\n")
    report = OpsSite.open(home).cleanup()
    assert [c.kind for c in report.counts if c.files] == ["quarantine"]
    assert aged_home["delivered"][0].exists() and aged_home["set-delivered"][0].exists()


def _receiver(home: Path, keyring: Keyring, db: Database, retriever: object) -> Receiver:
    config = parse_config({"identity": {"address": PRACTICE}, "retention": {"min_free_space": "1000T"}}, home)
    return Receiver(config, retriever, FolderDestination(home / "out"), db, keyring)  # type: ignore[arg-type]


class _Mailbox:
    """A retriever that counts its fetches."""

    def __init__(self) -> None:
        self.fetches = 0

    async def fetch(self) -> object:
        self.fetches += 1
        return None

    async def wait_for_mail(self, timeout: float) -> bool:
        return False

    async def close(self) -> None:
        return None


def test_receiver_cleans_up_at_start_and_stops_fetching_when_the_disk_is_short(
    home: Path, aged_home: dict[str, list[Path]], practice: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    db = _db(home)
    try:
        # aged_home's mail stored before the disk filled up is still processed (it cannot be opened: quarantined).
        mailbox = _Mailbox()
        receiver = _receiver(home, practice, db, mailbox)
        caplog.set_level(logging.INFO, logger="dicommail")
        report = asyncio.run(receiver.cycle())
        assert mailbox.fetches == 0
        assert report.fetch_error is not None and "min_free_space" in report.fetch_error.message
        errors = [r for r in caplog.records if r.levelno == logging.ERROR and "min_free_space" in r.getMessage()]
        assert len(errors) == 1
        assert report.quarantined == 1  # processing went on
        assert not aged_home["delivered"][0].exists()  # the clean-up at start
        assert any("retention: removed" in r.getMessage() for r in caplog.records)
        # The next cycle within the hour does not clean up again, and logs the guard once more.
        caplog.clear()
        asyncio.run(receiver.cycle())
        assert mailbox.fetches == 0
        assert not any("retention: removed" in r.getMessage() for r in caplog.records)
        guard = [r for r in caplog.records if r.levelno == logging.ERROR and "min_free_space" in r.getMessage()]
        assert len(guard) == 1
    finally:
        db.close()


# -- the gateway's disk guard (real dcmtk storescu) ----------------------------------------------------


@pytest.mark.integration
def test_gateway_answers_out_of_resources_when_the_disk_is_short(
    mail_servers: MailServers, pacs: Pacs, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from dicommail.samples import write_ct_study

    port = free_ports(1)[0]
    extra = gateway_config(port, {ROUTE: PRACTICE}) + '\n[retention]\nmin_free_space = "1000T"\n'
    gw_home = make_home("hospital", HOSPITAL, mail_servers, pacs, extra=extra)
    study = write_ct_study(tmp_path / "study", 2, 16)
    site = Site.open(gw_home.path)
    caplog.set_level(logging.INFO, logger="dicommail")

    def pynetdicom_push() -> list[int]:
        """Both instances over one association: the exact statuses."""
        ae = AE(ae_title="HOSPPACS")
        assoc = ae.associate("127.0.0.1", port, [build_context(CT, [ExplicitVRLittleEndian])], ae_title=ROUTE)
        assert assoc.is_established
        try:
            return [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for path in study]
        finally:
            assoc.release()

    async def main() -> tuple[int, str, list[int]]:
        stop = asyncio.Event()
        gateway = asyncio.create_task(site.gateway(stop=stop))
        while not port_listening(port):
            assert not gateway.done(), gateway
            await asyncio.sleep(0.05)
        push = await asyncio.create_subprocess_exec(
            dcmtk_tool("storescu"), "-v", "-aet", "HOSPPACS", "-aec", ROUTE, "127.0.0.1", str(port),
            *map(str, study), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        output, _ = await push.communicate()
        statuses = await asyncio.to_thread(pynetdicom_push)
        stop.set()
        await gateway
        assert push.returncode is not None
        return push.returncode, output.decode(errors="replace"), statuses

    try:
        code, output, statuses = asyncio.run(main())
        assert "Refused: OutOfResources" in output and code != 0, output  # storescu's name for 0xA700
        assert statuses == [0xA700, 0xA700]
        refused = [r for r in caplog.records if r.levelno == logging.ERROR and "min_free_space" in r.getMessage()]
        assert len(refused) == 2  # once per association (storescu's, then pynetdicom's), not once per instance
        db = _db(gw_home.path)
        try:
            assert db.query("SELECT COUNT(*) FROM gateway_studies")[0][0] == 0
        finally:
            db.close()
        assert not list((gw_home.path / "spool" / "gateway").glob("*/*.dcm"))
    finally:
        remove_home(gw_home)


# -- statistics -------------------------------------------------------------------------------------


def _at(year: int, month: int, day: int = 15) -> float:
    return datetime(year, month, day, 12).timestamp()  # local time, mid-month: the same month in any zone


_next_id = iter(range(100, 10_000))


def _sent(db: Database, recipient: str, status: str, at: float, *, seconds: float | None = None, images: int = 10,
          mail_sizes: tuple[int, ...] = (1000, 500), route: str | None = None, constancy: bool = False) -> None:
    ident = next(_next_id)
    with db.transaction() as conn:
        conn.execute(
            "INSERT INTO transfers (id, set_id, recipient, study_uid, files, bytes, set_total, status, created_at,"
            " updated_at, first_sent_at) VALUES (?, ?, ?, '1.2.3', ?, 99999, ?, ?, ?, ?, ?)",
            (ident, f"2.25.{ident}", recipient, images + 1, len(mail_sizes), status, at, at, at),
        )
        conn.execute("INSERT INTO transfer_tracking (transfer_id, images, transfer_seconds) VALUES (?, ?, ?)",
                     (ident, images, seconds))
        for part, size in enumerate(mail_sizes, 1):
            conn.execute("INSERT INTO outbound_mails (transfer_id, set_part, message_id, path, size, status) VALUES"
                         " (?, ?, ?, '/nowhere', ?, 'sent')", (ident, part, f"<{ident}.{part}@h.test>", size))
        if route is not None:
            study = conn.execute(
                "INSERT INTO gateway_studies (route, study_uid, status, instances, bytes, calling_aet, peer,"
                " first_received_at, last_received_at, updated_at) VALUES (?, '1.2.3', 'sent', ?, 1, 'PACS',"
                " '127.0.0.1', ?, ?, ?)", (route, images, at, at, at)).lastrowid
            conn.execute("INSERT INTO gateway_transfers (study_id, recipient, transfer_id) VALUES (?, ?, ?)",
                         (study, recipient, ident))
        if constancy:
            conn.execute("INSERT INTO constancy_checks (kind, peer, attempt, mark_id, transfer_id, started_at,"
                         " limit_s, result) VALUES ('daily', ?, 1, ?, ?, ?, 900, 'passed')",
                         (recipient, f"check-{ident}", ident, at))


def _got(db: Database, sender: str, status: str, at: float, *, seconds: float | None = None, instances: int = 3,
         mail_sizes: tuple[int, ...] = (700,), constancy: bool = False) -> None:
    ident = next(_next_id)
    delivered = at + seconds if seconds is not None else None
    with db.transaction() as conn:
        conn.execute("INSERT INTO inbound_sets (id, set_id, signer, sender, set_total, status, first_seen_at,"
                     " updated_at, delivered_at) VALUES (?, ?, 'F00D', ?, 1, ?, ?, ?, ?)",
                     (ident, f"2.25.{ident}", sender, status, at + 1, at, delivered))
        for n, size in enumerate(mail_sizes):
            conn.execute("INSERT INTO inbound_mails (account, server_uid, size, spool_path, kind, status, set_ref,"
                         " received_at) VALUES ('imap://x', ?, ?, '', 'dicom-mail', 'processed', ?, ?)",
                         (f"{ident}:{n}", size, ident, at))
        for n in range(instances):
            conn.execute("INSERT INTO forwarded_instances (set_ref, sop_instance_uid, state, forwarded_at) VALUES"
                         " (?, ?, 'stored', ?)", (ident, f"1.2.{ident}.{n}", at))
        conn.execute("INSERT INTO forwarded_instances (set_ref, sop_instance_uid, state, forwarded_at) VALUES"
                     " (?, ?, 'sending', ?)", (ident, f"1.2.{ident}.in-flight", at))  # not counted: not accepted
        if constancy:
            conn.execute("INSERT INTO notifications (event, set_id, set_ref, scope, outcome, message_id, status,"
                         " created_at, report) VALUES (?, ?, ?, 'set', 'success', ?, 'sent', ?, ?)",
                         (f"c{ident}", f"2.25.{ident}", ident, f"<c{ident}@p.test>", at,
                          json.dumps({"status": "delivered", "constancy": {"passed": True}})))


@pytest.fixture
def stats_home(home: Path) -> Path:
    db = _db(home)
    try:
        jan, feb = _at(2026, 1), _at(2026, 2)
        for seconds in (10.0, 20.0, 30.0, 100.0):
            _sent(db, PRACTICE, "delivered", jan, seconds=seconds)
        _sent(db, PRACTICE.upper(), "failed", jan)  # the same peer, whatever the case
        _sent(db, PRACTICE, "expired", feb)
        _sent(db, PRACTICE, "sending", feb)
        _sent(db, PRACTICE, "delivered", feb, seconds=5.0, constancy=True)  # a test set: left out
        _sent(db, OTHER, "delivered", feb, seconds=50.0, images=7, mail_sizes=(300,), route=ROUTE)
        _got(db, HOSPITAL, "delivered", jan, seconds=60.0)
        _got(db, HOSPITAL, "delivered", feb, seconds=120.0, instances=4, mail_sizes=(800, 900))
        _got(db, HOSPITAL, "failed", feb, instances=0)
        _got(db, HOSPITAL, "delivered", feb, seconds=1.0, constancy=True)  # a test set: left out
    finally:
        db.close()
    return home


def test_percentiles_interpolate_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([30.0, 10.0, 100.0, 20.0], 0.5) == 25.0
    assert percentile([10.0, 20.0, 30.0, 100.0], 0.95) == pytest.approx(89.5)


def test_stats_by_peer(stats_home: Path) -> None:
    report = OpsSite.open(stats_home).stats()
    assert isinstance(report, StatsReport) and report.by == "peer"
    assert [g.key for g in report.groups] == [HOSPITAL, PRACTICE, OTHER]
    hospital, practice, other = report.groups
    sent = practice.sent
    assert (sent.transfers, sent.images, sent.bytes, sent.failures, sent.delivered) == (7, 70, 10500, 2, 4)
    assert sent.median_seconds == 25.0 and sent.p95_seconds == pytest.approx(89.5)
    assert practice.received.transfers == 0 and practice.received.median_seconds is None
    assert (other.sent.transfers, other.sent.images, other.sent.bytes, other.sent.median_seconds) == (1, 7, 300, 50.0)
    got = hospital.received
    assert (got.transfers, got.images, got.bytes, got.failures, got.delivered) == (3, 7, 3100, 1, 2)
    assert got.median_seconds == 90.0 and got.p95_seconds == pytest.approx(117.0)
    assert report.total.sent.transfers == 8 and report.total.received.transfers == 3
    assert report.total.sent.median_seconds == 30.0


def test_stats_by_month_and_route_and_period(stats_home: Path) -> None:
    site = OpsSite.open(stats_home)
    months = site.stats(by="month")
    assert [(g.key, g.sent.transfers, g.received.transfers) for g in months.groups] == [
        ("2026-01", 5, 1), ("2026-02", 3, 2)]
    routes = site.stats(by="route")
    assert [(g.key, g.sent.transfers, g.received.transfers) for g in routes.groups] == [("-", 7, 3), (ROUTE, 1, 0)]
    january = site.stats(since=datetime(2026, 1, 1), until=datetime(2026, 2, 1))
    assert january.total.sent.transfers == 5 and january.total.received.transfers == 1
    assert january.since is not None and january.since.tzinfo is not None
    assert site.stats(since=datetime(2026, 3, 1)).groups == ()
    with pytest.raises(InputError):
        site.stats(by="weekday")
    with pytest.raises(InputError):
        site.stats(since=datetime(2026, 2, 1), until=datetime(2026, 1, 1))


def test_stats_cli_table_csv_and_json(stats_home: Path, with_operations: None) -> None:
    runner = CliRunner()
    base = ["--home", str(stats_home), "stats"]
    table = runner.invoke(cli, base)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert all(len(line) <= 80 for line in lines), table.output
    assert PRACTICE in lines and "total" in lines
    figures = lines[lines.index(PRACTICE) + 1].split()
    assert figures[:4] == ["sent", "7", "70", "10.3"] and figures[-2] == "25.0s" and figures[-1] in ("1m29s", "1m30s")

    document = json.loads(runner.invoke(cli, [*base, "--json", "--by", "month"]).stdout)
    assert document["ok"] is True and document["by"] == "month" and document["since"] is None
    assert [g["group"] for g in document["groups"]] == ["2026-01", "2026-02"]
    assert document["groups"][0]["sent"] == {"transfers": 5, "images": 50, "bytes": 7500, "failures": 1,
                                             "delivered": 4, "median_seconds": 25.0, "p95_seconds": 89.5}
    since = json.loads(runner.invoke(cli, [*base, "--json", "--since", "2026-02"]).stdout)["since"]
    assert datetime.fromisoformat(since) == datetime(2026, 2, 1).astimezone()

    result = runner.invoke(cli, [*base, "--csv"])
    assert result.exit_code == 0, result.output
    rows = list(csv.reader(io.StringIO(result.stdout)))
    assert rows[0][:3] == ["peer", "sent_transfers", "sent_images"] and len(rows) == 4
    practice = dict(zip(rows[0], rows[2], strict=True))
    assert practice["peer"] == PRACTICE and practice["sent_p95_seconds"] == "89.5"
    assert practice["received_median_seconds"] == ""

    assert runner.invoke(cli, [*base, "--json", "--csv"]).exit_code == 2
    assert runner.invoke(cli, [*base, "--since", "last week"]).exit_code == 2
    assert runner.invoke(cli, [*base, "--by", "weekday"]).exit_code == 2
