"""Key management on a :class:`~dicommail.crypto.gpg.Keyring`.

Trust in dicommail is deliberately simple: this site's own key is
ultimately trusted, and a peer's key is trusted once this site has
*locally* certified it (``dicommail keys certify``) after checking its
fingerprint with the peer, e.g. by phone.  Local certifications are never
exported, so they say nothing to anyone else.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from dicommail.crypto.gpg import GpgResult, Keyring, parse_gpg_time
from dicommail.errors import AmbiguousKeyError, CryptoError, InputError, KeyNotFoundError, PassphraseError

Algorithm = Literal["rsa3072", "ed25519"]

#: Primary key (sign, certify) and encryption subkey per supported algorithm.
_ALGORITHMS: dict[str, tuple[str, str]] = {
    "rsa3072": ("rsa3072", "rsa3072"),
    "ed25519": ("ed25519", "cv25519"),
}

#: gpg's validity letters (--with-colons field 2) as words.
_VALIDITY = {
    "o": "unknown",
    "-": "unknown",
    "q": "undefined",
    "n": "never",
    "m": "marginal",
    "f": "full",
    "u": "ultimate",
    "e": "expired",
    "r": "revoked",
    "i": "invalid",
    "d": "disabled",
}

#: OpenPGP public key algorithm ids (RFC 4880 / 6637 / draft EdDSA).
_PK_ALGOS = {"1": "rsa", "2": "rsa", "3": "rsa", "16": "elg", "17": "dsa", "18": "ecdh", "19": "ecdsa", "22": "eddsa"}

_HEX_RE = re.compile(r"^[0-9A-F]+$")
_EXPIRES_RE = re.compile(r"^(never|0|\d+[dwmy]?|\d{4}-\d{2}-\d{2})$")
_EMAIL_RE = re.compile(r"<([^<>@\s]+@[^<>@\s]+)>\s*$")
_NAME_RE = re.compile(r"^[^<>@\x00-\x1f]{2,}$")


@dataclass(frozen=True)
class KeyInfo:
    """One key in the keyring, as dicommail needs to know it."""

    fingerprint: str
    user_ids: tuple[str, ...]
    email: str
    """Mail address of the primary user id (empty if it has none)."""
    algorithm: str
    """e.g. ``rsa3072``, ``ed25519``."""
    created: datetime
    expires: datetime | None
    has_secret: bool
    validity: str
    """ultimate, full, marginal, never, undefined, unknown, expired, revoked, invalid, disabled."""
    can_encrypt: bool
    can_sign: bool
    subkey_fingerprints: tuple[str, ...] = field(default=())
    certified_user_ids: tuple[str, ...] = field(default=())
    """User ids with full or ultimate validity: a uid added after we certified the key is not among them."""

    @property
    def certified(self) -> bool:
        """Trusted under dicommail's rule: our own key or one we certified."""
        return self.validity in ("ultimate", "full")

    @property
    def key_id(self) -> str:
        return self.fingerprint[-16:]

    @property
    def user_id(self) -> str:
        return self.user_ids[0] if self.user_ids else ""

    @property
    def grouped_fingerprint(self) -> str:
        """The fingerprint in groups of four, for reading aloud (see :func:`format_fingerprint`)."""
        return format_fingerprint(self.fingerprint)

    def to_json(self) -> dict[str, object]:
        return {
            "fingerprint": self.fingerprint,
            "user_ids": list(self.user_ids),
            "email": self.email,
            "algorithm": self.algorithm,
            "created": self.created.isoformat(),
            "expires": self.expires.isoformat() if self.expires else None,
            "has_secret": self.has_secret,
            "validity": self.validity,
            "certified": self.certified,
            "can_encrypt": self.can_encrypt,
            "can_sign": self.can_sign,
        }


@dataclass(frozen=True)
class KeyChange:
    """What certify/revoke/extend did: the key afterwards, whether anything changed, and why."""

    key: KeyInfo
    changed: bool
    message: str

    def to_json(self) -> dict[str, object]:
        """What ``dicommail keys extend --json`` prints (after ``"ok": true``)."""
        return {"changed": self.changed, "message": self.message, "key": self.key.to_json()}


# -- formatting --------------------------------------------------------------


