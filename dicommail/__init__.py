"""dicommail: DICOM studies over e-mail, per the DRG/@GIT DICOM-E-Mail recommendation.

The public API is what this module exports (``__all__``, see docs/library.md):
:class:`Site`, the entry point for a dicommail home, the result types its
methods return, and the exceptions of :mod:`dicommail.errors`.  Everything
else is internal and may change.
"""

__version__ = "0.1.0"

# After __version__: modules imported below read it while this one initialises.
from dicommail.errors import (
    AmbiguousKeyError,
    AuthenticationError,
    ConfigError,
    CryptoError,
    DecryptionError,
    DestinationError,
    DicommailError,
    IncompleteSetError,
    InputError,
    IntegrityError,
    KeyNotFoundError,
    MisaddressedError,
    NotDicomError,
    PassphraseError,
    RecipientKeyError,
    SignatureError,
    TransportError,
    UnexpectedError,
    WireFormatError,
)
from dicommail.site import ProgressCallback, ProgressUpdate, Site

__all__ = [
    "AmbiguousKeyError",
    "AuthenticationError",
    "ConfigError",
    "CryptoError",
    "DecryptionError",
    "DestinationError",
    "DicommailError",
    "IncompleteSetError",
    "InputError",
    "IntegrityError",
    "KeyNotFoundError",
    "MisaddressedError",
    "NotDicomError",
    "PassphraseError",
    "ProgressCallback",
    "ProgressUpdate",
    "RecipientKeyError",
    "SignatureError",
    "Site",
    "TransportError",
    "UnexpectedError",
    "WireFormatError",
    "__version__",
]
