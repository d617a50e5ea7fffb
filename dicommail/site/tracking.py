"""What happened to sent and received studies: the jobs of ``dicommail status|transfers|check|echo``."""

from __future__ import annotations

from datetime import datetime

from dicommail.site.base import SiteBase


class Tracking(SiteBase):
    """Methods of :class:`dicommail.Site` that report and manage transfers, and check the site."""

    def transfers(self, *, state: str | None = None, since: datetime | None = None) -> list[object]:
        """Sent transfers, newest first; ``state``: "active", "waiting", "done" or "failed"."""
        raise NotImplementedError
