"""Key management: the jobs of ``dicommail keys ...``."""

from __future__ import annotations

from dicommail.site.base import SiteBase


class Keys:
    """``site.keys``: this site's keyring (its own key and its peers' certified keys)."""

    def __init__(self, site: SiteBase) -> None:
        self._site = site
