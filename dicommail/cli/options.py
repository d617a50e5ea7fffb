"""Click options shared by several commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

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
