"""Packing options from the configuration: what ``send`` and the gateway share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from dicommail.config import Config, is_mail_address
from dicommail.constancy.values import ConstancyMark
from dicommail.crypto.keys import KeyInfo
from dicommail.errors import ConfigError
from dicommail.wire.pack import PackOptions


def sender_address(config: Config, me: KeyInfo, override: str = "") -> str:
    """The From address: ``override``, else identity.address, else our key's address."""
    sender = override or config.identity.address or me.email
    if not is_mail_address(sender):
        raise ConfigError("no sender address", "set identity.address in dicommail.toml or pass --from")
    return sender


def pack_options(
    config: Config,
    me: KeyInfo,
    sender: str,
    recipient: str,
    *,
    note: str = "",
    attachments: Sequence[Path] = (),
    emergency: bool = False,
    max_mail_size: int | None = None,
    constancy: ConstancyMark | None = None,
) -> PackOptions:
    """Options to pack for ``recipient`` as this site (key, passphrase, sizes, workers from the config).

    ``constancy`` marks the set as a constancy check's test transfer.
    """
    return PackOptions(
        sender=sender,
        recipient=recipient,
        signer=me.fingerprint,
        max_mail_size=max_mail_size or config.max_mail_size_for(recipient),
        passphrase=config.passphrase(),
        compression_level=config.packing.compression_level,
        uid_root=config.packing.uid_root,
        note=note,
        attachments=tuple(attachments),
        emergency=emergency,
        workers=config.packing.workers,
        constancy=constancy,
    )
