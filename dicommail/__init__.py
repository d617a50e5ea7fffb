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

import importlib
from typing import TYPE_CHECKING

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

if TYPE_CHECKING:
    from dicommail.checks import CheckResult
    from dicommail.config import Config
    from dicommail.constancy.store import ConstancyCheck, ConstancyReport
    from dicommail.crypto.keys import KeyChange, KeyInfo
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

__version__ = "0.1.0"

# The other public names are imported on first use (PEP 562), so that a command
# loads only what it needs: pydicom, pynetdicom and the mail clients load slowly.
_LAZY: dict[str, str] = {
    "CheckResult": "dicommail.checks",
    "CleanupCount": "dicommail.site.operations",
    "CleanupReport": "dicommail.site.operations",
    "Config": "dicommail.config",
    "ConstancyCheck": "dicommail.constancy.store",
    "ConstancyReport": "dicommail.constancy.store",
    "CycleReport": "dicommail.receiver.daemon",
    "EchoResult": "dicommail.site.tracking",
    "KeyChange": "dicommail.crypto.keys",
    "KeyInfo": "dicommail.crypto.keys",
    "Keys": "dicommail.site.keys",
    "OutboundMail": "dicommail.sender.outbox",
    "PackedMail": "dicommail.wire.pack",
    "PackedSet": "dicommail.wire.pack",
    "ProgressCallback": "dicommail.site",
    "ProgressUpdate": "dicommail.site",
    "QuarantineChange": "dicommail.site.tracking",
    "QuarantinedItem": "dicommail.site.tracking",
    "ReceivedEvent": "dicommail.site.tracking",
    "ReceivedSet": "dicommail.site.tracking",
    "ReceivedSetDetail": "dicommail.site.tracking",
    "SentNotification": "dicommail.site.tracking",
    "SetOutcome": "dicommail.wire.unpack",
    "Site": "dicommail.site",
    "SkipCallback": "dicommail.site.sending",
    "StatsFigures": "dicommail.site.operations",
    "StatsGroup": "dicommail.site.operations",
    "StatsReport": "dicommail.site.operations",
    "TimelineEntry": "dicommail.sender.tracking",
    "TransferChange": "dicommail.site.tracking",
    "TransferDetail": "dicommail.site.tracking",
    "TransferResult": "dicommail.sender.outbox",
    "TransferView": "dicommail.sender.tracking",
    "UnpackReport": "dicommail.wire.unpack",
}

if not TYPE_CHECKING:  # mypy sees the imports above; a typo must stay an error for it

    def __getattr__(name: str) -> object:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later look-ups do not come here again
        return value

    def __dir__() -> list[str]:
        return sorted({*globals(), *_LAZY})


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
