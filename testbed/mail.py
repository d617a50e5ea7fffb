"""Postfix + Dovecot as one mail system for two test domains."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path
from types import TracebackType
from typing import Any

from testbed.certs import Certificates, make_certificates
from testbed.dirs import check_reachable, claim_base_dir, release_base_dir
from testbed.dovecot import Dovecot, DovecotPorts
from testbed.install import ensure_mail_user
from testbed.ports import LOOPBACK, free_ports
from testbed.postfix import DEFAULT_MESSAGE_SIZE_LIMIT, Postfix, PostfixPorts

DEFAULT_ADDRESSES: tuple[str, ...] = ("hospital@hospital.test", "practice@practice.test")

# sun_path holds 108 bytes; keep room for the longest Dovecot socket name.
_MAX_RUN_DIR_LEN = 70


class MailServers:
    """Postfix (submission, smtps) delivering by LMTP to Dovecot (IMAP, POP3).

    Every account gets a fresh random password; ``accounts`` maps address to
    password. Ports are free loopback ports chosen at construction time and
    kept across restarts.
    """

    host = LOOPBACK

    def __init__(
        self,
        base_dir: Path | None = None,
        *,
        addresses: tuple[str, ...] = DEFAULT_ADDRESSES,
        message_size_limit: int = DEFAULT_MESSAGE_SIZE_LIMIT,
        startup_timeout: float = 20.0,
    ) -> None:
        self.base_dir, self._created_base = claim_base_dir(base_dir, "testbed-mail-")
        self.base_dir.chmod(0o755)
        check_reachable(self.base_dir)
        self.startup_timeout = startup_timeout
        self.accounts: dict[str, str] = {address: secrets.token_urlsafe(12) for address in addresses}
        run_dir = self.base_dir / "run"
        self._own_run_dir: Path | None = None
        if len(str(run_dir)) > _MAX_RUN_DIR_LEN:
            # Not TMPDIR: that may be just as long.
            run_dir = self._own_run_dir = Path(tempfile.mkdtemp(prefix="testbed-", dir="/tmp"))
        (
            self.smtp_port,
            self.smtps_port,
            self.imap_port,
            self.imaps_port,
            self.pop3_port,
            self.pop3s_port,
        ) = free_ports(6)
        self.certs: Certificates = make_certificates(self.base_dir / "certs")
        self.ca_file: Path = self.certs.ca_file
        self.dovecot = Dovecot(
            self.base_dir / "dovecot",
            run_dir,
            self.certs,
            self.accounts,
            DovecotPorts(self.imap_port, self.imaps_port, self.pop3_port, self.pop3s_port),
            ensure_mail_user(),
        )
        self.postfix = Postfix(
            self.base_dir / "postfix",
            self.certs,
            list(self.accounts),
            PostfixPorts(self.smtp_port, self.smtps_port),
            lmtp_socket=self.dovecot.lmtp_socket,
            auth_socket=self.dovecot.auth_socket,
            message_size_limit=message_size_limit,
        )
        # Dovecot's LMTP socket, for injecting mail without SMTP (e.g. smtplib.LMTP).
        self.lmtp_socket: Path = self.dovecot.lmtp_socket
        run_dir.mkdir(exist_ok=True)
        run_dir.chmod(0o755)

    def start(self) -> None:
        """Start Dovecot, then Postfix (which needs Dovecot's sockets)."""
        try:
            self.start_dovecot()
            self.postfix.start(self.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def stop(self, *, graceful: bool = True) -> None:
        """Stop both servers; files are kept, so start() may be called again."""
        self.postfix.stop(graceful=graceful)
        self.stop_dovecot(graceful=graceful)

    def close(self) -> None:
        """Kill both servers and remove every file the test bed created."""
        # The state is thrown away, so there is nothing to shut down cleanly.
        self.stop(graceful=False)
        if self._own_run_dir is not None:
            shutil.rmtree(self._own_run_dir, ignore_errors=True)
        release_base_dir(self.base_dir, self._created_base)

    def start_dovecot(self) -> None:
        """Start Dovecot alone (e.g. after stop_dovecot())."""
        self.dovecot.start(self.startup_timeout)

    def stop_dovecot(self, *, graceful: bool = True) -> None:
        """Stop Dovecot alone (graceful: ~1 s; else SIGKILL, like a crash).

        Meanwhile Postfix defers deliveries (retried every second) and, as
        its SASL backend is gone, drops new SMTP connections.
        """
        self.dovecot.stop(graceful=graceful)

    def restart_dovecot(self, *, graceful: bool = True) -> None:
        """Stop and start Dovecot; open IMAP/POP3 sessions are dropped."""
        self.stop_dovecot(graceful=graceful)
        self.start_dovecot()

    @property
    def message_size_limit(self) -> int:
        """Postfix's message_size_limit in bytes."""
        return self.postfix.message_size_limit

    def set_message_size_limit(self, limit: int) -> None:
        """Change message_size_limit on the running Postfix (via reload)."""
        self.postfix.message_size_limit = limit
        if self.postfix.pid is not None:
            self.postfix.reload()

    def maildir(self, address: str) -> Path:
        """The Maildir of *address* (for inspecting delivered files)."""
        return self.dovecot.home(address) / "Maildir"

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable summary: host, ports, accounts, paths, pids."""
        return {
            "host": self.host,
            "smtp_port": self.smtp_port,
            "smtps_port": self.smtps_port,
            "imap_port": self.imap_port,
            "imaps_port": self.imaps_port,
            "pop3_port": self.pop3_port,
            "pop3s_port": self.pop3s_port,
            "ca_file": str(self.ca_file),
            "accounts": dict(self.accounts),
            "message_size_limit": self.message_size_limit,
            "base_dir": str(self.base_dir),
            "run_dir": str(self.dovecot.run_dir),
            "lmtp_socket": str(self.lmtp_socket),
            "postfix_log": str(self.postfix.log_file),
            "dovecot_log": str(self.dovecot.log_file),
            "postfix_pid": self.postfix.pid,
            "dovecot_pid": self.dovecot.pid,
        }

    def __enter__(self) -> MailServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
