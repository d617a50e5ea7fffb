"""``Site.receive`` and ``Site.gateway`` run from a Python program, against the real test bed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from dicommail import Site
from dicommail.errors import ConfigError, GatewayLockedError, LockedError, ReceiverLockedError
from dicommail.samples import write_ct_study
from testbed import MailServers, Pacs, dcmtk_tool
from testbed.ports import free_ports, port_listening
from testbed.sites import (
    HOSPITAL,
    PRACTICE,
    Home,
    count_messages,
    empty_mailbox,
    gateway_config,
    make_home,
    remove_home,
    wait_for_messages,
)

pytestmark = pytest.mark.integration

ROUTE = "PRACTICE_DR"
#: Generous bound so that a broken service fails the test instead of hanging it (not a performance limit).
PATIENCE = 120.0


@pytest.fixture
def hospital(mail_servers: MailServers, pacs: Pacs) -> Iterator[Home]:
    home = make_home("hospital", HOSPITAL, mail_servers, pacs)
    yield home
    remove_home(home)


@pytest.fixture
def practice(mail_servers: MailServers, pacs: Pacs) -> Iterator[Home]:
    empty_mailbox(mail_servers, PRACTICE)
    home = make_home("practice", PRACTICE, mail_servers, pacs)
    yield home
    remove_home(home)


def _send_study(hospital: Home, servers: MailServers, tmp_path: Path, slices: int = 4) -> None:
    """Send a small study to the practice with the CLI and wait until its mails are in the mailbox."""
    study = write_ct_study(tmp_path / "study", slices, 64)
    before = count_messages(servers, PRACTICE)
    result = hospital.run("send", str(study[0].parent), "--to", PRACTICE, "--max-mail-size", "128K", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    mails = sum(len(s["mails"]) for s in json.loads(result.stdout)["sets"])
    wait_for_messages(servers, PRACTICE, before + mails)


def _set_statuses(home: Path) -> list[str]:
    """The received sets' statuses; none before the receiver has made its database."""
    try:
        # Read-only: creating an empty state.db here would race the receiver's own set-up.
        with contextlib.closing(sqlite3.connect(f"file:{home / 'state.db'}?mode=ro", uri=True)) as db:
            return [row[0] for row in db.execute("SELECT status FROM inbound_sets")]
    except sqlite3.OperationalError:
        return []


async def _until(condition: Callable[[], bool], service: asyncio.Task[Any], what: str) -> None:
    """Poll ``condition`` without blocking the loop; fail if ``service`` ends first."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if service.done():
            service.result()  # raises what ended it
            raise AssertionError(f"the service ended before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        await asyncio.sleep(0.1)


# -- the receiver ------------------------------------------------------------------------


def test_receive_once_returns_the_cycle_report(hospital: Home, practice: Home, mail_servers: MailServers,
                                               tmp_path: Path) -> None:
    _send_study(hospital, mail_servers, tmp_path)
    site = Site.open(practice.path)
    report = asyncio.run(site.receive(once=True))
    assert report.ok and report.fetch_error is None
    assert report.sets == {"delivered": 1} and report.quarantined == 0
    assert report.to_json() == {"ok": True, "sets": {"delivered": 1}, "quarantined_mails": 0, "fetch_error": None,
                                "processing_error": None,
                                "interrupted": False}
    # The CLI prints exactly that document.
    cli = practice.run("receive", "--once", "--json")
    assert cli.returncode == 0, cli.stderr
    assert json.loads(cli.stdout) == asyncio.run(site.receive(once=True, interval=5)).to_json()


def test_a_failed_fetch_is_in_the_report_not_raised(mail_servers: MailServers, pacs: Pacs) -> None:
    home = make_home("practice", PRACTICE, mail_servers, pacs, password="wrong-password")
    try:
        report = asyncio.run(Site.open(home.path).receive(once=True))
        assert not report.ok and report.fetch_error is not None
        document = report.to_json()
        assert document["ok"] is False and document["fetch_error"] == report.fetch_error.message
    finally:
        remove_home(home)


def test_a_receiver_task_stops_cleanly_when_told(hospital: Home, practice: Home, mail_servers: MailServers,
                                                tmp_path: Path) -> None:
    _send_study(hospital, mail_servers, tmp_path)
    site = Site.open(practice.path)

    async def main() -> None:
        stop = asyncio.Event()
        receiver = asyncio.create_task(site.receive(stop=stop, interval=1))
        await _until(lambda: _set_statuses(practice.path) == ["delivered"], receiver, "the set was delivered")
        # One receiver per home, also within one process.
        with pytest.raises(ReceiverLockedError) as locked:
            await site.receive(once=True)
        assert isinstance(locked.value, LockedError) and locked.value.code == "locked"
        assert "another receiver is running" in locked.value.message and locked.value.hint
        stop.set()
        await receiver  # returns None once stopped
        # The lock is free again.
        assert (await site.receive(once=True)).sets == {"delivered": 1}

    asyncio.run(main())


def test_cancelling_a_receiver_finishes_its_step_and_frees_the_home(practice: Home) -> None:
    site = Site.open(practice.path)

    async def main() -> None:
        receiver = asyncio.create_task(site.receive())
        await asyncio.sleep(1.5)  # into its polling, at least one cycle done
        receiver.cancel()
        with pytest.raises(asyncio.CancelledError):
            await receiver
        assert (await site.receive(once=True)).ok

    asyncio.run(main())


def test_handle_signals_stops_on_sigterm_and_gives_the_handler_back(practice: Home) -> None:
    site = Site.open(practice.path)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    async def main() -> None:
        receiver = asyncio.create_task(site.receive(handle_signals=True))
        # The handlers are installed before the receiver first waits for anything, so before this resumes.
        await _until(lambda: (practice.path / "state.db").exists(), receiver, "the receiver started")
        await asyncio.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        await receiver  # returns None once stopped

    asyncio.run(main())
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


# -- the gateway --------------------------------------------------------------------------


def test_a_gateway_task_answers_c_echo_and_stops_cleanly(mail_servers: MailServers, pacs: Pacs) -> None:
    port = free_ports(1)[0]
    home = make_home("hospital", HOSPITAL, mail_servers, pacs, extra=gateway_config(port, {ROUTE: PRACTICE}))
    site = Site.open(home.path)

    async def main() -> None:
        stop = asyncio.Event()
        gateway = asyncio.create_task(site.gateway(stop=stop))
        await _until(lambda: port_listening(port), gateway, "the gateway listened")
        echo = await asyncio.create_subprocess_exec(
            dcmtk_tool("echoscu"), "-aet", "HOSPPACS", "-aec", ROUTE, "127.0.0.1", str(port),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        _, err = await echo.communicate()
        assert echo.returncode == 0, err.decode()
        with pytest.raises(GatewayLockedError) as locked:
            await site.gateway()
        assert isinstance(locked.value, LockedError) and "another gateway is running" in locked.value.message
        stop.set()
        await gateway
        assert not port_listening(port)

    try:
        asyncio.run(main())
    finally:
        remove_home(home)


def test_a_gateway_without_routes_is_a_config_error(practice: Home) -> None:
    with pytest.raises(ConfigError, match="no routes"):
        asyncio.run(Site.open(practice.path).gateway())
