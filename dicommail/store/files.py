"""Files that are either fully written or not there at all, and private to this user.

Everything dicommail keeps may hold patient data or keys, so what it
creates is readable by its own user only, whatever the umask: temporary
files come from :mod:`tempfile` (0600 files, 0700 directories) and
:func:`open_private` and :func:`write_durable` create 0600 files.
(:func:`write_durable` is the exception to "fully written or not there":
its callers record a file only once it is complete.)
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

if TYPE_CHECKING:
    from dicommail.config import Config

log = logging.getLogger("dicommail.store")
log.addHandler(logging.NullHandler())

#: The umask the CLI runs with: nothing it creates is readable by others.
PRIVATE_UMASK = 0o077


def make_private(path: Path) -> bool:
    """Take group and other permissions away from ``path`` if it is ours; return whether it changed.

    A missing path, a symbolic link (it may point anywhere) or a path owned
    by someone else is left alone: only our own files are ours to fix.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode) or info.st_uid != os.geteuid():
        return False
    mode = stat.S_IMODE(info.st_mode)
    if not mode & 0o077:
        return False
    path.chmod(mode & ~0o077)
    return True


def make_private_all(paths: Iterable[Path]) -> list[Path]:
    """:func:`make_private` for each path; returns those that were changed."""
    return [path for path in paths if make_private(path)]


#: The spool's folders (``receiver.spool.Spool``, the outbox, the notifications, the gateway's studies).
SPOOL_FOLDERS = ("inbox", "parts", "quarantine", "work", "outbox", "notifications", "gateway")


def make_home_private(config: Config) -> list[Path]:
    """Make the home and what it holds (keys, state, spool) private, e.g. a home made with a 0755 umask.

    Folders are enough to fix for what lies deeper: a 0700 folder keeps
    everything below it from other users.
    """
    state = config.state_db
    paths = [
        config.home,
        config.config_file,
        config.gnupg_home,
        state,
        state.with_name(state.name + "-wal"),
        state.with_name(state.name + "-shm"),
        config.spool,
        *(config.spool / name for name in SPOOL_FOLDERS),
    ]
    changed = make_private_all(paths)
    if changed:
        log.info("made private (readable by this user only): %s", ", ".join(str(p) for p in changed))
    return changed


def open_private(path: Path) -> BinaryIO:
    """Open ``path`` for writing (truncated) as a 0600 file, whatever the umask and its old mode."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) & 0o077:
            os.fchmod(fd, 0o600)  # it existed before, with a looser mode
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: Path, durable: bool = True) -> Iterator[BinaryIO]:
    """Write ``path`` through a temporary sibling renamed into place on success.

    A path that exists and is not a regular file (``/dev/null``, a FIFO) is
    written directly: renaming onto it would replace the device itself.
    """
    if path.exists() and not path.is_file():
        with path.open("wb") as direct:
            yield direct
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file 0600 whatever the umask, and the rename keeps that mode.
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            if durable:
                os.fsync(handle.fileno())
        tmp.replace(path)
        if durable:
            fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def make_durable_dir(path: Path) -> None:
    """Create the folder ``path`` (0700) and its missing parents, each new name fsynced in its parent.

    Several threads may create the same folder at once: one of them makes it,
    and each returns only once its name is durable.
    """
    missing: list[Path] = []
    probe = path
    while not probe.is_dir() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    for folder in reversed(missing):
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        fsync_dir(folder.parent)


_NEW_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


def write_durable(path: Path, data: bytes) -> None:
    """Create ``path`` (0600; it must not exist) with ``data`` and fsync the file, not its folder.

    One fsync instead of atomic_writer's file fsync, rename and folder fsync:
    for files that a journal (a committed row) names only after this returned,
    so that a partial file left by a crash is known as one.  On failure the
    partial file is removed.  On Linux's ext4 (with a journal or without:
    then it syncs the new file's folder itself), XFS and btrfs the fsync of a
    new file also makes its name durable; a missing folder is created with
    :func:`make_durable_dir`.
    """
    try:
        fd = os.open(path, _NEW_FILE, 0o600)
    except FileNotFoundError:
        make_durable_dir(path.parent)
        fd = os.open(path, _NEW_FILE, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)


def fsync_file(path: Path) -> None:
    with path.open("rb") as handle:
        os.fsync(handle.fileno())


@contextlib.contextmanager
def scratch_dir(parent: Path, prefix: str) -> Iterator[Path]:
    """A private (0700) working directory under ``parent``, removed afterwards whatever happens."""
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))  # 0700 whatever the umask
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def pid_lock(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (with our PID in it); yields ``False`` if someone else holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "r+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield True
