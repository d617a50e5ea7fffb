"""Key management: the jobs of ``dicommail keys ...``.

Trust is dicommail's simple rule: this site's own key is ultimately trusted,
and a peer's key is trusted once this site has certified it locally after
checking its fingerprint with the peer (e.g. by phone).  Keys are named by
full fingerprint, long key id (16 hex digits) or mail address.
"""

from __future__ import annotations

import builtins
import os
import secrets
from pathlib import Path

from dicommail import config_edit
from dicommail.crypto import keys as _keys
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import Algorithm, KeyChange, KeyInfo, format_fingerprint
from dicommail.errors import AmbiguousKeyError, InputError, KeyNotFoundError
from dicommail.site.base import SiteBase
from dicommail.store.files import atomic_writer, fsync_dir

__all__ = ["Algorithm", "KeyChange", "KeyInfo", "Keys", "format_fingerprint"]


class Keys:
    """``site.keys``: this site's keyring (its own key and its peers' certified keys).

    Every method opens the keyring for the call and closes it (stopping its
    gpg-agent) again.  Operations that need this site's secret key take its
    passphrase from ``identity.passphrase_file`` and "this site's key" from
    ``identity.key`` (or, when that is unset, the keyring's only secret key).
    Failures raise :class:`~dicommail.errors.KeyNotFoundError`,
    :class:`~dicommail.errors.AmbiguousKeyError`,
    :class:`~dicommail.errors.PassphraseError` (all
    :class:`~dicommail.errors.CryptoError`),
    :class:`~dicommail.errors.InputError` or
    :class:`~dicommail.errors.ConfigError` (an unreadable passphrase file).
    """

    def __init__(self, site: SiteBase) -> None:
        self._site = site

    # ``list`` is a method name here, so annotations spell the type builtins.list.

    def list(self, *, secret: bool = False) -> builtins.list[KeyInfo]:
        """All keys in the keyring, or with ``secret`` only those whose secret part it holds."""
        with self._site._keyring() as keyring:
            return _keys.list_keys(keyring, secret=secret)

    def get(self, key_id: str) -> KeyInfo:
        """One key by fingerprint, long key id or mail address.

        Raises :class:`~dicommail.errors.KeyNotFoundError` if there is none and
        :class:`~dicommail.errors.AmbiguousKeyError` if several keys match.
        """
        with self._site._keyring() as keyring:
            return _keys.find_key(keyring, key_id)

    def own(self) -> KeyInfo:
        """This site's key: ``identity.key``, or else the keyring's only usable secret key."""
        with self._site._keyring() as keyring:
            return _keys.own_key(keyring, self._site.config.identity.key)

    def fingerprint(self, key_id: str) -> str:
        """A key's fingerprint in groups of four (``ABCD EF01 ...``), for reading aloud to its owner."""
        return self.get(key_id).grouped_fingerprint

    def generate(
        self,
        name: str,
        email: str,
        *,
        algo: Algorithm = "rsa3072",
        expires: str = "2y",
        passphrase: str | None,
    ) -> KeyInfo:
        """Generate this site's key pair: a signing key with an encryption subkey.

        ``passphrase`` protects the new secret key; ``None`` (to be given on
        purpose) leaves it unprotected, for a locked-down server.  ``expires``
        is e.g. ``2y``, ``18m``, ``365d``, ``2028-12-31`` or ``never``.  The
        key is this site's own (ultimately trusted) at once; record it in
        ``dicommail.toml`` with :meth:`make_default` and send the public key
        to the peers.  Raises :class:`~dicommail.errors.InputError` for an unusable name,
        address, algorithm or expiry.
        """
        with self._site._keyring() as keyring:
            return _keys.generate(keyring, name, email, algo=algo, expires=expires, passphrase=passphrase)

    def create_passphrase_file(self, path: Path) -> str:
        """Create ``path`` holding a new random passphrase (43 characters) and return the passphrase.

        The file is readable by this user only (mode 0600) from the moment it
        exists.  An existing file is never overwritten: that raises
        :class:`~dicommail.errors.InputError`, as does a directory that is
        missing or not writable.
        """
        passphrase = secrets.token_urlsafe(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise InputError(
                f"{path} exists already",
                "to protect the key with the passphrase in it, give --passphrase-file instead; "
                "or name a file that does not exist yet",
            ) from None
        except OSError as exc:
            raise InputError(
                f"cannot create the passphrase file {path}: {exc.strerror}",
                "check that its directory exists and that this user may write there",
            ) from exc
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                os.fchmod(handle.fileno(), 0o600)  # exactly 0600, whatever the umask made of it
                handle.write(passphrase + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            fsync_dir(path.absolute().parent)
        except BaseException:
            # Half a passphrase file would lock the key away for good.
            path.unlink(missing_ok=True)
            raise
        return passphrase

    def make_default(self, key_id: str, *, passphrase_file: Path | None, replace: bool = False) -> KeyChange:
        """Record a key of this keyring as this site's key: ``identity.key`` and ``identity.passphrase_file``.

        ``dicommail.toml`` is edited in place (comments and every other
        setting stay) and atomically; ``passphrase_file`` is the file holding
        the key's passphrase, ``None`` for a key without one.  A relative path
        is relative to the current directory, as everywhere in Python; the
        config gets one that means the same (relative to the home if the file
        is inside it, else absolute).

        This site's key never changes unasked: if ``identity.key`` names
        another key, or is unset while the keyring holds one other usable
        secret key (which is then this site's key), nothing switches unless
        ``replace``; the config keeps that key (setting ``identity.key`` to it
        in the second case, so that the new key does not make it ambiguous)
        and the message says how to switch.  ``changed`` is true when the
        config changed to name ``key_id``; afterwards :attr:`Site.config`
        reads the new file.  Raises :class:`~dicommail.errors.KeyNotFoundError`
        if the keyring holds no secret key ``key_id``,
        :class:`~dicommail.errors.InputError` for an unreadable passphrase
        file and :class:`~dicommail.errors.ConfigError` if ``dicommail.toml``
        cannot be changed (then it is left as it was).
        """
        with self._site._keyring() as keyring:
            key = _keys.find_key(keyring, key_id, secret=True)
            current = self._current_key(keyring, key.fingerprint)
        stored = self._config_path(passphrase_file) if passphrase_file is not None else ""
        if passphrase_file is not None:
            try:
                with passphrase_file.open("rb"):
                    pass
            except OSError as exc:
                raise InputError(f"cannot read the passphrase file {passphrase_file}: {exc.strerror}") from exc
        config = self._site.config
        identity = config.identity
        # One setting a line, as they go into the file: easy to copy, and it fits 80 columns.
        switch = (
            f"to make {key.fingerprint} this site's key, set in [identity] of {config.config_file}:\n"
            f'  key = "{key.fingerprint}"\n  passphrase_file = {config_edit.toml_string(stored)}'
        )
        if current and current != key.fingerprint and not replace:
            if identity.key:
                return KeyChange(key, False, f"identity.key names another key ({identity.key}): it stays this "
                                 f"site's key;\n{switch}")
            self._site._config = config_edit.set_settings(config, "identity", {"key": current})
            return KeyChange(
                key,
                False,
                f"this site's key stays {current}, the keyring's other secret key (now set as identity.key);\n"
                + switch,
            )
        if identity.key == key.fingerprint and identity.passphrase_file == stored:
            return KeyChange(key, False, f"{key.fingerprint} is this site's key already")
        self._site._config = config_edit.set_settings(
            config, "identity", {"key": key.fingerprint, "passphrase_file": stored}
        )
        return KeyChange(
            key, True, f"{key.fingerprint} is now this site's key (identity.key in {config.config_file})"
        )

    def _current_key(self, keyring: Keyring, candidate: str) -> str:
        """The fingerprint of the key that is this site's key before ``candidate`` becomes it, or ""."""
        configured = self._site.config.identity.key
        if configured:
            try:
                return _keys.find_key(keyring, configured, secret=True).fingerprint
            except (KeyNotFoundError, AmbiguousKeyError):
                # Named but missing: still not a choice to overrule silently.
                return configured
        unusable = ("revoked", "expired", "disabled", "invalid")
        others = [
            k.fingerprint
            for k in _keys.list_keys(keyring, secret=True)
            if k.fingerprint != candidate and k.validity not in unusable
        ]
        # Several others: own_key() could not pick one, so none was this site's key.
        return others[0] if len(others) == 1 else ""

    def _config_path(self, path: Path) -> str:
        """``path`` (relative: to the current directory) as the config must say it to mean the same file."""
        # normpath, not resolve(): a symlinked file stays named as the admin named it.
        absolute = Path(os.path.normpath(path.expanduser().absolute()))
        try:
            return absolute.relative_to(self._site.home).as_posix()
        except ValueError:
            return str(absolute)

    def import_(self, data: bytes, *, secret: bool = False) -> builtins.list[KeyInfo]:
        """Import keys (armored or binary); returns the keys imported or updated, not yet certified.

        Key data holding a secret key raises :class:`~dicommail.errors.InputError`
        and imports nothing unless ``secret`` is set (to restore this site's own
        key from a backup).  Data without any key raises
        :class:`~dicommail.errors.CryptoError`.
        """
        with self._site._keyring() as keyring:
            return _keys.import_keys(keyring, data, allow_secret=secret)

    def export(self, key_id: str, *, secret: bool = False) -> str:
        """A key, ASCII-armored: its public part, or with ``secret`` the secret key (a backup; keep it safe).

        Local certifications are never included.  Exporting the secret key may
        need the passphrase (from ``identity.passphrase_file``).
        """
        # Read before the keyring opens, so that a bad passphrase file fails first.
        passphrase = self._site.config.passphrase() if secret else None
        with self._site._keyring() as keyring:
            return _keys.export_key(keyring, key_id, secret=secret, passphrase=passphrase)

    def export_file(self, key_id: str, path: Path, *, secret: bool = False) -> None:
        """:meth:`export` into ``path``, atomically and readable by this user only (mode 0600).

        Raises :class:`OSError` if ``path`` cannot be written.
        """
        text = self.export(key_id, secret=secret)
        # A secret key must never be readable by others, not even half-written.
        with atomic_writer(path, durable=False) as handle:
            handle.write(text.encode("ascii"))

    def certify(self, key_id: str) -> KeyChange:
        """Trust a peer's key by certifying it locally with this site's key.

        Check its fingerprint with the key's owner first.  For this site's own
        key (e.g. restored from a backup) this marks it as our own instead.
        A revoked or expired key raises :class:`~dicommail.errors.CryptoError`.
        """
        config = self._site.config
        with self._site._keyring() as keyring:
            return _keys.certify(keyring, key_id, passphrase=config.passphrase(), signer=config.identity.key)

    def revoke(self, key_id: str) -> KeyChange:
        """Revoke this site's own key for good, or withdraw this site's certification of a peer's key.

        After revoking the own key, export it and send it to every peer so that
        they refuse it too.  A peer's key stays in the keyring, untrusted.
        """
        config = self._site.config
        with self._site._keyring() as keyring:
            return _keys.revoke(keyring, key_id, passphrase=config.passphrase(), own=config.identity.key)

    def delete(self, key_id: str, *, secret: bool = False) -> KeyInfo:
        """Delete a key from the keyring; returns it as it was.

        A key whose secret part the keyring holds (this site's own) is deleted
        only with ``secret``, else :class:`~dicommail.errors.CryptoError`:
        mail encrypted to it can never be read again.
        """
        with self._site._keyring() as keyring:
            return _keys.delete(keyring, key_id, secret=secret)

    def extend(self, key_id: str | None = None, expires: str = "2y") -> KeyChange:
        """Move the expiry of this site's own key (default) and its subkeys to ``expires`` from now.

        ``expires`` is e.g. ``2y``, ``18m``, ``365d``, ``2028-12-31`` or
        ``never``.  An expired key can be extended too.  Peers see the new date
        only once they import the exported public key again (the message says
        so).  A peer's key, or another secret key that is not this site's,
        raises :class:`~dicommail.errors.CryptoError`; a revoked key too.
        """
        config = self._site.config
        with self._site._keyring() as keyring:
            return _keys.extend(keyring, key_id or "", expires, passphrase=config.passphrase(), own=config.identity.key)
