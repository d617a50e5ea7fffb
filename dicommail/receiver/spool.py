"""The spool: raw mails, decoded set parts and quarantined mails, written atomically."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from dicommail.errors import DicommailError
from dicommail.store.files import atomic_writer, fsync_dir


class Spool:
    """Directories under ``<home>/spool``.

    * ``inbox/``: raw mails as fetched (and fragments joined), one file each;
    * ``parts/<set id>/<part>/``: the decoded files of a verified-signature part;
    * ``quarantine/<when>-<name>/``: what could not be processed, with ``reason.json``;
    * ``work/``: scratch space on the same file system, so moves are renames.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.parts = root / "parts"
        self.quarantine_dir = root / "quarantine"
        self.work = root / "work"
        for directory in (self.inbox, self.parts, self.quarantine_dir, self.work):
            directory.mkdir(parents=True, exist_ok=True)

    def store_raw(self, data: bytes, stem: str = "") -> Path:
        """Write a fetched mail durably (fsync'd file and directory) and return its path."""
        path = self.inbox / f"{stem or uuid.uuid4().hex}.eml"
        with atomic_writer(path) as handle:
            handle.write(data)
        return path

    def set_dir(self, set_id: str) -> Path:
        """The directory of one set's decoded parts; never outside ``parts/``."""
        path = self.parts / set_id
        if path.parent != self.parts or set_id in ("", ".", ".."):
            raise ValueError(f"not a usable set ID for a spool path: {set_id!r}")
        return path

    def part_dir(self, set_id: str, set_part: int) -> Path:
        return self.set_dir(set_id) / f"{set_part:05d}"

    def quarantine(self, source: Path | None, error: DicommailError, label: str, details: dict[str, object]) -> Path:
        """Keep a copy of ``source`` with the reason, so that nothing is lost; return the folder."""
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.quarantine_dir / f"{stamp}-{label}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.quarantine_dir / f"{stamp}-{label}-{suffix}"
        target.mkdir(parents=True)
        if source is not None and source.exists():
            if source.is_dir():
                shutil.copytree(source, target / source.name)
            else:
                shutil.copy2(source, target / source.name)
        reason = {"code": error.code, "message": error.message, "hint": error.hint, **details}
        with atomic_writer(target / "reason.json") as handle:
            handle.write(json.dumps(reason, indent=1, default=str).encode())
        fsync_dir(self.quarantine_dir)
        return target
