"""Free-port allocation and readiness polling on the loopback interface."""

from __future__ import annotations

import contextlib
import socket
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """Return *count* distinct TCP ports that are currently free on loopback.

    All sockets stay bound until every port is chosen, so one call never
    hands out the same port twice.
    """
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Return True if something accepts TCP connections on *host*:*port*."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def port_listening(port: int, host: str = LOOPBACK) -> bool:
    """Return True if a TCP socket listens on *host*:*port* (IPv4).

    Reads /proc/net/tcp instead of connecting: a probe connection would make
    Dovecot spawn a login process, which slows down an early shutdown.
    """
    wanted = {f"{_hex_ipv4(host)}:{port:04X}", f"00000000:{port:04X}"}
    listen_state = "0A"
    with open("/proc/net/tcp") as table:
        next(table)  # header
        for line in table:
            fields = line.split()
            if fields[1] in wanted and fields[3] == listen_state:
                return True
    return False


def _hex_ipv4(host: str) -> str:
    # /proc/net/tcp prints addresses as the in-memory (little-endian) u32.
    return socket.inet_aton(host)[::-1].hex().upper()


def log_tail(path: Path, lines: int = 30) -> str:
    """Return the last *lines* lines of a log file (or a note if missing)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class StartupError(RuntimeError):
    """A server did not come up in time; the message carries its log tail."""


def wait_until(
    ready: Callable[[], bool],
    *,
    what: str,
    timeout: float,
    log: Path | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Poll *ready* until it returns True, or raise StartupError.

    *alive* lets the caller fail fast when the server process already died.
    """
    deadline = time.monotonic() + timeout
    while True:
        if ready():
            return
        dead = alive is not None and not alive()
        if dead or time.monotonic() > deadline:
            reason = "exited" if dead else f"not ready after {timeout:.0f}s"
            tail = log_tail(log) if log is not None else ""
            raise StartupError(f"{what} {reason}; log tail:\n{tail}")
        time.sleep(0.05)
