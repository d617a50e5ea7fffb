"""Rendering for the CLI: one rich console, errors with hints, JSON output."""

from __future__ import annotations

import errno
import functools
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any, TypeVar

import click
from rich.console import Console
from rich.text import Text

from dicommail.errors import DicommailError

#: Normal output goes to stdout; messages, warnings and progress to stderr so
#: that ``--json`` output stays machine-readable.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

#: Exit codes: 1 for a failure the user can fix, 2 is click's usage error.
EXIT_FAILURE = 1


class _Output:
    """What this invocation has printed: --json promises one document, however the command ends."""

    json_documents = 0
    #: `` --home DIR`` for the commands hints name, when this invocation's home is not the default.
    home_option = ""
    #: "dicommail" where it starts a command (not in "dicommail.toml", prose, or before --home already).
    command = re.compile(r"\bdicommail(?= +(?!--home\b)[a-z][a-z-]* )")


def set_home(home: Path, default: Path, commands: Iterable[str] = ()) -> None:
    """The home this invocation works on: commands in hints get ``--home`` unless it is the default.

    ``commands``: the subcommands' names, which tell a command ("dicommail keys ...") from prose.
    """
    _Output.home_option = "" if home == default else f" --home {_quoted(str(home))}"
    if commands:
        names = "|".join(sorted(map(re.escape, commands), key=len, reverse=True))
        # Options before the command ("-q", "--json") are stepped over; "--home" means it is there already.
        _Output.command = re.compile(rf"\bdicommail(?= +(?:--?(?!home\b)[a-z][\w-]* +)*(?:{names})\b)")


def _quoted(path: str) -> str:
    """``path`` for a shell: as it is when it can be, else in double quotes (hints often sit in single ones)."""
    if re.fullmatch(r"[\w@%+=:,./-]+", path):
        return path
    if not re.search(r'["$`\\!]', path):
        return f'"{path}"'
    return shlex.quote(path)


def for_this_home(text: str) -> str:
    """``text`` with ``--home DIR`` after every ``dicommail`` command it names, so that copying one acts here.

    Without it, a hint copied from a site at /srv/hospital ran on ~/.dicommail, or on another site.
    """
    if not _Output.home_option or "dicommail" not in text:
        return text
    option = _Output.home_option
    return _Output.command.sub(lambda _m: "dicommail" + option, text)


def new_invocation() -> None:
    """Forget what an earlier invocation printed (tests run many in one process)."""
    _Output.json_documents = 0


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    _Output.json_documents += 1


def json_printed() -> bool:
    """True once this invocation printed its JSON document (an error after it must not print another)."""
    return _Output.json_documents > 0


def names_journal_stream(stream: IO[str]) -> bool | None:
    """Whether ``JOURNAL_STREAM`` (``device:inode``, set by systemd for a unit's output) names ``stream``.

    False when the variable is unset; None when it is set but cannot be compared.
    """
    journal = os.environ.get("JOURNAL_STREAM", "")
    if not journal:
        return False
    try:
        device, _, inode = journal.partition(":")
        status = os.fstat(stream.fileno())
        return (status.st_dev, status.st_ino) == (int(device), int(inode))
    except (OSError, ValueError, AttributeError):
        return None


def _on_journal_stream() -> bool:
    """True when stderr is journald's stream itself, as under a systemd unit."""
    return names_journal_stream(sys.stderr) is True


def _labelled(label: str, style: str, message: str, priority: int) -> Text:
    # A Text part is printed as it is: "[receiver]" in a message stays "[receiver]".
    # Under systemd a "<N>" prefix files the line at that syslog priority, so that
    # `journalctl -p err` shows why a unit's command stopped.
    prefix = f"<{priority}>" if _on_journal_stream() else ""
    return Text.assemble(prefix, (label, style), " ", message)


def warn(message: str) -> None:
    """``warning: MESSAGE`` on stderr, printed literally (commands it names get this home's --home)."""
    err.print(_labelled("warning:", "yellow", for_this_home(message), 4))


def info(message: str) -> None:
    """A message on stderr, printed literally (commands it names get this home's --home)."""
    err.print(Text(for_this_home(message)))


def print_error(message: str, hint: str = "", label: str = "error:") -> None:
    """``error: MESSAGE`` and ``hint: HINT`` on stderr, printed literally (commands named get --home)."""
    err.print(_labelled(label, "bold red", for_this_home(message), 3))
    if hint:
        err.print(_labelled("hint:", "dim", for_this_home(hint), 3))


