"""Finding and ending daemon processes by their session."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from testbed.ports import StartupError, log_tail

_PROC = Path("/proc")


def pid_alive(pid: int) -> bool:
    """Return True if *pid* exists and is not a zombie."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return False
    return _stat_fields(stat)[0] != "Z"


def _stat_fields(stat: str) -> list[str]:
    # The command name (field 2) may contain spaces; everything after the
    # last ')' is space-separated, starting with the state (field 3).
    return stat[stat.rindex(")") + 2 :].split()


def start_time(pid: int) -> int | None:
    """Kernel start time of *pid* (clock ticks since boot), or None if gone.

    Together with the pid it identifies a process even after pid reuse.
    """
    try:
        fields = _stat_fields((_PROC / str(pid) / "stat").read_text())
    except (OSError, ValueError):
        return None
    return int(fields[19])  # stat field 22


def session_members(sid: int) -> list[int]:
    """Return live pids whose session id is *sid*.

    Postfix's and Dovecot's masters call setsid() when they daemonize, so a
    master's pid names the session of all its worker processes.
    """
    members: list[int] = []
    for entry in _PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat_fields((entry / "stat").read_text())
        except (OSError, ValueError):
            continue
        # fields[0] is the state, fields[3] the session id (stat field 6).
        if fields[0] != "Z" and int(fields[3]) == sid:
            members.append(int(entry.name))
    return members


def read_pid(path: Path) -> int | None:
    """Return the pid stored in a pid file, or None if absent or garbled."""
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    remaining = [p for p in pids if pid_alive(p)]
    while remaining and time.monotonic() < deadline:
        time.sleep(0.05)
        remaining = [p for p in remaining if pid_alive(p)]
    return remaining


def terminate_session(leader: int, timeout: float = 10.0, *, graceful: bool = True) -> None:
    """End a session leader and everything left in its session.

    Graceful: SIGTERM the leader and wait up to *timeout* for it; then
    SIGTERM its leftover workers (Dovecot's linger ~10 s after the master),
    and SIGKILL what still runs a second later. Otherwise SIGKILL everything
    at once (fast; for state that is thrown away).
    """
    if graceful:
        _signal_all([leader], signal.SIGTERM)
        _wait_gone([leader], timeout)
        leftovers = session_members(leader)
        _signal_all(leftovers, signal.SIGTERM)
        _wait_gone(leftovers, 1.0)
    leftovers = sorted(set(session_members(leader)) | ({leader} if pid_alive(leader) else set()))
    _signal_all(leftovers, signal.SIGKILL)
    _wait_gone(leftovers, 5.0)


def run_daemon_launcher(args: list[str], output: Path, log: Path) -> None:
    """Run a command that forks a daemon; raise with its output if it fails.

    Output goes to a file, not a pipe: the forked daemon inherits the pipe
    and would keep it open, so reading it to EOF would never finish.
    """
    with output.open("w") as out:
        result = subprocess.run(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        raise StartupError(
            f"{' '.join(args)} exited with {result.returncode}:\n{output.read_text()}\nlog tail:\n{log_tail(log)}"
        )