def format_fingerprint(fpr: str) -> str:
    """Group a fingerprint for reading aloud: ``ABCD EF01 ...  ... 89AB`` (as gpg prints it)."""
    clean = normalize_key_id(fpr)
    groups = [clean[i : i + 4] for i in range(0, len(clean), 4)]
    half = (len(groups) + 1) // 2
    return " ".join(groups[:half]) + "  " + " ".join(groups[half:]) if len(groups) > 1 else clean


def normalize_key_id(key_id: str) -> str:
    """Upper-case hex without spaces or ``0x``; other strings (addresses) are only stripped."""
    text = key_id.strip()
    compact = text.replace(" ", "").upper()
    compact = compact.removeprefix("0X")
    if _HEX_RE.match(compact):
        return compact
    return text


# -- listing -----------------------------------------------------------------


def _unescape_colons(value: str) -> str:
    """Undo gpg's ``\\xNN`` escaping in --with-colons output and decode UTF-8."""
    raw = value.encode("latin-1", errors="replace")
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)
    return raw.decode("utf-8", errors="replace")


def _email_of(user_id: str) -> str:
    match = _EMAIL_RE.search(user_id)
    if match:
        return match.group(1)
    stripped = user_id.strip()
    return stripped if "@" in stripped and " " not in stripped else ""


def _algorithm(fields: list[str]) -> str:
    algo = _PK_ALGOS.get(fields[3], f"algo{fields[3]}")
    curve = fields[16] if len(fields) > 16 else ""
    if curve:
        return curve
    return f"{algo}{fields[2]}" if algo in ("rsa", "dsa", "elg") else algo


def _time_or_none(value: str) -> datetime | None:
    return parse_gpg_time(value) if value and value != "0" else None


@dataclass
class _KeyBuilder:
    """Fields of one key while its --with-colons lines are read."""

    fingerprint: str
    algorithm: str
    created: datetime
    expires: datetime | None
    has_secret: bool
    validity: str
    capabilities: str
    user_ids: list[str] = field(default_factory=list)
    certified_user_ids: list[str] = field(default_factory=list)
    subkey_fingerprints: list[str] = field(default_factory=list)
    in_subkey: bool = False

    def build(self) -> KeyInfo:
        return KeyInfo(
            fingerprint=self.fingerprint,
            user_ids=tuple(self.user_ids),
            email=_email_of(self.user_ids[0]) if self.user_ids else "",
            algorithm=self.algorithm,
            created=self.created,
            expires=self.expires,
            has_secret=self.has_secret,
            validity=self.validity,
            # Upper-case letters are the usable capabilities of the whole key
            # (an expired or revoked subkey drops its letter).
            can_encrypt="E" in self.capabilities,
            can_sign="S" in self.capabilities,
            subkey_fingerprints=tuple(self.subkey_fingerprints),
            certified_user_ids=tuple(self.certified_user_ids),
        )


def _parse_listing(result: GpgResult) -> list[KeyInfo]:
    builders: list[_KeyBuilder] = []
    for line in result.stdout.decode("latin-1").splitlines():
        fields = line.split(":")
        kind = fields[0]
        if kind in ("pub", "sec"):
            builders.append(
                _KeyBuilder(
                    fingerprint="",
                    algorithm=_algorithm(fields),
                    created=parse_gpg_time(fields[5]),
                    expires=_time_or_none(fields[6]),
                    # --with-secret puts "+" (or "#" for a stub) in field 15.
                    has_secret=kind == "sec" or (len(fields) > 14 and fields[14] not in ("", "#")),
                    validity=_VALIDITY.get(fields[1], "unknown"),
                    capabilities=fields[11] if len(fields) > 11 else "",
                )
            )
            continue
        if not builders:
            continue
        current = builders[-1]
        if kind == "fpr":
            if current.in_subkey:
                current.subkey_fingerprints.append(fields[9])
            elif not current.fingerprint:
                current.fingerprint = fields[9]
        elif kind in ("sub", "ssb"):
            current.in_subkey = True
        # A revoked user id is no longer the key's identity (unless the whole
        # key is revoked, when every uid shows as revoked).
        elif kind == "uid" and (fields[1] != "r" or current.validity == "revoked"):
            current.user_ids.append(_unescape_colons(fields[9]))
            if fields[1] in ("f", "u"):
                current.certified_user_ids.append(_unescape_colons(fields[9]))
    return [b.build() for b in builders if b.fingerprint]


