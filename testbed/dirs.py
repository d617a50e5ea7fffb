"""Base directories that the test bed owns (and removes) itself."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path


def claim_base_dir(base_dir: Path | None, prefix: str) -> tuple[Path, bool]:
    """Return (absolute directory, created_by_us); make a temp dir if None.

    A given directory must be missing or empty, as close() empties it.
    """
    if base_dir is None:
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    base_dir = base_dir.absolute()
    if base_dir.exists() and any(base_dir.iterdir()):
        raise ValueError(f"{base_dir} is not empty; the test bed deletes its contents on close")
    created = not base_dir.exists()
    base_dir.mkdir(parents=True, exist_ok=True)
    return base_dir, created


def release_base_dir(base_dir: Path, created: bool) -> None:
    """Remove *base_dir* if we created it, else just its contents."""
    if created:
        shutil.rmtree(base_dir, ignore_errors=True)
        return
    for child in base_dir.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def check_reachable(path: Path) -> None:
    """Fail clearly if daemons running as other users could not reach *path*."""
    for directory in (path, *path.parents):
        if not directory.stat().st_mode & 0o001:
            raise ValueError(
                f"{directory} is not searchable by other users, so the postfix "
                f"and mail users cannot reach {path}; use another base dir"
            )
