"""One GnuPG home, driven through python-gnupg, with dicommail's trust rule.

Every gpg call made here is offline (no keyservers, no WKD, no dirmngr),
non-interactive (no pinentry, ever) and uses the classic PGP trust model:
a peer's key is valid only if this site certified it locally.

The trust rule for incoming mail: a signature counts only if it is
cryptographically good *and* made by a key whose validity is full or
ultimate, i.e. a key we certified or our own key.  Anything else raises,
and no plaintext is left on disk.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

import gnupg

from dicommail.errors import (
    CryptoError,
    DecryptionError,
    InputError,
    PassphraseError,
    RecipientKeyError,
    SignatureError,
)

#: Options on every gpg call.  The network options matter because a missing
#: recipient would otherwise make gpg look the address up via WKD; the trust
#: model is explicit so that a ``trust-model always`` in a gpg.conf cannot
#: weaken the trust rule.
BASE_OPTIONS: tuple[str, ...] = (
    "--trust-model",
    "pgp",
    "--auto-key-locate",
    "local",
    "--no-auto-key-retrieve",
    "--no-auto-key-import",
    "--disable-dirmngr",
    "--no-greeting",
    "--keyid-format",
    "long",
)

#: Written into a new home.  Unlocking a passphrase-protected key costs
#: about half a second (the agent's calibrated key derivation), so the agent
#: may keep it unlocked while mails are being packed, but only briefly: one
#: minute after the last use, ten minutes at most.
AGENT_CONF = """\
# Written by dicommail.  dicommail hands the passphrase over itself
# (loopback pinentry): nothing is ever prompted for.
default-cache-ttl 60
max-cache-ttl 600
"""

#: Pipe buffer for plaintext streamed into gpg (Linux's most for an unprivileged process).
STREAM_PIPE_SIZE = 1024 * 1024

# libgpg-error codes (the low 16 bits of a FAILURE/ERROR code).
_ERR_BAD_PASSPHRASE = 11
_ERR_NO_PASSPHRASE = 69
_ERR_NO_PIN_ENTRY = 85
_ERR_PIN_ENTRY = 86
_ERR_CANCELED = 99
_PASSPHRASE_MISSING_CODES = {_ERR_NO_PASSPHRASE, _ERR_NO_PIN_ENTRY, _ERR_PIN_ENTRY, _ERR_CANCELED}

#: INV_RECP / INV_SGNR reason codes (GnuPG doc/DETAILS).
INVALID_KEY_REASONS: dict[int, str] = {
    0: "no specific reason given",
    1: "no such key in the keyring",
    2: "ambiguous: several keys match",
    3: "the key cannot be used for this (wrong key usage)",
    4: "the key is revoked",
    5: "the key has expired",
    8: "policy mismatch",
    9: "no secret key for it",
    10: "the key is not certified (there is no assurance it belongs to the named user)",
    13: "the key is disabled",
    14: "syntax error in the key specification",
}

_PERCENT_RE = re.compile(rb"%([0-9A-Fa-f]{2})")


@dataclass(frozen=True)
class Verification:
    """Who signed a mail that passed the trust rule."""

    fingerprint: str
    """Primary key fingerprint of the signer (VALIDSIG's last field)."""
    signing_key_fingerprint: str
    """Fingerprint of the (sub)key that made the signature."""
    user_id: str
    """The signer key's primary user id."""
    signed_at: datetime
    """Signature creation time, UTC."""
    trust: str
    """``"ultimate"`` (our own key) or ``"full"`` (a key we certified)."""


@dataclass
class GpgResult:
    """What one gpg run produced: exit status, status lines, log and stdout."""

    returncode: int
    status: list[tuple[str, str]]
    log: list[str]
    stdout: bytes

    def has(self, keyword: str) -> bool:
        return any(key == keyword for key, _ in self.status)

    def values(self, keyword: str) -> list[str]:
        return [value for key, value in self.status if key == keyword]

    def first(self, keyword: str) -> str | None:
        values = self.values(keyword)
        return values[0] if values else None

    @property
    def error_codes(self) -> list[int]:
        """libgpg-error codes from FAILURE and ERROR lines (low 16 bits)."""
        codes = []
        for key, value in self.status:
            if key in ("FAILURE", "ERROR"):
                parts = value.split()
                if len(parts) >= 2 and parts[1].isdigit():
                    codes.append(int(parts[1]) & 0xFFFF)
        return codes

    def log_excerpt(self, limit: int = 3) -> str:
        """The last few of gpg's own messages, for error texts (never data)."""
        lines = [line.removeprefix("gpg: ").strip() for line in self.log if line.startswith("gpg: ")]
        return "; ".join(lines[-limit:])


def _stream_result(returncode: int, stderr: str) -> GpgResult:
    """What a gpg run with ``--status-fd 2`` wrote to stderr, as :meth:`Keyring.run` collects it."""
    status = []
    log = []
    for line in stderr.splitlines():
        if line.startswith("[GNUPG:] "):
            keyword, _, value = line[9:].strip().partition(" ")
            status.append((keyword, value.strip()))
        else:
            log.append(line)
    return GpgResult(returncode=returncode, status=status, log=log, stdout=b"")


class _Collector:
    """Receives what python-gnupg reads from gpg (status lines, stderr, stdout)."""

    def __init__(self) -> None:
        self.status: list[tuple[str, str]] = []
        self.stderr = ""
        self.data = b""
        self.returncode: int | None = None

    def handle_status(self, key: str, value: str) -> None:
        self.status.append((key, value))


def unescape_status(text: str) -> str:
    """Undo the %XX escaping of user ids in status lines (which are UTF-8).

    python-gnupg hands us gpg's bytes decoded as Latin-1, so encoding back
    to Latin-1 restores them exactly.
    """
    raw = _PERCENT_RE.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("latin-1", errors="replace"))
    return raw.decode("utf-8", errors="replace")


