"""Rendering for the CLI: one rich console, errors with hints, JSON output."""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console

from dicommail.errors import DicommailError

#: Normal output goes to stdout; messages, warnings and progress to stderr so
#: that ``--json`` output stays machine-readable.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: 1 for a failure the user can fix, 2 is click's usage error.
EXIT_FAILURE = 1


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def warn(message: str) -> None:
    err.print(f"[yellow]warning:[/yellow] {message}")


def info(message: str) -> None:
    err.print(message)


def fail(error: DicommailError, as_json: bool = False) -> None:
    """Report ``error`` and exit non-zero."""
    if as_json:
        print_json({"ok": False, "error": {"code": error.code, "message": error.message, "hint": error.hint}})
    err.print(f"[bold red]error:[/bold red] {error.message}", markup=True)
    if error.hint:
        err.print(f"[dim]hint:[/dim] {error.hint}")
    raise SystemExit(EXIT_FAILURE)


def handle_errors(func: F) -> F:
    """Turn library errors into a message, a hint and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except DicommailError as exc:
            fail(exc, as_json=bool(kwargs.get("as_json")))
        except KeyboardInterrupt:
            err.print("interrupted")
            raise SystemExit(130) from None

    return wrapper  # type: ignore[return-value]


def echo_escape(text: str) -> str:
    """Escape rich markup in user-controlled text."""
    from rich.markup import escape

    return escape(text)


def confirm(question: str, assume_yes: bool) -> bool:
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        return False
    return click.confirm(question, default=False, err=True)
