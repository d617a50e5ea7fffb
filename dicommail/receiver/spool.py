"""The spool: raw mails, decoded set parts and quarantined mails, written atomically."""

from __future__ import annotations

import contextlib
import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from dicommail.errors import DicommailError
from dicommail.store.files import atomic_writer, fsync_dir, make_private


class Spool:
    """Directories under ``<home>/spool``.

    * ``inbox/``: raw mails as fetched (and fragments joined), one file each;
    * ``parts/<set key>/<part>/``: the decoded files of a verified-signature part
      (the key is a hash of signer and set ID, see :func:`dicommail.receiver.pipeline.set_key`);
    * ``quarantine/<when>-<name>/``: what could not be processed, as it arrived
      (encrypted), with ``reason.json``; removed after ``receiver.quarantine_days``;
    * ``work/``: scratch space on the same file system, so moves are renames;
      emptied at every receiver start (it may hold decrypted data of a crash).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.inbox = root / "inbox"
        self.parts = root / "parts"
        self.quarantine_dir = root / "quarantine"
        self.work = root / "work"
        for directory in (root, self.inbox, self.parts, self.quarantine_dir, self.work):
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            make_private(directory)  # it holds mail and, in parts/, decrypted studies

    def store_raw(self, data: bytes, stem: str = "") -> Path:
        """Write a fetched mail durably (fsync'd file and directory) and return its path."""
        path = self.inbox / f"{stem or uuid.uuid4().hex}.eml"
        with atomic_writer(path) as handle:
            handle.write(data)
        return path

    @contextlib.contextmanager
    def raw_writer(self, stem: str = "") -> Iterator[tuple[Path, BinaryIO]]:
        """Write a fetched mail piece by piece: yields (final path, open file).

        The file appears under its name, fsync'd, only when the block ends
        without an exception; until then it is a ``.tmp`` sibling, removed on
        failure.  Lets a retriever store a mail of any size in bounded memory.
        """
        path = self.inbox / f"{stem or uuid.uuid4().hex}.eml"
        with atomic_writer(path) as handle:
            yield path, handle

    def set_dir(self, key: str) -> Path:
        """The directory of one set's decoded parts; never outside ``parts/``."""
        path = self.parts / key
        if path.parent != self.parts or key in ("", ".", ".."):
            raise ValueError(f"not a usable set key for a spool path: {key!r}")
        return path

    def part_dir(self, key: str, set_part: int) -> Path:
        return self.set_dir(key) / f"{set_part:05d}"

    def sweep_orphans(self) -> int:
        """Remove what a crash left: work directories (decrypted plaintext) and unfinished temporary files.

        Only for a process that holds the receiver lock, at its start: nothing
        else may be writing here then.  Returns how many items were removed.
        """
        removed = 0
        for entry in list(self.work.iterdir()):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed += 1
        for directory in (self.inbox, self.quarantine_dir, self.root / "notifications"):
            if not directory.is_dir():
                continue
            for entry in list(directory.iterdir()):
                # atomic_writer's temporaries: ".<name>.<random>.tmp"; joined fragments of an old version.
                if entry.is_file() and (
                    (entry.name.startswith(".") and entry.name.endswith(".tmp")) or entry.name.startswith("joined-")
                ):
                    entry.unlink(missing_ok=True)
                    removed += 1
        for temporary in self.parts.glob("**/.*.tmp"):
            temporary.unlink(missing_ok=True)
            removed += 1
        # A notification being signed and encrypted when the crash came (its report, gpg's output).
        notifying = self.root / "notifications" / "work"
        if notifying.is_dir():
            for entry in list(notifying.iterdir()):
                if entry.is_file() or entry.is_symlink():
                    entry.unlink(missing_ok=True)
                    removed += 1
        return removed

    def quarantine_files(
        self, sources: list[Path], error: DicommailError, label: str, details: dict[str, object]
    ) -> Path:
        """Keep copies of mails as they arrived (still encrypted) with the reason; return the folder."""
        target = self._new_quarantine_dir(label)
        for source in sources:
            if source.is_file():
                shutil.copy2(source, target / source.name)
        self._write_reason(target, error, details)
        return target

    def expire_quarantine(self, before: float) -> int:
        """Remove quarantined items made before ``before`` (a Unix time); return how many."""
        removed = 0
        for entry in list(self.quarantine_dir.iterdir()):
            if not entry.is_dir() or entry.is_symlink():
                continue
            reason = entry / "reason.json"
            try:
                made = reason.stat().st_mtime if reason.exists() else entry.stat().st_mtime
            except OSError:
                continue
            if made < before:
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
        if removed:
            fsync_dir(self.quarantine_dir)
        return removed

    def _new_quarantine_dir(self, label: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.quarantine_dir / f"{stamp}-{label}"
        suffix = 1
        while target.exists():
            suffix += 1
            target = self.quarantine_dir / f"{stamp}-{label}-{suffix}"
        target.mkdir(parents=True, mode=0o700)
        return target

    def _write_reason(self, target: Path, error: DicommailError, details: dict[str, object]) -> None:
        reason = {"code": error.code, "message": error.message, "hint": error.hint,
                  "quarantined_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **details}
        with atomic_writer(target / "reason.json") as handle:
            handle.write(json.dumps(reason, indent=1, default=str).encode())
        fsync_dir(self.quarantine_dir)
