"""What ``pack``, ``send``, ``unpack`` and ``receive`` share: options, skipped files, summaries, progress bars."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from dicommail import ProgressUpdate
from dicommail.cli.render import err, warn
from dicommail.config import format_size, parse_size

F = TypeVar("F", bound=Callable[..., Any])


def size_value(_ctx: click.Context, _param: click.Parameter, value: str | None) -> int | None:
    """Click callback: ``10M`` and the like to bytes."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from exc


def packing_options(func: F) -> F:
    """--from, --max-mail-size, --note, --attach, --emergency and --strict, as pack and send take them."""
    options = [
        click.option("--from", "sender", default="", help="Sender address (default: identity.address)."),
        click.option(
            "--max-mail-size", callback=size_value, help="Largest mail on the wire, e.g. 10M (default from config)."
        ),
        click.option("--note", default="", help="A text note for the recipient (travels encrypted)."),
        click.option(
            "--attach",
            "attachments",
            multiple=True,
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="A non-DICOM file to send along (e.g. a PDF report); repeatable.",
        ),
        click.option("--emergency", is_flag=True, help="Mark the mails as urgent (priority headers, subject marker)."),
        click.option(
            "--strict",
            is_flag=True,
            help="Refuse the whole job if any file would be skipped (not DICOM, truncated, damaged).",
        ),
    ]
    for option in reversed(options):
        func = option(func)
    return func


# -- skipped files and the summary ---------------------------------------------------------------


@dataclass
class ScanTally:
    """What the scan of pack's or send's paths found: the files skipped, and what is packed.

    Its :meth:`skip` and :meth:`found` are the ``on_skip`` and ``on_found``
    callbacks; each skipped file is a warning at once, its reason naming it.
    """

    strict: bool = False
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    files: int | None = None  # DICOM files to pack; None until the scan is done
    bytes: int | None = None

    def skip(self, path: Path, reason: str) -> None:
        self.skipped.append((path, reason))
        # With --strict the file is not skipped but refuses the job (the error follows the scan).
        warn(reason if self.strict else reason + " - skipped")

    def found(self, files: int, size: int) -> None:
        self.files, self.bytes = files, size

    def summary(self) -> str:
        """``20 packed (10.0 MiB), 1 skipped``."""
        packed = self.files or 0
        return f"{packed} packed ({format_size(self.bytes or 0)}), {len(self.skipped)} skipped"

    def to_json(self, packed: bool = True) -> dict[str, Any]:
        """The counts and the skipped files, for the --json document; ``packed`` False when nothing was."""
        return {
            "packed": self.files if packed else None,
            "bytes": self.bytes if packed else None,
            "skipped": len(self.skipped),
            "skipped_files": [{"path": str(path), "reason": reason} for path, reason in self.skipped],
        }


# -- progress bars ------------------------------------------------------------------------------

#: Show a byte bar only for work that takes a while.
PROGRESS_FROM = 20 * 1024**2


class BinarySpeedColumn(ProgressColumn):
    """Bytes per second in binary units (rich's TransferSpeedColumn uses decimal MB/s)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("", style="progress.data.speed")
        return Text(f"{format_size(int(speed))}/s", style="progress.data.speed")


def _columns(update: ProgressUpdate) -> list[str | ProgressColumn]:
    # Sized to stay within 80 columns: "packing" 24-wide bar "101.2/512.0 MiB" "12.3 MiB/s" "0:00:31".
    if update.unit == "bytes":
        return [
            "[progress.description]{task.description}",
            BarColumn(bar_width=24),
            DownloadColumn(binary_units=True),
            BinarySpeedColumn(),
            TimeRemainingColumn(),
        ]
    return [
        "[progress.description]{task.description}",
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn(update.unit),
        TimeRemainingColumn(),
    ]


class ProgressBars:
    """A progress callback that draws its updates as bars on stderr, only on a terminal.

    One bar at a time: a new task ("packing", then "sending"), or a task that
    starts over (the next set "forwarding"), replaces the previous bar, and a
    bar goes once its task is complete.  Byte tasks under
    :data:`PROGRESS_FROM` get no bar.  ``quiet`` (--json, -q) shows none at
    all.  Updates may come from worker threads.  Use it as a context
    manager, so that the last bar is taken down however the job ends.
    """

    def __init__(self, quiet: bool, console: Console | None = None) -> None:
        self._console = console if console is not None else err
        self._enabled = not quiet and self._console.is_terminal
        self._lock = threading.Lock()
        self._key: tuple[str, int] | None = None  # task and total of the current bar (or of a task not shown)
        self._last = 0
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, update: ProgressUpdate) -> None:
        if not self._enabled:
            return
        with self._lock:
            key = (update.task, update.total)
            if key != self._key or update.completed < self._last:
                self._close()
                self._key = key
                if update.total > 0 and (update.unit != "bytes" or update.total >= PROGRESS_FROM):
                    self._open(update)
            self._last = update.completed
            if self._progress is not None and self._task is not None:
                self._progress.update(self._task, completed=update.completed)
                if update.completed >= update.total:
                    self._close()

    def _open(self, update: ProgressUpdate) -> None:
        self._progress = Progress(*_columns(update), console=self._console, transient=True)
        self._progress.start()
        self._task = self._progress.add_task(update.task, total=update.total)

    def _close(self) -> None:
        progress, self._progress, self._task = self._progress, None, None
        if progress is not None:
            progress.stop()

    def close(self) -> None:
        """Take the current bar down (before printing a message, say)."""
        with self._lock:
            self._close()
            self._key = None

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class MailBytes:
    """Turns ``unpack``'s "unpacking" updates, counted in mails, into bytes of those mails for a bar.

    The library counts mails as they are dealt with, not which ones; each
    counts at the mean size of the mails given until the last, when the
    total is exact.  Good enough for a bar, and the bar is in bytes like the
    others.
    """

    def __init__(self, bars: Callable[[ProgressUpdate], None], sizes: list[int]) -> None:
        self._bars = bars
        self._total = sum(sizes)
        self._count = max(len(sizes), 1)

    def __call__(self, update: ProgressUpdate) -> None:
        if update.unit != "mails":
            self._bars(update)
            return
        done = self._total if update.completed >= self._count else self._total * update.completed // self._count
        self._bars(ProgressUpdate(update.task, done, self._total))


def file_sizes(paths: list[Path]) -> list[int]:
    """Sizes of files, 0 for one that cannot be read (the library reports it)."""
    sizes = []
    for path in paths:
        try:
            sizes.append(path.stat().st_size)
        except OSError:
            sizes.append(0)
    return sizes
