"""What ``pack`` and ``send`` share: their options, finding studies, packing with progress."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

from dicommail.cli.render import echo_escape, err, warn
from dicommail.config import parse_size
from dicommail.crypto.gpg import Keyring
from dicommail.dicom import DicomFile, scan
from dicommail.errors import InputError
from dicommail.wire.pack import PackedSet, Packer, PackOptions

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


def find_studies(paths: Sequence[Path], command: str) -> dict[str, list[DicomFile]]:
    """The DICOM files under ``paths`` by study; what is skipped is said, and none at all is an error."""
    result = scan(paths)
    for _path, reason in result.skipped:
        warn(echo_escape(reason) + " - skipped")
    studies = result.studies()
    if not studies:
        raise InputError("no DICOM files found in the given paths", f"point {command} at DICOM files or folders")
    return studies


def pack_studies(
    keyring: Keyring,
    options: PackOptions,
    studies: dict[str, list[DicomFile]],
    out_dir: Path,
    sets: list[PackedSet],
    *,
    quiet: bool,
) -> None:
    """Pack each study into ``out_dir`` with a progress bar, appending each set to ``sets`` as it is done."""
    total = sum(f.size for files in studies.values() for f in files)
    with byte_progress(quiet, total) as progress:
        task = progress.add_task("packing", total=total)
        packer = Packer(keyring, options, progress=lambda n: progress.advance(task, n))
        for files in studies.values():
            sets.append(packer.pack(files, out_dir))
