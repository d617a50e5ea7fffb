"""This site's own mail addresses, which the receiver and ``dicommail unpack`` both check sets against.

A module of its own so that unpack gets them without importing the
receiver (pynetdicom, asyncio, the mail clients).
"""

from __future__ import annotations

import email.utils

from dicommail.config import Config
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.errors import DicommailError

__all__ = ["own_addresses"]


def own_addresses(config: Config, keyring: Keyring) -> set[str]:
    """This site's mail addresses: a set signed for none of them was meant for someone else."""
    addresses = {config.identity.address.lower()} if config.identity.address else set()
    if "@" in config.mailbox.username:
        addresses.add(config.mailbox.username.lower())
    try:
        key = own_key(keyring, config.identity.key)
    except DicommailError:
        return addresses
    for user_id in key.user_ids:
        address = email.utils.parseaddr(user_id)[1].lower()
        if "@" in address:
            addresses.add(address)
    return addresses