def list_keys(keyring: Keyring, secret: bool = False) -> list[KeyInfo]:
    """All keys in the keyring (only those with a secret part if ``secret``)."""
    result = keyring.run(["--with-colons", "--fixed-list-mode", "--with-secret", "--with-fingerprint", "--list-keys"])
    if result.returncode not in (0, 2) and not result.stdout:
        raise CryptoError(
            f"cannot list the keys in {keyring.home}: {result.log_excerpt() or 'gpg failed'}",
            "check the keyring directory and its permissions",
        )
    keys = _parse_listing(result)
    return [k for k in keys if k.has_secret] if secret else keys


def find_key(keyring: Keyring, key_id: str, *, secret: bool = False) -> KeyInfo:
    """One key by full fingerprint, long key id (16 hex digits) or mail address."""
    wanted = normalize_key_id(key_id)
    if not wanted:
        raise KeyNotFoundError("no key given", "name a key by fingerprint, long key id or mail address")
    keys = list_keys(keyring, secret=secret)
    if _HEX_RE.match(wanted) and len(wanted) in (40, 64):
        matches = [k for k in keys if wanted == k.fingerprint or wanted in k.subkey_fingerprints]
    elif _HEX_RE.match(wanted) and len(wanted) == 16:
        matches = [k for k in keys if any(f.endswith(wanted) for f in (k.fingerprint, *k.subkey_fingerprints))]
    elif "@" in wanted:
        address = wanted.strip("<>").lower()
        matches = [k for k in keys if any(_email_of(uid).lower() == address for uid in k.user_ids)]
    else:
        raise KeyNotFoundError(
            f"{key_id!r} is not a fingerprint, long key id or mail address",
            "short key ids (8 digits) are not accepted because they are easy to forge; "
            "use the full fingerprint from `dicommail keys list`",
        )
    kind = "secret key" if secret else "key"
    if not matches:
        raise KeyNotFoundError(
            f"no {kind} {key_id} in the keyring {keyring.home}",
            "see `dicommail keys list`" + (" --secret" if secret else "") + "; import a key with dicommail keys import",
        )
    if len(matches) > 1:
        candidates = "; ".join(f"{k.fingerprint} {k.user_id}" for k in matches)
        raise AmbiguousKeyError(
            f"{key_id} matches {len(matches)} keys: {candidates}",
            "name the key by its full fingerprint",
        )
    return matches[0]


def own_key(keyring: Keyring, configured: str = "", *, allow_expired: bool = False) -> KeyInfo:
    """This site's signing key: the configured one, or the only usable secret key.

    ``allow_expired`` counts an expired secret key as usable (to extend it).
    """
    if configured:
        try:
            return find_key(keyring, configured, secret=True)
        except KeyNotFoundError as exc:
            raise KeyNotFoundError(
                f"the key set as identity.key ({configured}) has no secret key in {keyring.home}",
                "fix identity.key in dicommail.toml (see `dicommail keys list --secret`)",
            ) from exc
    secrets = list_keys(keyring, secret=True)
    if not secrets:
        raise KeyNotFoundError(
            f"this site has no key yet (no secret key in {keyring.home})",
            "create one: dicommail keys generate --name NAME --email ADDRESS --new-passphrase-file FILE",
        )
    unusable = ("revoked", "disabled", "invalid") if allow_expired else ("revoked", "expired", "disabled", "invalid")
    usable = [k for k in secrets if k.validity not in unusable]
    if not usable:
        states = "; ".join(f"{k.fingerprint} is {k.validity}" for k in secrets)
        raise CryptoError(
            f"this site's key cannot be used: {states}",
            "generate a new key with `dicommail keys generate` and send its public key to your peers",
        )
    if len(usable) > 1:
        candidates = "; ".join(f"{k.fingerprint} {k.user_id}" for k in usable)
        raise AmbiguousKeyError(
            f"the keyring holds several secret keys: {candidates}",
            "set identity.key in dicommail.toml to the fingerprint of this site's key",
        )
    return usable[0]


# -- generate ------------------------------------------------------------------