def error_document(error: DicommailError) -> dict[str, Any]:
    """The ``error`` member of a --json document."""
    return {"code": error.code, "message": for_this_home(error.message), "hint": for_this_home(error.hint)}


def fail(error: DicommailError, as_json: bool = False) -> None:
    """Report ``error`` and exit non-zero; with ``as_json`` also as a JSON document, unless one was printed."""
    if as_json and not json_printed():
        print_json({"ok": False, "error": error_document(error)})
    print_error(error.message, error.hint)
    raise SystemExit(EXIT_FAILURE)


def wants_json(args: Sequence[str]) -> bool:
    """Whether a command line asks for ``--json`` (options end at a literal ``--``)."""
    for arg in args:
        if arg == "--":
            return False
        if arg == "--json":
            return True
    return False


def usage_error_document(error: click.UsageError) -> dict[str, Any]:
    """The ``error`` member of a --json document for a usage error (code "usage")."""
    command = error.ctx.command_path if error.ctx is not None else "dicommail"
    return {"code": "usage", "message": error.format_message(), "hint": f"see '{command} --help'"}


class JsonUsageError(click.UsageError):
    """A usage error under ``--json``: one JSON document on stdout, click's text on stderr, exit 2."""

    def __init__(self, error: click.UsageError) -> None:
        super().__init__(error.format_message(), error.ctx)
        self.error = error

    def format_message(self) -> str:
        return self.error.format_message()

    def show(self, file: IO[Any] | None = None) -> None:
        if not json_printed():
            print_json({"ok": False, "error": usage_error_document(self.error)})
        self.error.show(file)


def os_error(exc: OSError) -> DicommailError:
    """A file-system failure (disk full, permissions) as a message with a hint."""
    where = f" ({exc.filename})" if exc.filename else ""
    if exc.errno == errno.ENOSPC:
        return DicommailError(
            f"the disk is full{where}", "free space there and run the command again; nothing was lost"
        )
    if exc.errno in (errno.EACCES, errno.EPERM):
        return DicommailError(f"permission denied{where}", "check the owner and permissions of that path")
    return DicommailError(f"{exc.strerror or exc}{where}", "check the path and the disk")


class Terminated(KeyboardInterrupt):
    """SIGTERM (systemd stopping a unit, ``timeout`` in a cron job), raised like Ctrl-C.

    Unwinding runs every ``finally``: the scratch directories that hold
    decrypted plaintext are removed instead of being left behind.
    """


def raise_terminated(_signum: int, _frame: object) -> None:
    raise Terminated


def handle_errors(func: F) -> F:
    """Turn library errors into a message, a hint and a non-zero exit."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        new_invocation()
        try:
            return func(*args, **kwargs)
        except DicommailError as exc:
            fail(exc, as_json=bool(kwargs.get("as_json")))
        except OSError as exc:
            fail(os_error(exc), as_json=bool(kwargs.get("as_json")))
        except KeyboardInterrupt as exc:
            word, status = ("terminated", 143) if isinstance(exc, Terminated) else ("interrupted", 130)
            if kwargs.get("as_json") and not json_printed():
                print_json({"ok": False, "error": {"code": word, "message": word, "hint": ""}})
            info(word)
            raise SystemExit(status) from None

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


_MONTH = re.compile(r"^\d{4}-\d{2}$")


def parse_moment(value: str) -> datetime:
    """An ISO 8601 date or time (local unless it names an offset), or a month (YYYY-MM: its first day).

    Raises ``ValueError``.
    """
    text = value.strip()
    return datetime.fromisoformat(text + "-01" if _MONTH.match(text) else text)


def since_option(value: str | None) -> datetime | None:
    """The value of a ``--since`` option: as :func:`parse_moment` reads it."""
    if value is None:
        return None
    try:
        return parse_moment(value)
    except ValueError as exc:
        # A usage error (exit 2), as click reports a bad value of its own.
        raise click.BadParameter(f"{value!r} is not a date; use e.g. 2026-11, 2026-11-23 or 2026-11-23T08:00",
                                 param_hint="'--since'") from exc


def format_duration(seconds: float | None, *, compact: bool = False) -> str:
    """A transfer time for people: "4.7 s", "12 min 34 s", "2 h 05 min" ("4.7s", "12m34s", "2h05m" if ``compact``)."""
    if seconds is None:
        return "-"
    s, m, h = ("s", "m", "h") if compact else (" s", " min", " h")
    gap = "" if compact else " "
    if seconds < 60:
        return f"{seconds:.1f}{s}"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}{m}{gap}{rest:02d}{s}"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}{h}{gap}{minutes:02d}{m}"
