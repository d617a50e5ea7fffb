"""The long-running services: the receiver (``dicommail receive``) and the gateway (``dicommail gateway``)."""

from __future__ import annotations

import asyncio

from dicommail.site.base import SiteBase


class Services(SiteBase):
    """Methods of :class:`dicommail.Site` that run the receiver and the gateway as coroutines."""

    async def receive(self, *, once: bool = False, stop: asyncio.Event | None = None) -> object:
        """Fetch, verify and forward; one cycle (``once``) or until ``stop`` is set."""
        raise NotImplementedError

    async def gateway(self, *, stop: asyncio.Event | None = None) -> None:
        """Serve C-STORE/C-ECHO and send complete studies until ``stop`` is set."""
        raise NotImplementedError