def generate(
    keyring: Keyring,
    name: str,
    email: str,
    algo: str = "rsa3072",
    expires: str = "2y",
    passphrase: str | None = None,
    *,
    created: datetime | None = None,
) -> KeyInfo:
    """Make this site's key: a sign+certify primary key with an encryption subkey.

    gpg gives a key it generates ultimate ownertrust and stores a revocation
    certificate for it in ``openpgp-revocs.d/``.  ``created`` backdates the
    key (gpg --faked-system-time); only for test keys, e.g. so that the demo
    keys stay usable on a machine whose clock is behind.
    """
    if algo not in _ALGORITHMS:
        raise InputError(f"unknown key algorithm {algo!r}", f"use one of: {', '.join(_ALGORITHMS)}")
    if not _NAME_RE.match(name.strip()):
        raise InputError(f"{name!r} is not usable as a key name", "use the site's name, e.g. 'Radiology Example Town'")
    if not re.fullmatch(r"[^<>@\s]+@[^<>@\s]+", email):
        raise InputError(f"{email!r} is not a mail address")
    expires = _check_expires(expires)
    primary, sub = _ALGORITHMS[algo]
    user_id = f"{name.strip()} <{email}>"
    # Without a passphrase gpg must still be told so, or the agent would ask;
    # the later --pinentry-mode overrides the "error" mode Keyring.run sets.
    pass_args = [] if passphrase else ["--pinentry-mode", "loopback", "--passphrase", ""]
    if created is not None:
        if created.timestamp() > time.time():
            raise InputError("a key cannot be created in the future")
        pass_args += ["--faked-system-time", str(int(created.timestamp()))]
    result = keyring.run(
        [*pass_args, "--quick-generate-key", user_id, primary, "cert,sign", expires], passphrase=passphrase or None
    )
    made = [v.split()[1] for v in result.values("KEY_CREATED") if len(v.split()) > 1]
    if result.returncode != 0 or not made:
        raise CryptoError(
            f"gpg could not generate the key: {result.log_excerpt() or 'unknown error'}",
            "check that gpg-agent can run in the keyring directory",
        )
    fpr = made[0]
    result = keyring.run([*pass_args, "--quick-add-key", fpr, sub, "encr", expires], passphrase=passphrase or None)
    if result.returncode != 0 or not result.has("KEY_CREATED"):
        # A key without an encryption subkey cannot receive mail: remove it.
        delete(keyring, fpr, secret=True)
        raise CryptoError(
            f"gpg could not add the encryption subkey: {result.log_excerpt() or 'unknown error'}",
            f"try again; if it persists, check gpg --homedir {keyring.home} --version (GnuPG 2.2 or later is needed)",
        )
    return find_key(keyring, fpr)


def _check_expires(expires: str) -> str:
    """An expiry as gpg takes it (``2y``, ``365d``, ``2028-12-31``, ``never``), or InputError."""
    expires = expires.strip().lower()
    if not _EXPIRES_RE.match(expires):
        raise InputError(
            f"{expires!r} is not an expiry",
            "use e.g. 2y, 18m, 52w, 365d, an ISO date (2028-12-31) or never",
        )
    return expires


# -- import / export -------------------------------------------------------------


def _secret_keys_in(keyring: Keyring, data: bytes) -> list[str]:
    """Primary fingerprints of the keys whose secret parts ``data`` holds; nothing is imported."""
    shown = keyring.run(["--with-colons", "--fixed-list-mode", "--import", "--import-options", "show-only"], stdin=data)
    found: list[str] = []
    primary = ""
    secret = awaiting_primary = False
    for line in shown.stdout.decode("latin-1").splitlines():
        fields = line.split(":")
        if fields[0] in ("pub", "sec"):
            primary, secret, awaiting_primary = "", fields[0] == "sec", True
        elif fields[0] == "ssb":
            # Secret subkeys alone (gpg --export-secret-subkeys) are secret material too.
            secret = True
        elif fields[0] == "fpr" and len(fields) > 9 and awaiting_primary:
            primary, awaiting_primary = fields[9], False
        if secret and primary and primary not in found:
            found.append(primary)
    return found