def parse_gpg_time(value: str) -> datetime:
    """A gpg timestamp: seconds since the epoch or ISO 8601 (``20260101T120000``)."""
    if "T" in value:
        return datetime.strptime(value[:15], "%Y%m%dT%H%M%S").replace(tzinfo=UTC)
    return datetime.fromtimestamp(int(value), tz=UTC)


@dataclass
class _Signature:
    """Status lines about one signature (between NEWSIG markers)."""

    outcome: str = ""  # GOODSIG, BADSIG, EXPSIG, EXPKEYSIG, REVKEYSIG, ERRSIG
    key_id: str = ""
    user_id: str = ""
    validsig: list[str] = field(default_factory=list)
    trust: str = ""  # ULTIMATE, FULLY, MARGINAL, NEVER, UNDEFINED
    errsig_rc: str = ""
    errsig_fpr: str = ""


def _signatures(result: GpgResult) -> list[_Signature]:
    sigs: list[_Signature] = []
    current: _Signature | None = None
    for key, value in result.status:
        if key == "NEWSIG":
            current = _Signature()
            sigs.append(current)
            continue
        if key not in ("GOODSIG", "BADSIG", "EXPSIG", "EXPKEYSIG", "REVKEYSIG", "ERRSIG", "VALIDSIG") and not (
            key.startswith("TRUST_")
        ):
            continue
        if current is None:  # gpg 2.2 always sends NEWSIG first; be lenient anyway
            current = _Signature()
            sigs.append(current)
        parts = value.split()
        if key == "VALIDSIG":
            current.validsig = parts
        elif key.startswith("TRUST_"):
            current.trust = key.removeprefix("TRUST_")
        elif key == "ERRSIG":
            current.outcome = key
            current.key_id = parts[0] if parts else ""
            current.errsig_rc = parts[5] if len(parts) > 5 else ""
            current.errsig_fpr = parts[6] if len(parts) > 6 and parts[6] != "-" else ""
        else:
            # A BADSIG after a GOODSIG cannot happen, but never let a good
            # outcome overwrite a bad one.
            if current.outcome in ("", "GOODSIG"):
                current.outcome = key
            current.key_id = parts[0] if parts else ""
            current.user_id = unescape_status(value.split(None, 1)[1]) if len(parts) > 1 else ""
    return sigs


