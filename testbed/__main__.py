"""Command line: ``python -m testbed {install,up,down} [--dir DIR]``."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from types import FrameType
from typing import Any

from testbed.install import ensure_installed
from testbed.mail import MailServers
from testbed.pacs import Pacs
from testbed.ports import StartupError
from testbed.postfix import DEFAULT_MESSAGE_SIZE_LIMIT
from testbed.process import pid_alive, start_time, terminate_session

STATE_FILE = "testbed.json"


class _Shutdown(Exception):
    """Raised from the signal handler to leave the wait loop of ``up``."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise _Shutdown(signal.Signals(signum).name)


def _identity(pid: int | None) -> list[int] | None:
    # [pid, start time]: lets `down` tell our process from a reused pid.
    if pid is None:
        return None
    started = start_time(pid)
    return None if started is None else [pid, started]


def _same_process(identity: Any) -> bool:
    if not isinstance(identity, list) or len(identity) != 2:
        return False
    pid, started = identity
    return pid_alive(pid) and start_time(pid) == started


def _write_state(path: Path, state: dict[str, Any]) -> None:
    # Write-then-rename so a reader polling for the file never sees half of it.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2) + "\n")
    tmp.replace(path)


def _remove_leftovers(directory: Path, state: dict[str, Any]) -> None:
    """Kill recorded servers that still run and delete their files."""
    for identity in state.get("processes", {}).values():
        if _same_process(identity):
            terminate_session(identity[0], graceful=False)
    run_dir = state.get("mail", {}).get("run_dir")
    if run_dir and not Path(run_dir).is_relative_to(directory):
        shutil.rmtree(run_dir, ignore_errors=True)
    for name in ("mail", "pacs"):
        shutil.rmtree(directory / name, ignore_errors=True)
    (directory / STATE_FILE).unlink(missing_ok=True)


def _read_state(directory: Path) -> dict[str, Any] | None:
    try:
        state: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state


def up(directory: Path, message_size_limit: int) -> int:
    """Start everything, write DIR/testbed.json, run until SIGINT/SIGTERM."""
    directory = directory.absolute()
    previous = _read_state(directory)
    if previous is not None:
        if _same_process(previous.get("processes", {}).get("up")):
            print(f"testbed already running in {directory}", file=sys.stderr)
            return 1
        _remove_leftovers(directory, previous)  # an earlier `up` died
    ensure_installed()
    directory.mkdir(parents=True, exist_ok=True)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    mail: MailServers | None = None
    pacs: Pacs | None = None
    try:
        started = time.monotonic()
        mail = MailServers(directory / "mail", message_size_limit=message_size_limit)
        pacs = Pacs(directory / "pacs")
        mail.start()
        pacs.start()
        state = {
            "dir": str(directory),
            "mail": mail.describe(),
            "pacs": pacs.describe(),
            "processes": {
                "up": _identity(os.getpid()),
                "postfix": _identity(mail.postfix.pid),
                "dovecot": _identity(mail.dovecot.pid),
                "orthanc": _identity(pacs.pid),
            },
        }
        _write_state(directory / STATE_FILE, state)
        print(
            f"testbed up in {time.monotonic() - started:.1f}s: {directory / STATE_FILE}\n"
            f"  SMTP {mail.smtp_port} (STARTTLS), SMTPS {mail.smtps_port}, "
            f"IMAP {mail.imap_port}, IMAPS {mail.imaps_port}, "
            f"POP3 {mail.pop3_port}, POP3S {mail.pop3s_port}\n"
            f"  Orthanc {pacs.aet} DICOM {pacs.dicom_port}, REST {pacs.url}\n"
            "Ctrl-C or `python -m testbed down` stops it.",
            flush=True,
        )
        while True:
            time.sleep(3600)
    except _Shutdown:
        pass
    finally:
        # A second Ctrl-C must not interrupt the clean-up.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if pacs is not None:
            pacs.close()
        if mail is not None:
            mail.close()
        (directory / STATE_FILE).unlink(missing_ok=True)
    print("testbed stopped", flush=True)
    return 0


def down(directory: Path, timeout: float = 60.0) -> int:
    """Stop the ``up`` running in *directory* (and anything it left behind)."""
    directory = directory.absolute()
    state = _read_state(directory)
    if state is None:
        print(f"no {STATE_FILE} in {directory}: nothing to stop", file=sys.stderr)
        return 0
    runner = state.get("processes", {}).get("up")
    if _same_process(runner):
        os.kill(runner[0], signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _same_process(runner) and time.monotonic() < deadline:
            time.sleep(0.1)
    _remove_leftovers(directory, state)
    print(f"testbed in {directory} stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse *argv* and run the sub-command."""
    parser = argparse.ArgumentParser(prog="python -m testbed", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("install", help="install the Debian packages (needs root)")
    start = commands.add_parser("up", help="start all servers and wait for Ctrl-C/SIGTERM")
    start.add_argument("--dir", type=Path, required=True, help="state directory")
    start.add_argument(
        "--message-size-limit",
        type=int,
        default=DEFAULT_MESSAGE_SIZE_LIMIT,
        help="Postfix message_size_limit in bytes (default: %(default)s)",
    )
    stop = commands.add_parser("down", help="stop the servers started by `up`")
    stop.add_argument("--dir", type=Path, required=True, help="state directory given to `up`")
    args = parser.parse_args(argv)
    if args.command == "install":
        installed = ensure_installed()
        print("installed: " + " ".join(installed) if installed else "everything already installed")
        return 0
    try:
        if args.command == "up":
            return up(args.dir, args.message_size_limit)
        return down(args.dir)
    except (OSError, ValueError, StartupError) as error:
        print(f"testbed {args.command}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