def import_keys(keyring: Keyring, data: bytes, *, allow_secret: bool = False) -> list[KeyInfo]:
    """Import public keys (and secret keys only with ``allow_secret``); returns the keys imported or updated.

    A secret key belongs in its owner's keyring only: a peer's key file that
    holds one is refused unless the caller restores this site's own key on
    purpose (a backup, the demo keys).  Then nothing is imported at all.
    """
    if not data.strip():
        raise InputError("the key data is empty", "export the key with `dicommail keys export` and try again")
    if not allow_secret:
        secrets = _secret_keys_in(keyring, data)
        if secrets:
            raise InputError(
                f"the key data holds the SECRET key of {', '.join(secrets)}; nothing was imported",
                "a peer sends only its public key (dicommail keys export FINGERPRINT): ask for that; to restore "
                "this site's own key from a backup, import it with --secret",
            )
    result = keyring.run(["--import"], stdin=data)
    fingerprints = list(dict.fromkeys(v.split()[1] for v in result.values("IMPORT_OK") if len(v.split()) > 1))
    if not fingerprints:
        problem = result.log_excerpt() or "no OpenPGP key found"
        raise CryptoError(
            f"no key could be imported: {problem}",
            "the file must hold an OpenPGP key, e.g. made with `dicommail keys export`, or by the peer's GnuPG "
            "with --export --armor",
        )
    by_fpr = {k.fingerprint: k for k in list_keys(keyring)}
    return [by_fpr[f] for f in fingerprints if f in by_fpr]


def export_key(keyring: Keyring, key_id: str, secret: bool = False, passphrase: str | None = None) -> str:
    """The ASCII-armored public (or secret) key; local certifications are never included."""
    key = find_key(keyring, key_id, secret=secret)
    command = "--export-secret-keys" if secret else "--export"
    result = keyring.run(["--armor", command, key.fingerprint], passphrase=passphrase)
    text = result.stdout.decode("ascii", errors="replace")
    if "-----BEGIN PGP" not in text:
        _raise_passphrase(result, key.fingerprint)
        raise CryptoError(
            f"could not export key {key.fingerprint}: {result.log_excerpt() or 'gpg wrote nothing'}",
            "check the key with `dicommail keys list`",
        )
    return text


# -- trust ---------------------------------------------------------------------


def certify(keyring: Keyring, key_id: str, passphrase: str | None = None, signer: str = "") -> KeyChange:
    """Locally certify a peer's key with this site's key, which makes it trusted.

    Our own key needs no certification (it is ultimately trusted); for our
    own secret key imported from a backup this sets ultimate ownertrust
    instead.  "Our own" is ``signer`` (identity.key) or, when none is
    configured, the only secret key in the keyring (or one that is ultimately
    trusted already, as gpg makes the keys it generates).  Any other key, even one
    whose secret part is in the keyring, is certified as a peer's key: with
    ultimate ownertrust every key it signed would become valid for us too.
    """
    key = find_key(keyring, key_id)
    if key.validity in ("revoked", "expired", "disabled", "invalid"):
        raise CryptoError(
            f"key {key.fingerprint} is {key.validity} and cannot be certified",
            "ask the key owner for their current key",
        )
    if key.has_secret and _is_own_key(keyring, key, signer):
        if key.validity == "ultimate":
            return KeyChange(key, False, f"{key.fingerprint} is this site's own key: already trusted")
        _set_ownertrust(keyring, key.fingerprint, _OWNERTRUST_ULTIMATE)
        key = find_key(keyring, key.fingerprint)
        return KeyChange(key, True, f"{key.fingerprint} is this site's own key: now trusted as our own")
    note = ""
    if key.has_secret:
        note = " (its secret key is in this keyring too, but it is not this site's key: trusted as a peer's only)"
        if key.validity == "ultimate":
            # An older dicommail made any imported secret key ultimately trusted.
            _set_ownertrust(keyring, key.fingerprint, _OWNERTRUST_UNDEFINED)
            key = find_key(keyring, key.fingerprint)
    if key.certified:
        return KeyChange(key, False, f"{key.fingerprint} is already certified{note}")
    me = own_key(keyring, signer)
    result = keyring.run(["--local-user", me.fingerprint, "--quick-lsign-key", key.fingerprint], passphrase=passphrase)
    _raise_passphrase(result, me.fingerprint)
    after = find_key(keyring, key.fingerprint)
    if result.returncode != 0 or not after.certified:
        raise CryptoError(
            f"certifying key {key.fingerprint} failed: {result.log_excerpt() or 'it is still not valid'}",
            "check both keys with `dicommail keys list`",
        )
    return KeyChange(after, True, f"certified {after.fingerprint} ({after.user_id}) with {me.fingerprint}{note}")


def _is_own_key(keyring: Keyring, key: KeyInfo, configured: str) -> bool:
    """Whether ``key`` is this site's key: the configured one; without one, a secret key already
    ultimately trusted (gpg does that for the keys it generates) or the keyring's only secret key."""
    if configured:
        return own_key(keyring, configured).fingerprint == key.fingerprint
    if key.has_secret and key.validity == "ultimate":
        return True
    secrets = list_keys(keyring, secret=True)
    return [k.fingerprint for k in secrets] == [key.fingerprint]


