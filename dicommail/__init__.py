"""dicommail: DICOM studies over e-mail, per the DRG/@GIT DICOM-E-Mail recommendation.

The public API is what this module exports (``__all__``; see docs/library.md):
:class:`Site`, the entry point for a dicommail home, the result types its
methods return, and the exceptions of :mod:`dicommail.errors`.  Everything
else is internal and may change.

    import dicommail

    site = dicommail.Site.open("/var/lib/dicommail")
    for result in site.send(["/data/export/CT123"], "reading@practice.example"):
        print(result.set_id, result.status)
"""

__version__ = "0.1.0"

# After __version__: modules imported below read it while this one initialises.
from dicommail.checks import CheckResult
from dicommail.config import Config
from dicommail.constancy.store import ConstancyCheck, ConstancyReport
from dicommail.crypto.keys import KeyChange, KeyInfo
from dicommail.errors import (
    AmbiguousKeyError,
    AuthenticationError,
    ConfigError,
    CryptoError,
    DecryptionError,
    DestinationError,
    DicommailError,
    GatewayLockedError,
    IncompleteSetError,
    InputError,
    IntegrityError,
    InvalidArgumentError,
    KeyNotFoundError,
    LockedError,
    MisaddressedError,
    NotDicomError,
    PassphraseError,
    ReceiverLockedError,
    RecipientKeyError,
    SignatureError,
    StateError,
    TransportError,
    UnexpectedError,
    WireFormatError,
)
from dicommail.receiver.daemon import CycleReport
from dicommail.sender.outbox import OutboundMail, TransferResult
from dicommail.sender.tracking import TimelineEntry, TransferView
from dicommail.site import ProgressCallback, ProgressUpdate, Site
from dicommail.site.keys import Keys
from dicommail.site.operations import CleanupCount, CleanupReport, StatsFigures, StatsGroup, StatsReport
from dicommail.site.sending import SkipCallback
from dicommail.site.tracking import (
    EchoResult,
    QuarantineChange,
    QuarantinedItem,
    ReceivedEvent,
    ReceivedSet,
    ReceivedSetDetail,
    SentNotification,
    TransferChange,
    TransferDetail,
)
from dicommail.wire.pack import PackedMail, PackedSet
from dicommail.wire.unpack import SetOutcome, UnpackReport

__all__ = [
    "AmbiguousKeyError",
    "AuthenticationError",
    "CheckResult",
    "CleanupCount",
    "CleanupReport",
    "Config",
    "ConfigError",
    "ConstancyCheck",
    "ConstancyReport",
    "CryptoError",
    "CycleReport",
    "DecryptionError",
    "DestinationError",
    "DicommailError",
    "EchoResult",
    "GatewayLockedError",
    "IncompleteSetError",
    "InputError",
    "IntegrityError",
    "InvalidArgumentError",
    "KeyChange",
    "KeyInfo",
    "KeyNotFoundError",
    "Keys",
    "LockedError",
    "MisaddressedError",
    "NotDicomError",
    "OutboundMail",
    "PackedMail",
    "PackedSet",
    "PassphraseError",
    "ProgressCallback",
    "ProgressUpdate",
    "QuarantineChange",
    "QuarantinedItem",
    "ReceivedEvent",
    "ReceivedSet",
    "ReceivedSetDetail",
    "ReceiverLockedError",
    "RecipientKeyError",
    "SentNotification",
    "SetOutcome",
    "SignatureError",
    "Site",
    "SkipCallback",
    "StateError",
    "StatsFigures",
    "StatsGroup",
    "StatsReport",
    "TimelineEntry",
    "TransferChange",
    "TransferDetail",
    "TransferResult",
    "TransferView",
    "TransportError",
    "UnexpectedError",
    "UnpackReport",
    "WireFormatError",
    "__version__",
]