def gpg_name(key_id: str) -> str:
    """How to name a key to gpg: a bare mail address as ``<addr>``.

    gpg matches a bare string anywhere in a user id, so ``bob@example.org``
    would also select ``notbob@example.org``; ``<bob@example.org>`` matches
    the address exactly.
    """
    text = key_id.strip()
    if "@" in text and not text.startswith("<") and " " not in text:
        return f"<{text}>"
    return text


def _check_socket_path(home: Path) -> None:
    """Fail early and clearly where gpg-agent would fail obscurely.

    Unix socket paths are limited to 107 bytes.  gpg puts its sockets into
    the home unless /run/user/UID exists (then it uses a short directory
    there).
    """
    longest = home / "S.gpg-agent.browser"
    if len(os.fsencode(longest)) <= 107 or Path(f"/run/user/{os.getuid()}").is_dir():
        return
    raise CryptoError(
        f"the GnuPG home {home} is too deep: gpg-agent's socket path would exceed 107 bytes",
        "use a shorter dicommail home directory (--home or DICOMMAIL_HOME)",
    )


def _unusable_reason(found: list[tuple[str, str, str]]) -> str:
    """Why the keys found for a name cannot be used (empty if they look usable)."""
    if not found:
        return ""
    validities = {validity for _, validity, _ in found}
    if validities == {"r"}:
        return "the key is revoked"
    if validities <= {"r", "e"}:
        return "the key has expired"
    if validities <= {"r", "e", "d"}:
        return "the key is disabled"
    if not any("E" in caps for _, _, caps in found):
        return "the key has no usable encryption subkey (expired or revoked)"
    return ""