#: Ownertrust values in gpg's --export-ownertrust format.
_OWNERTRUST_UNDEFINED = 2
_OWNERTRUST_ULTIMATE = 6


def _set_ownertrust(keyring: Keyring, fingerprint: str, value: int) -> None:
    result = keyring.run(["--import-ownertrust"], stdin=f"{fingerprint}:{value}:\n".encode("ascii"))
    if result.returncode != 0:
        what = "mark it as this site's own key" if value == _OWNERTRUST_ULTIMATE else "reset its ownertrust"
        raise CryptoError(
            f"could not {what} ({fingerprint}): {result.log_excerpt()}",
            "check the keyring with `dicommail keys list`",
        )


def revoke(keyring: Keyring, key_id: str, passphrase: str | None = None, own: str = "") -> KeyChange:
    """Revoke our own key, or withdraw our certification of a peer's key.

    For our own key (``own``, i.e. identity.key, or else the keyring's only
    secret key) this imports the revocation certificate gpg stored at
    generation time, so the next ``export_key`` carries the revocation to
    the peers.  For a peer's key the local certification is removed, so the
    key is no longer trusted (it stays in the keyring).
    """
    key = find_key(keyring, key_id)
    if key.has_secret:
        if not _is_own_key(keyring, key, own):
            # Revoking would revoke the other party's key itself, for good.
            raise CryptoError(
                f"{key.fingerprint} has its secret key in this keyring but is not this site's key "
                + (f"({own})" if own else "(it is not trusted as our own, and identity.key is not set)"),
                "set identity.key in dicommail.toml to this site's key; to stop trusting a peer whose secret key "
                f"you hold, delete it (dicommail keys delete {key.fingerprint} --secret) and import its public key",
            )
        return _revoke_own(keyring, key, passphrase)
    return _uncertify(keyring, key, passphrase)


def _revoke_own(keyring: Keyring, key: KeyInfo, passphrase: str | None) -> KeyChange:
    if key.validity == "revoked":
        return KeyChange(key, False, f"{key.fingerprint} is already revoked")
    certificate = _stored_revocation(keyring, key.fingerprint) or _make_revocation(keyring, key.fingerprint, passphrase)
    result = keyring.run(["--import"], stdin=certificate)
    after = find_key(keyring, key.fingerprint)
    if after.validity != "revoked":
        raise CryptoError(
            f"revoking {key.fingerprint} failed: {result.log_excerpt() or 'the key is still valid'}",
            "check the revocation certificate in openpgp-revocs.d in the keyring directory",
        )
    return KeyChange(
        after, True, f"revoked {after.fingerprint}: export the public key and send it to every peer"
    )


def _stored_revocation(keyring: Keyring, fingerprint: str) -> bytes | None:
    path = keyring.home / "openpgp-revocs.d" / f"{fingerprint}.rev"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    # gpg prefixes the armor header with ':' so that importing the file by
    # accident does not revoke the key; remove it to use it on purpose.
    lines = [line[1:] if line.startswith(":-----BEGIN PGP") else line for line in text.splitlines()]
    start = next((i for i, line in enumerate(lines) if line.startswith("-----BEGIN PGP")), None)
    if start is None:
        return None
    return ("\n".join(lines[start:]) + "\n").encode("ascii", errors="replace")


def _make_revocation(keyring: Keyring, fingerprint: str, passphrase: str | None) -> bytes:
    # --gen-revoke only asks questions, even with --batch; answer them via
    # --command-fd: "really?" y, reason 0 (no reason), empty text, "okay?" y.
    answers = b"y\n0\n\ny\n"
    result = keyring.run(
        ["--no-batch", "--command-fd", "0", "--armor", "--gen-revoke", fingerprint],
        passphrase=passphrase,
        stdin=answers,
    )
    _raise_passphrase(result, fingerprint)
    if b"-----BEGIN PGP" not in result.stdout:
        raise CryptoError(
            f"there is no revocation certificate for {fingerprint} and gpg could not make one: "
            f"{result.log_excerpt() or 'unknown error'}",
            f"make one by hand: gpg --homedir {keyring.home} --gen-revoke {fingerprint}",
        )
    return result.stdout


