"""The entry point for a dicommail home: ``site = dicommail.Site.open(home)``.

A :class:`Site` is the same home, config and keyring the ``dicommail``
command uses; its methods are the jobs the CLI offers.  It never prints,
never exits and never reads ``sys.argv``: results are typed values, failures
are the exceptions of :mod:`dicommail.errors`, and long jobs report progress
through a callback.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

from dicommail.config import CONFIG_NAME, Config, default_home, load_config, parse_config, render_template
from dicommail.errors import ConfigError
from dicommail.site.base import ProgressCallback, ProgressUpdate
from dicommail.site.constancy import Constancy
from dicommail.site.keys import Keys
from dicommail.site.operations import Operations
from dicommail.site.sending import Sending
from dicommail.site.services import Services
from dicommail.site.tracking import Tracking
from dicommail.store.files import make_home_private, make_private

__all__ = ["ProgressCallback", "ProgressUpdate", "Site"]


class Site(Sending, Tracking, Services, Constancy, Operations):
    """One dicommail home: pack, send, unpack, track, check, manage keys, run the services, run constancy checks."""

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        self._keys = Keys(self)

    @classmethod
    def open(cls, home: Path | str | None = None) -> Site:
        """Open an existing home (default ``$DICOMMAIL_HOME`` or ``~/.dicommail``) and validate its config.

        Also makes the home private (0700/0600) if it was created with looser modes.
        Raises :class:`~dicommail.errors.ConfigError` if ``dicommail.toml`` is missing or invalid.
        """
        path = _home_path(home)
        config_file = path / CONFIG_NAME
        if not config_file.is_file():
            # As git refuses outside a repository: a typo in a cron job's --home
            # must fail loudly, not show an empty site forever.
            where = "does not exist" if not path.exists() else f"has no {CONFIG_NAME}"
            raise ConfigError(
                f"{path} is not a dicommail home: it {where}",
                f"check --home / DICOMMAIL_HOME, or create one with: dicommail --home {path} init",
            )
        config = load_config(path)
        make_home_private(config)
        return cls(config)

    @classmethod
    def init(cls, home: Path | str | None = None, address: str = "", *, force: bool = False) -> Site:
        """Create a home with a commented ``dicommail.toml`` of every default; ``force`` overwrites one.

        Raises :class:`~dicommail.errors.ConfigError` if the home has a config already (without ``force``).
        """
        path = _home_path(home)
        config_file = path / CONFIG_NAME
        if config_file.exists() and not force:
            raise ConfigError(f"{config_file} already exists", "edit it, or use --force to overwrite it with defaults")
        text = render_template(address)
        # Validated before anything is written: a bad address leaves no file (and no home) behind.
        parse_config(tomllib.loads(text), path, source=str(config_file))
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        make_private(path)  # it may have existed already, e.g. made 0755 by hand
        tmp = config_file.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.chmod(0o600)
        tmp.replace(config_file)
        return cls.open(path)

    @property
    def keys(self) -> Keys:
        """This site's keyring: generate, import, export, certify, revoke, extend."""
        return self._keys

    def __repr__(self) -> str:
        return f"Site({str(self.home)!r})"


def _home_path(home: Path | str | None) -> Path:
    return Path(home if home is not None else default_home()).expanduser().absolute()
