"""What every part of :class:`dicommail.Site` stands on: the home, its config, state and keyring."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from dicommail.config import Config
from dicommail.crypto.gpg import Keyring
from dicommail.store.db import Database

__all__ = ["Counter", "ProgressCallback", "ProgressUpdate", "SiteBase"]


@dataclass(frozen=True)
class ProgressUpdate:
    """How far a long job has come: ``completed`` of ``total`` units (bytes unless ``unit`` says otherwise).

    ``task`` names the job ("packing", "sending", "unpacking", "forwarding");
    ``completed`` counts from the start of that task, so a callback can
    redraw a bar without keeping state of its own.
    """

    task: str
    completed: int
    total: int
    unit: str = "bytes"


#: A callable that receives :class:`ProgressUpdate` values; it must be quick and must not raise.
ProgressCallback = Callable[[ProgressUpdate], None]


class Counter:
    """Turns increments (what the internals report) into :class:`ProgressUpdate` values."""

    def __init__(self, callback: ProgressCallback | None, task: str, total: int, unit: str = "bytes") -> None:
        self.callback = callback
        self.task = task
        self.total = total
        self.unit = unit
        self.completed = 0
        self._emit()

    def advance(self, amount: int) -> None:
        self.completed += amount
        self._emit()

    def _emit(self) -> None:
        if self.callback is not None:
            self.callback(ProgressUpdate(self.task, self.completed, self.total, self.unit))


class SiteBase:
    """One dicommail home: the config it was opened with, and short-lived access to its state and keys.

    The state database and the keyring are opened per call and closed again,
    so a :class:`Site` can live as long as the program that holds it, and
    several programs (a cron job, the daemon) can share one home.
    """

    def __init__(self, config: Config) -> None:
        self._config = config

    @property
    def config(self) -> Config:
        """The validated ``dicommail.toml`` of this home (read once, when the site was opened)."""
        return self._config

    @property
    def home(self) -> Path:
        """The home directory: ``dicommail.toml``, the keyring, ``state.db`` and the spool."""
        return self._config.home

    @contextlib.contextmanager
    def _database(self) -> Iterator[Database]:
        db = Database(self._config.state_db)
        try:
            yield db
        finally:
            db.close()

    @contextlib.contextmanager
    def _keyring(self) -> Iterator[Keyring]:
        keyring = Keyring(self._config.gnupg_home)
        try:
            yield keyring
        finally:
            keyring.close()
