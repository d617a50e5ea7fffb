"""The one exception hierarchy of dicommail.

Every error a user can cause or meet derives from :class:`DicommailError` and
carries a ``hint``: what to do about it.  The CLI shows message and hint and
exits non-zero; daemons log them and carry on.  Messages never contain
patient data (no names, no IDs from the DICOM header other than UIDs).
"""

from __future__ import annotations


class DicommailError(Exception):
    """Base class: something went wrong that a user can understand and act on."""

    #: A short machine-readable reason code (used in --json output and, later,
    #: in error notifications sent back over mail).
    code = "error"
    #: Transfers that were queued before the error and stay in the outbox (set by ``Site.send``).
    queued_transfers: tuple[int, ...] = ()

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message


class ConfigError(DicommailError):
    """The configuration file is missing, malformed or has invalid values."""

    code = "config"


class LockedError(DicommailError):
    """Another dicommail process already runs this job for the same home (one receiver, one gateway per home)."""

    code = "locked"


class ReceiverLockedError(LockedError):
    """A receiver is already running for this home: two would fetch and forward the same mails."""


class GatewayLockedError(LockedError):
    """A gateway is already running for this home: two would pack and send the same studies."""


class InputError(DicommailError):
    """A file or argument handed to dicommail cannot be used."""

    code = "input"


class InvalidArgumentError(InputError):
    """An argument of a :class:`~dicommail.Site` method has an unusable value; ``argument`` names it.

    Its message is the one the CLI shows for the matching option; ``code`` is
    still "input", so catching :class:`~dicommail.errors.InputError` is enough.
    """

    def __init__(self, message: str, hint: str = "", *, argument: str) -> None:
        super().__init__(message, hint)
        self.argument = argument


class NotDicomError(InputError):
    """A file is not a readable DICOM Part 10 file."""

    code = "not-dicom"


# --- crypto -----------------------------------------------------------------


class CryptoError(DicommailError):
    """GnuPG failed or refused."""

    code = "crypto"


class KeyNotFoundError(CryptoError):
    code = "key-not-found"


class AmbiguousKeyError(CryptoError):
    code = "key-ambiguous"


class RecipientKeyError(CryptoError):
    """We cannot encrypt to a recipient (no key, not certified, expired, revoked)."""

    code = "recipient-key"


class PassphraseError(CryptoError):
    code = "passphrase"


class DecryptionError(CryptoError):
    """A mail could not be decrypted (not for us, tampered, truncated)."""

    code = "decryption-failed"


class SignatureError(CryptoError):
    """A mail decrypted, but its signature is missing, bad or untrusted."""

    code = "signer-untrusted"

    def __init__(self, message: str, hint: str = "", fingerprint: str | None = None) -> None:
        super().__init__(message, hint)
        self.fingerprint = fingerprint


class MisaddressedError(SignatureError):
    """A verified set whose signed inner ``To`` names another site: someone re-encrypted it to us."""

    code = "misaddressed"


# --- wire format ------------------------------------------------------------


class WireFormatError(DicommailError):
    """A mail does not follow the DICOM-Mail wire format."""

    code = "malformed"


class IncompleteSetError(WireFormatError):
    """Parts or fragments of a set are missing."""

    code = "incomplete"

    def __init__(self, message: str, hint: str = "", missing_parts: list[int] | None = None) -> None:
        super().__init__(message, hint)
        self.missing_parts = missing_parts or []


class IntegrityError(WireFormatError):
    """A file does not match the manifest (size, SHA-256, UID)."""

    code = "integrity"


# --- transport (SMTP, IMAP, POP3) ----------------------------------------------


class TransportError(DicommailError):
    """A mail server could not be reached or refused.

    ``temporary`` says whether trying again later can help (server down,
    4xx reply) or not (5xx reply such as 552 message too large).
    """

    code = "transport"

    def __init__(self, message: str, hint: str = "", temporary: bool = True) -> None:
        super().__init__(message, hint)
        self.temporary = temporary


class AuthenticationError(TransportError):
    """The server refused our credentials: no point retrying until the config changes."""

    code = "authentication"

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message, hint, temporary=False)


# --- forwarding to the local PACS ----------------------------------------------


class DestinationError(DicommailError):
    """The PACS (or destination folder) did not take the study."""

    code = "destination"

    def __init__(self, message: str, hint: str = "", temporary: bool = True) -> None:
        super().__init__(message, hint)
        self.temporary = temporary


class StateError(DicommailError):
    """The state database (``state.db``) cannot be used, or holds no such item (e.g. an unknown transfer)."""

    code = "state"


class UnexpectedError(DicommailError):
    """An item failed in a way dicommail did not foresee (a bug, or input nobody thought of).

    ``detail`` holds the original exception's text for the private quarantine
    record; it may quote content from the mail, so it is never logged or sent.
    """

    code = "error"
    detail: str = ""


#: Failures that are this site's own setup, not the item at hand: its key missing or ambiguous, a
#: wrong passphrase, a config that no longer fits.  The same for every item until the admin fixes
#: it, so nothing is given up for them: the work waits and is tried again.
SETUP_ERRORS: tuple[type[DicommailError], ...] = (ConfigError, KeyNotFoundError, AmbiguousKeyError, PassphraseError)
