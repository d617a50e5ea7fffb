"""Key management: the jobs of ``dicommail keys ...``.

Trust is dicommail's simple rule: this site's own key is ultimately trusted,
and a peer's key is trusted once this site has certified it locally after
checking its fingerprint with the peer (e.g. by phone).  Keys are named by
full fingerprint, long key id (16 hex digits) or mail address.
"""

from __future__ import annotations

import builtins
from pathlib import Path

from dicommail.crypto import keys as _keys
from dicommail.crypto.keys import Algorithm, KeyChange, KeyInfo, format_fingerprint
from dicommail.site.base import SiteBase
from dicommail.store.files import atomic_writer

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
        key is this site's own (ultimately trusted) at once; set
        ``identity.key`` to its fingerprint and send the public key to the peers.
        Raises :class:`~dicommail.errors.InputError` for an unusable name,
        address, algorithm or expiry.
        """
        with self._site._keyring() as keyring:
            return _keys.generate(keyring, name, email, algo=algo, expires=expires, passphrase=passphrase)

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
