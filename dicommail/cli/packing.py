"""What ``pack`` and ``send`` share: their options, skipped files, progress bars."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TimeRemainingColumn, TransferSpeedColumn

from dicommail import ProgressUpdate
from dicommail.cli.render import err, warn
from dicommail.config import parse_size

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
    """--from, --max-mail-size, --note, --attach and --emergency, as pack and send take them."""
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
    ]
    for option in reversed(options):
        func = option(func)
    return func


#: Show a progress bar only for packing that takes a while.
PROGRESS_FROM = 20 * 1024**2


def byte_progress(quiet: bool, total: int) -> Progress:
    """A progress bar in bytes on stderr, shown only for work that takes a while."""
    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
        disable=quiet or total < PROGRESS_FROM,
    )


def warn_skipped(_path: Path, reason: str) -> None:
    """An ``on_skip`` callback for pack and send: each file that is not sent, as a warning."""
    warn(reason + " - skipped")


class ProgressBars:
    """A progress callback that draws each task's updates as a :func:`byte_progress` bar.

    One bar at a time: a new task ("packing", then "sending") replaces the
    previous bar, as the jobs follow one another.  Use it as a context
    manager, so that the last bar is taken down however the job ends.
    """

    def __init__(self, quiet: bool) -> None:
        self._quiet = quiet
        self._name: str | None = None
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __call__(self, update: ProgressUpdate) -> None:
        if self._progress is None or self._task is None or update.task != self._name:
            self.close()
            self._progress = byte_progress(self._quiet, update.total)
            self._progress.start()
            self._task = self._progress.add_task(update.task, total=update.total)
            self._name = update.task
        self._progress.update(self._task, completed=update.completed)

    def close(self) -> None:
        """Take the current bar down (before printing a message, say)."""
        progress, self._progress, self._task, self._name = self._progress, None, None, None
        if progress is not None:
            progress.stop()

    def __enter__(self) -> ProgressBars:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