class Keyring:
    """A GnuPG home directory and the operations dicommail needs on it."""

    def __init__(self, gnupg_home: Path) -> None:
        self.home = Path(gnupg_home).expanduser().absolute()
        _check_socket_path(self.home)
        if not self.home.exists():
            self.home.mkdir(mode=0o700, parents=True)
            # mkdir's mode is subject to the umask; gpg warns about anything looser.
            self.home.chmod(0o700)
        agent_conf = self.home / "gpg-agent.conf"
        if not agent_conf.exists():
            agent_conf.write_text(AGENT_CONF, encoding="utf-8")
        # A fixed locale makes gpg's log lines (which we match in a few
        # places) predictable.
        env = dict(os.environ)
        env.update({"LC_ALL": "C", "LANGUAGE": "C"})
        env.pop("GPG_AGENT_INFO", None)
        try:
            self._gpg: Any = gnupg.GPG(gnupghome=str(self.home), options=list(BASE_OPTIONS), env=env)
        except (OSError, ValueError) as exc:
            raise CryptoError(
                f"cannot run gpg on the keyring {self.home}: {exc}",
                "install GnuPG 2.2 or later (Debian: apt-get install gnupg) and check the keyring directory",
            ) from exc
        self._gpg.encoding = "latin-1"  # bytes in, bytes out; we decode UTF-8 ourselves
        # Larger chunks than python-gnupg's 16 KiB: studies are hundreds of MB.
        self._gpg.buffer_size = 256 * 1024

    # -- lifecycle -----------------------------------------------------------

    def close(self) -> None:
        """Stop this home's gpg-agent (it would otherwise linger)."""
        gpgconf = shutil.which("gpgconf")
        if gpgconf is None:
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                [gpgconf, "--homedir", str(self.home), "--kill", "all"],
                check=False,
                capture_output=True,
                timeout=30,
            )

    def forget_passphrases(self) -> None:
        """Make this home's running gpg-agent forget the passphrases it cached (if one runs).

        A cached passphrase makes any passphrase, even a wrong one, work; a
        test of the configured passphrase must come after this.
        """
        gpgconf = shutil.which("gpgconf")
        if gpgconf is None:
            return
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            # SIGHUP by another name: the agent flushes its cache and re-reads its config.
            subprocess.run([gpgconf, "--homedir", str(self.home), "--reload", "gpg-agent"],
                           check=False, capture_output=True, timeout=30)

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Keyring({str(self.home)!r})"

    # -- low level -------------------------------------------------------------

    def _usable_passphrase(self, passphrase: str | None) -> str | None:
        """The passphrase as gpg gets it (None: the key has none), or :class:`PassphraseError`."""
        if passphrase == "":
            return None  # gpg has no "empty passphrase": it means an unprotected key
        if passphrase is not None and not self._gpg.is_valid_passphrase(passphrase):
            raise PassphraseError(
                "the passphrase contains a line break or NUL character, which gpg cannot accept",
                "put the passphrase on the first line of the passphrase file, with nothing else",
            )
        return passphrase

    def run(
        self,
        args: Sequence[str],
        *,
        passphrase: str | None = None,
        stdin: bytes | IO[bytes] | None = None,
    ) -> GpgResult:
        """Run gpg with ``args`` (plus the base options) and collect everything.

        With a passphrase, gpg gets it on stdin before the data (loopback
        pinentry); without one, the agent is told to fail rather than prompt.
        """
        passphrase = self._usable_passphrase(passphrase)
        full_args = list(args)
        if passphrase is None:
            full_args[:0] = ["--pinentry-mode", "error"]
        else:
            full_args[:0] = ["--pinentry-mode", "loopback"]
        collector = _Collector()
        stream: IO[bytes] = io.BytesIO(stdin or b"") if stdin is None or isinstance(stdin, bytes) else stdin
        try:
            self._gpg._handle_io(full_args, stream, collector, passphrase=passphrase, binary=True)
        except BrokenPipeError:
            # gpg stopped reading its input because it gave up early (e.g. an
            # unusable recipient); its status lines tell why.
            if collector.returncode is None:
                raise CryptoError("gpg stopped unexpectedly", "check that GnuPG is installed and working") from None
        except (OSError, ValueError) as exc:
            raise CryptoError(f"running gpg failed: {exc}", "check that GnuPG is installed and working") from exc
        log = [line for line in collector.stderr.splitlines() if not line.startswith("[GNUPG:] ")]
        return GpgResult(
            returncode=collector.returncode if collector.returncode is not None else -1,
            status=collector.status,
            log=log,
            stdout=collector.data,
        )

    # -- mail crypto -----------------------------------------------------------

    def sign_encrypt_file(
        self,
        src: Path,
        dst: Path,
        *,
        recipient: str,
        signer: str,
        passphrase: str | None,
        compress_level: int = 1,
    ) -> None:
        """Sign with ``signer`` and encrypt to ``recipient`` in one pass, ASCII armored.

        The file is streamed through gpg; ``dst`` appears only on success.
        """
        if not 0 <= compress_level <= 9:
            raise ValueError(f"compress_level must be 0..9, got {compress_level}")
        _require_file(src)
        try:
            self._sign_encrypt(Path(src), Path(dst), recipient, signer, passphrase, compress_level)
        except BaseException:
            # Also an older file of that name: a failed run leaves no dst at all.
            with contextlib.suppress(OSError):
                Path(dst).unlink(missing_ok=True)
            raise

    def _sign_encrypt(
        self, src: Path, dst: Path, recipient: str, signer: str, passphrase: str | None, compress_level: int
    ) -> None:
        with _partial_output(dst) as tmp:
            result = self.run(
                [
                    # --local-user, not --default-key: gpg silently signs with
                    # some other secret key when a --default-key is unusable.
                    "--local-user",
                    gpg_name(signer),
                    "--recipient",
                    gpg_name(recipient),
                    "--sign",
                    "--encrypt",
                    "--armor",
                    "-z",
                    str(compress_level),
                    "--yes",
                    "--output",
                    str(tmp),
                    # Local file names may name the patient: keep them out
                    # of the literal data packet.
                    "--set-filename",
                    "",
                    # gpg reads the file itself: fed through a Python thread,
                    # the data would wait for the GIL while other workers
                    # base64-encode, halving throughput with two workers.
                    "--",
                    str(src),
                ],
                passphrase=passphrase,
                stdin=None,
            )
            if result.returncode != 0 or not result.has("END_ENCRYPTION") or not result.has("SIG_CREATED"):
                raise self._encrypt_error(result, recipient=recipient, signer=signer)

    def sign_encrypt_stream(
        self,
        write: Callable[[BinaryIO], None],
        out: BinaryIO,
        *,
        recipient: str,
        signer: str,
        passphrase: str | None,
        compress_level: int = 1,
    ) -> None:
        """Sign and encrypt what ``write`` writes, like :meth:`sign_encrypt_file`, onto ``out``.

        ``write(stdin)`` runs in the calling thread and writes the plaintext into
        gpg while gpg encrypts it: building and encrypting overlap, and no
        plaintext is stored anywhere.  gpg writes the armor itself to ``out``'s
        file descriptor, at its current position (``out`` is flushed first; seek
        to its end before writing to it again).  An exception from ``write`` ends
        gpg and is raised; a failure of gpg raises :class:`CryptoError`.
        """
        if not 0 <= compress_level <= 9:
            raise ValueError(f"compress_level must be 0..9, got {compress_level}")
        passphrase = self._usable_passphrase(passphrase)
        pinentry = ["--pinentry-mode", "error"] if passphrase is None else [
            "--pinentry-mode", "loopback", "--passphrase-fd", "0"]
        args = [
            self._gpg.gpgbinary, "--status-fd", "2", "--no-tty", "--batch", "--homedir", str(self.home),
            *BASE_OPTIONS, *pinentry,
            # As in _sign_encrypt: --local-user, and no file name in the literal data packet.
            "--local-user", gpg_name(signer), "--recipient", gpg_name(recipient),
            "--sign", "--encrypt", "--armor", "-z", str(compress_level), "--set-filename", "", "--output", "-",
        ]
        out.flush()
        with tempfile.TemporaryFile() as messages:
            try:
                process = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=out.fileno(), stderr=messages,
                                           env=self._gpg.env)
            except OSError as exc:
                raise CryptoError(f"running gpg failed: {exc}", "check that GnuPG is installed and working") from exc
            stdin = cast(BinaryIO, process.stdin)  # a BufferedWriter: Popen's stdin=PIPE, bufsize -1
            assert stdin is not None
            try:
                with contextlib.suppress(OSError):
                    # A pipe of 1 MiB instead of 64 KiB: the writer works in bursts, gpg reads steadily.
                    fcntl.fcntl(stdin.fileno(), fcntl.F_SETPIPE_SZ, STREAM_PIPE_SIZE)
                try:
                    if passphrase is not None:
                        stdin.write(passphrase.encode(self._gpg.encoding) + b"\n")
                    write(stdin)
                    stdin.close()
                except BrokenPipeError:
                    pass  # gpg stopped reading because it gave up early; its status lines tell why
            except BaseException:
                process.kill()
                raise
            finally:
                with contextlib.suppress(OSError):
                    stdin.close()
                process.wait()
            messages.seek(0)
            result = _stream_result(process.returncode, messages.read().decode(self._gpg.encoding))
        if result.returncode != 0 or not result.has("END_ENCRYPTION") or not result.has("SIG_CREATED"):
            raise self._encrypt_error(result, recipient=recipient, signer=signer)

    def detach_sign_file(self, path: Path, out: Path, *, signer: str, passphrase: str | None) -> None:
        """Write a detached, ASCII-armored signature of ``path`` by ``signer`` to ``out``.

        Anyone with the signer's public key can check it with plain
        ``gpg --verify out path``.  ``out`` appears only on success.
        """
        _require_file(path)
        try:
            with _partial_output(Path(out)) as tmp:
                result = self.run(
                    ["--local-user", gpg_name(signer), "--detach-sign", "--armor", "--yes", "--output", str(tmp),
                     "--", str(path)],
                    passphrase=passphrase,
                    stdin=None,
                )
                if result.returncode != 0 or not result.has("SIG_CREATED"):
                    error = self._encrypt_error(result, recipient="", signer=signer)
                    if type(error) is CryptoError and not result.has("INV_SGNR"):
                        detail = result.log_excerpt() or f"gpg exit status {result.returncode}"
                        error = CryptoError(f"signing {Path(path).name} failed: {detail}",
                                            "run `dicommail keys list --secret` to check this site's key")
                    raise error
        except BaseException:
            with contextlib.suppress(OSError):
                Path(out).unlink(missing_ok=True)
            raise

    def _encrypt_error(self, result: GpgResult, *, recipient: str, signer: str) -> CryptoError:
        codes = result.error_codes
        # Signer problems first: gpg checks the signer before the recipients.
        for value in result.values("INV_SGNR"):
            reason_code, _, name = value.partition(" ")
            reason = INVALID_KEY_REASONS.get(int(reason_code) if reason_code.isdigit() else 0, "unusable")
            if reason_code in ("0", "1"):
                reason = _unusable_reason(self._lookup(name or signer)) or reason
            return CryptoError(
                f"cannot sign with this site's key {name or signer}: {reason}",
                "check identity.key in dicommail.toml and `dicommail keys list --secret`; "
                "an expired key can be extended with `dicommail keys extend`, or make a new one with "
                "`dicommail keys generate`",
            )
        if result.has("BAD_PASSPHRASE") or _ERR_BAD_PASSPHRASE in codes:
            return PassphraseError(
                f"wrong passphrase for the signing key {signer}",
                "check the passphrase file named by identity.passphrase_file",
            )
        if result.has("MISSING_PASSPHRASE") or _PASSPHRASE_MISSING_CODES.intersection(codes):
            return PassphraseError(
                f"the signing key {signer} is protected by a passphrase, but none was given",
                "set identity.passphrase_file in dicommail.toml to a file holding the passphrase",
            )
        for value in result.values("INV_RECP"):
            reason_code, _, name = value.partition(" ")
            code = int(reason_code) if reason_code.isdigit() else 0
            found = self._lookup(name or recipient)
            fingerprints = ", ".join(fpr for fpr, _, _ in found) or name or recipient
            reason = INVALID_KEY_REASONS.get(code, f"unusable (reason {code})")
            if code in (0, 1) and found:
                # gpg does not find revoked or expired keys by address at all.
                reason = _unusable_reason(found) or reason
            if code == 10:
                hint = (
                    "check the fingerprint with the recipient by phone, then run: "
                    f"dicommail keys certify {found[0][0] if len(found) == 1 else fingerprints}"
                )
            elif not found:
                hint = "import the recipient's public key (dicommail keys import FILE), then certify it"
            else:
                hint = "ask the recipient for their current public key, import it and certify it"
            return RecipientKeyError(f"cannot encrypt to {recipient}: {reason} (key {fingerprints})", hint)
        detail = result.log_excerpt() or f"gpg exit status {result.returncode}"
        return CryptoError(f"signing and encrypting failed: {detail}", "run `dicommail keys list` to check the keys")

    def _lookup(self, name: str) -> list[tuple[str, str, str]]:
        """(fingerprint, validity letter, capabilities) of the keys ``name`` matches."""
        result = self.run(["--with-colons", "--fixed-list-mode", "--list-keys", "--", gpg_name(name)])
        found = []
        fields: list[str] = []
        for line in result.stdout.decode("latin-1").splitlines():
            previous, fields = fields, line.split(":")
            if fields[0] == "fpr" and previous and previous[0] == "pub":
                found.append((fields[9], previous[1], previous[11] if len(previous) > 11 else ""))
        return found

    def decrypt_verify_file(
        self,
        src: Path,
        dst: Path,
        *,
        max_output: int,
        passphrase: str | None = None,
    ) -> Verification:
        """Decrypt ``src`` to ``dst`` and apply the trust rule to its signature.

        On any failure ``dst`` does not exist afterwards.
        """
        if max_output <= 0:
            raise ValueError("max_output must be positive")
        _require_file(src)
        try:
            with _partial_output(dst) as tmp:
                result = self.run(
                    ["--max-output", str(max_output), "--yes", "--output", str(tmp), "--decrypt", "--", str(src)],
                    passphrase=passphrase,
                    stdin=None,
                )
                return self._check_decryption(result, max_output)
        except BaseException:
            # The caller's dst may have existed before: no plaintext of any
            # kind may be left behind under that name after a failure.
            with contextlib.suppress(OSError):
                Path(dst).unlink(missing_ok=True)
            raise

    def _check_decryption(self, result: GpgResult, max_output: int) -> Verification:
        """Apply the rules in order: not for us, too large, damaged, bad signature, untrusted."""
        okay = result.has("DECRYPTION_OKAY")
        if not okay and result.has("NEED_PASSPHRASE_SYM"):
            # A passphrase asked for a symmetric packet is the mail's, not this site's key's: as a
            # PassphraseError it would stop every round at this mail, for ever.
            raise DecryptionError(
                "the mail is passphrase-encrypted (symmetric), not encrypted to this site's key",
                "DICOM mails must be signed and encrypted to this site's key; ask the sender to fix their setup",
            )
        if not okay and (result.has("BAD_PASSPHRASE") or _ERR_BAD_PASSPHRASE in result.error_codes):
            raise PassphraseError(
                "wrong passphrase for this site's key: the mail cannot be decrypted",
                "check the passphrase file named by identity.passphrase_file",
            )
        missing = result.has("MISSING_PASSPHRASE") or _PASSPHRASE_MISSING_CODES.intersection(result.error_codes)
        if not okay and missing:
            raise PassphraseError(
                "this site's key is protected by a passphrase, but none was given",
                "set identity.passphrase_file in dicommail.toml to a file holding the passphrase",
            )
        if not okay and result.has("NO_SECKEY"):
            key_ids = ", ".join(dict.fromkeys(v.split()[0] for v in result.values("ENC_TO") if v.split()))
            raise DecryptionError(
                f"this mail was encrypted to key(s) {key_ids or 'unknown'}, not to this site's key",
                "the sender used a wrong or old key for this site: send them this site's current public key "
                "(dicommail keys export) and ask them to certify it",
            )
        log_text = " ".join(result.log).lower()
        # gpg 2.2 reports the --max-output limit only in its log (no status
        # line), and still says DECRYPTION_OKAY afterwards.
        if "max-output" in log_text or (result.has("PLAINTEXT") and "object is too large" in log_text):
            raise DecryptionError(
                f"the decrypted mail exceeded the limit of {max_output} bytes (unpacking.max_decrypted_size)",
                "if the sender is trusted and the mail is legitimate, raise unpacking.max_decrypted_size; "
                "otherwise this may be a compression bomb",
            )
        if not result.has("ENC_TO") and not result.has("NODATA"):
            # Signed-only or passphrase-encrypted data is no DICOM mail.
            raise DecryptionError(
                "the mail is not encrypted to a public key (it is unencrypted or passphrase-encrypted)",
                "DICOM mails must be signed and encrypted to this site's key; ask the sender to fix their setup",
            )
        manipulated = result.has("DECRYPTION_FAILED") or result.has("BADMDC") or "manipulated" in log_text
        if manipulated or (result.has("NODATA") and not okay):
            detail = result.log_excerpt() or "no valid OpenPGP data"
            raise DecryptionError(
                f"the mail could not be decrypted: it is damaged, truncated or was tampered with ({detail})",
                "ask the sender to send it again",
            )
        sigs = _signatures(result)
        for sig in sigs:
            self._check_bad_signature(sig)
        if result.returncode != 0 or not okay:
            detail = result.log_excerpt() or f"gpg exit status {result.returncode}"
            raise DecryptionError(
                f"the mail could not be decrypted: {detail}",
                "ask the sender to send it again; if this keeps happening, check the keyring with "
                "`dicommail keys list`",
            )
        if not sigs:
            raise SignatureError(
                "the mail is not signed: its sender cannot be verified",
                "DICOM mails must be signed and encrypted; ask the sender to use a DICOM-E-Mail client "
                "with signing enabled",
            )
        # Every signature must pass (an extra unknown signature is suspicious,
        # not harmless); the first one is reported as the sender.
        for sig in sigs:
            fpr = sig.validsig[-1] if sig.validsig else sig.key_id
            if sig.outcome != "GOODSIG" or not sig.validsig:
                raise SignatureError(
                    f"the signature by key {fpr or 'unknown'} could not be verified",
                    "ask the sender to send the mail again",
                    fingerprint=fpr or None,
                )
            if sig.trust not in ("ULTIMATE", "FULLY"):
                raise SignatureError(
                    f"the mail is signed by key {fpr} ({sig.user_id}), but this site has not certified that key "
                    f"(validity: {sig.trust.lower() or 'unknown'})",
                    f"check the fingerprint with the sender by phone, then run: dicommail keys certify {fpr}",
                    fingerprint=fpr,
                )
        first = sigs[0].validsig
        return Verification(
            fingerprint=first[9] if len(first) > 9 else first[0],
            signing_key_fingerprint=first[0],
            user_id=sigs[0].user_id,
            signed_at=parse_gpg_time(first[2]),
            trust="ultimate" if sigs[0].trust == "ULTIMATE" else "full",
        )

    @staticmethod
    def _check_bad_signature(sig: _Signature) -> None:
        """Raise for a signature gpg itself rejected (bad, unknown signer, expired, revoked)."""
        fpr = sig.validsig[-1] if sig.validsig else (sig.errsig_fpr or sig.key_id)
        who = f"key {fpr}" + (f" ({sig.user_id})" if sig.user_id else "")
        if sig.outcome == "BADSIG":
            raise SignatureError(
                f"BAD signature by {who}: the mail was altered after signing or is damaged",
                "do not use the content; ask the sender to send it again",
                fingerprint=fpr,
            )
        if sig.outcome == "ERRSIG":
            if sig.errsig_rc == "9":
                raise SignatureError(
                    f"the mail is signed by an unknown key {fpr}: its public key is not in this site's keyring",
                    "get the sender's public key, check its fingerprint with the sender by phone, then run: "
                    "dicommail keys import FILE && dicommail keys certify " + fpr,
                    fingerprint=fpr,
                )
            raise SignatureError(
                f"the signature by key {fpr} cannot be checked (gpg error {sig.errsig_rc or 'unknown'})",
                "ask the sender which key and algorithm they use",
                fingerprint=fpr,
            )
        if sig.outcome == "EXPKEYSIG":
            raise SignatureError(
                f"the mail is signed by the expired key {who}",
                "ask the sender to extend or replace their key and send you the new public key",
                fingerprint=fpr,
            )
        if sig.outcome == "REVKEYSIG":
            raise SignatureError(
                f"the mail is signed by the revoked key {who}",
                "the sender withdrew this key: do not trust the content; ask the sender by phone",
                fingerprint=fpr,
            )
        if sig.outcome == "EXPSIG":
            raise SignatureError(
                f"the signature by {who} has expired",
                "ask the sender to send the mail again",
                fingerprint=fpr,
            )


def _require_file(path: Path) -> None:
    # gpg would report a missing input only in its log, as a generic failure.
    if not Path(path).is_file():
        raise InputError(f"{path} does not exist or is not a file")


@contextlib.contextmanager
def _partial_output(dst: Path) -> Iterator[Path]:
    """A private (0600) temporary file next to ``dst``, renamed to ``dst`` on success.

    gpg may write part of its output before noticing a problem; writing to a
    temporary name means ``dst`` never holds an unverified result.
    """
    dst = Path(dst)
    if dst.exists() and not dst.is_file():
        # Renaming onto /dev/null or a FIFO would replace the device itself.
        raise InputError(f"{dst} is not a regular file", "give gpg's output a plain file name")
    fd, name = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".part", dir=dst.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(dst)