def _uncertify(keyring: Keyring, key: KeyInfo, passphrase: str | None) -> KeyChange:
    """Withdraw this site's certification of a peer's key.

    --quick-revoke-sig revokes our signature and makes gpg recompute the
    key's validity (deleting the signature alone would leave gpg's cached
    validity "full" in the trustdb).  But a revoked local signature blocks a
    later --quick-lsign-key ("already signed"), so the key is then
    re-imported from its export, which never contains local signatures or
    their revocations: certifying it again later works.
    """
    if not key.certified:
        return KeyChange(key, False, f"{key.fingerprint} is not certified by this site")
    ours = {k.fingerprint for k in list_keys(keyring, secret=True)}
    listing = keyring.run(["--with-colons", "--fixed-list-mode", "--list-sigs", key.fingerprint])
    signers: list[str] = []
    newest = 0
    for line in listing.stdout.decode("latin-1").splitlines():
        fields = line.split(":")
        # Certification classes 10-13 ("l" suffix: local); field 13 is the issuer fingerprint.
        if fields[0] == "sig" and len(fields) > 12 and fields[10][:2] in ("10", "11", "12", "13"):
            issuer = fields[12]
            if issuer in ours and issuer != key.fingerprint:
                signers += [] if issuer in signers else [issuer]
                newest = max(newest, int(parse_gpg_time(fields[5]).timestamp()))
    # OpenPGP timestamps have one-second resolution, and a revocation made in
    # the same second as the signature does not count: wait that second out.
    while signers and int(time.time()) <= newest:
        time.sleep(0.05)
    for signer in signers:
        result = keyring.run(["--quick-revoke-sig", key.fingerprint, signer], passphrase=passphrase)
        _raise_passphrase(result, signer)
        if result.returncode != 0:
            raise CryptoError(
                f"could not withdraw the certification of {key.fingerprint} by {signer}: {result.log_excerpt()}",
                "check the keys with `dicommail keys list`",
            )
    exported = keyring.run(["--export", key.fingerprint])
    if exported.stdout and exported.returncode == 0:
        delete(keyring, key.fingerprint)
        result = keyring.run(["--import"], stdin=exported.stdout)
        if not result.has("IMPORT_OK"):
            raise CryptoError(
                f"withdrawing the certification of {key.fingerprint} lost the key: {result.log_excerpt()}",
                "ask the key owner for their public key and import it again",
            )
    after = find_key(keyring, key.fingerprint)
    if after.certified:
        raise CryptoError(
            f"{key.fingerprint} is still trusted ({after.validity}) after withdrawing this site's certification",
            f"another key with ultimate ownertrust certified it; inspect with: "
            f"gpg --homedir {keyring.home} --list-sigs {key.fingerprint}",
        )
    return KeyChange(after, True, f"withdrew this site's certification of {after.fingerprint}: no longer trusted")


# -- expiry --------------------------------------------------------------------


def extend(
    keyring: Keyring, key_id: str = "", expires: str = "2y", passphrase: str | None = None, own: str = ""
) -> KeyChange:
    """Set the expiry of this site's own key and of its subkeys to ``expires`` (``2y``: two years from now).

    Only a key's owner can extend it, so a peer's key is refused, and so is a
    secret key that is not this site's (``own``, i.e. identity.key, as for
    :func:`revoke`).  An empty ``key_id`` means this site's key, expired or
    not: extending it is how an expired key becomes usable again.  Peers see
    the new date only once they import the public key again.
    """
    expires = _check_expires(expires)
    key = find_key(keyring, key_id) if key_id.strip() else own_key(keyring, own, allow_expired=True)
    if not key.has_secret:
        raise CryptoError(
            f"{key.fingerprint} is a peer's key: only its owner can extend its expiry",
            "ask the peer to extend their key (dicommail keys extend) and to send you the public key again; "
            "then import it with dicommail keys import",
        )
    if not _is_own_key(keyring, key, own):
        raise CryptoError(
            f"{key.fingerprint} has its secret key in this keyring but is not this site's key "
            + (f"({own})" if own else "(it is not trusted as our own, and identity.key is not set)"),
            "set identity.key in dicommail.toml to this site's key; a peer extends its own key and sends it again",
        )
    if key.validity == "revoked":
        raise CryptoError(
            f"{key.fingerprint} is revoked and cannot be extended",
            "generate a new key with `dicommail keys generate` and send its public key to your peers",
        )
    before = (key.expires, _subkey_expiries(keyring, key.fingerprint))
    result = keyring.run(["--quick-set-expire", key.fingerprint, expires], passphrase=passphrase)
    _raise_passphrase(result, key.fingerprint)
    _check_set_expire(result, key.fingerprint, "the key")
    # Subkeys are named one by one: gpg's "*" skips subkeys that have expired
    # already, and an expired encryption subkey is the usual reason to extend.
    subkeys = list(_subkey_expiries(keyring, key.fingerprint))
    if subkeys:
        result = keyring.run(["--quick-set-expire", key.fingerprint, expires, *subkeys], passphrase=passphrase)
        _raise_passphrase(result, key.fingerprint)
        _check_set_expire(result, key.fingerprint, "its subkeys")
    after = find_key(keyring, key.fingerprint)
    until = after.expires.date().isoformat() if after.expires else "never"
    if (after.expires, _subkey_expiries(keyring, after.fingerprint)) == before:
        return KeyChange(after, False, f"{after.fingerprint} already expires {until}: nothing changed")
    return KeyChange(
        after,
        True,
        f"extended {after.fingerprint} and its subkeys to {until}: export the public key again "
        f"(dicommail keys export {after.fingerprint} -o site.pub.asc) and send it to every peer, "
        "or they refuse this site's mail once the old date has passed",
    )


def _subkey_expiries(keyring: Keyring, fingerprint: str) -> dict[str, str]:
    """Expiry (gpg's raw field, empty for never) of each subkey that is not revoked, by fingerprint."""
    listing = keyring.run(["--with-colons", "--fixed-list-mode", "--list-keys", fingerprint])
    found: dict[str, str] = {}
    pending: tuple[str, str] | None = None
    for line in listing.stdout.decode("latin-1").splitlines():
        fields = line.split(":")
        if fields[0] == "sub" and len(fields) > 6:
            pending = (fields[1], fields[6])
        elif fields[0] == "fpr" and len(fields) > 9 and pending is not None:
            validity, expiry = pending
            if validity != "r":  # a revoked subkey stays revoked: extending it would only confuse peers
                found[fields[9]] = expiry
            pending = None
        elif fields[0] in ("pub", "uid"):
            pending = None
    return found


def _check_set_expire(result: GpgResult, fingerprint: str, what: str) -> None:
    # gpg exits 0 even when --quick-set-expire fails; the ERROR status line tells.
    if result.returncode != 0 or result.has("ERROR"):
        raise CryptoError(
            f"could not set the expiry of {what} of {fingerprint}: {result.log_excerpt() or 'gpg failed'}",
            "check the key with `dicommail keys list --secret` and run the command again",
        )


def delete(keyring: Keyring, key_id: str, secret: bool = False) -> KeyInfo:
    """Delete a key (with ``secret``: its secret part too; needed for our own key)."""
    key = find_key(keyring, key_id)
    if key.has_secret and not secret:
        raise CryptoError(
            f"{key.fingerprint} is a secret key of this site; deleting it loses the ability to read mail sent to it",
            "if you really mean it, delete it together with its secret part (--secret)",
        )
    # Deleting needs the fingerprint (not an address) and --yes in batch mode.
    command = "--delete-secret-and-public-keys" if key.has_secret else "--delete-keys"
    result = keyring.run(["--yes", command, key.fingerprint])
    if result.returncode != 0:
        raise CryptoError(
            f"could not delete {key.fingerprint}: {result.log_excerpt() or 'gpg failed'}",
            "check the keyring with `dicommail keys list`",
        )
    return key


def _raise_passphrase(result: GpgResult, fingerprint: str) -> None:
    codes = result.error_codes
    if result.has("BAD_PASSPHRASE") or 11 in codes:
        raise PassphraseError(
            f"wrong passphrase for key {fingerprint}",
            "check the passphrase file named by identity.passphrase_file",
        )
    if result.has("MISSING_PASSPHRASE") or {69, 85, 86, 99}.intersection(codes):
        raise PassphraseError(
            f"key {fingerprint} is protected by a passphrase, but none was given",
            "set identity.passphrase_file in dicommail.toml to a file holding the passphrase",
        )


__all__ = [
    "Algorithm",
    "KeyChange",
    "KeyInfo",
    "certify",
    "delete",
    "export_key",
    "extend",
    "find_key",
    "format_fingerprint",
    "generate",
    "import_keys",
    "list_keys",
    "normalize_key_id",
    "own_key",
    "revoke",
]
