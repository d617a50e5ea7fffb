"""Logging for the service commands: journald lines off a terminal, timestamped lines on one.

Off a terminal (a systemd unit, cron, a pipe) every event is one line,
``<N>message key=value ...``, with the syslog priority prefix journald reads
from a stream (sd-daemon(3)): journald files the line at that priority and
the line is never wrapped, so one event is one journal entry.  On a terminal
each line starts with an ISO 8601 timestamp and the level.  Messages are
printed literally (no rich markup), and the ``extra={...}`` fields a log
call passes are appended as ``key=value``.
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable
from datetime import datetime
from typing import IO, Any, TypeVar

import click
from rich.text import Text

from dicommail.cli.render import err, names_journal_stream

F = TypeVar("F", bound=Callable[..., Any])

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}

#: sd-daemon(3) priorities: <3> error, <4> warning, <6> info, <7> debug (CRITICAL is <2>).
_PRIORITIES = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))
_STYLES = {"DEBUG": "dim", "INFO": "cyan", "WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red"}

#: What every LogRecord has; any other attribute came from ``extra=`` and is shown as key=value.
_RECORD_FIELDS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level."""
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return 7


def _value(value: object) -> str:
    text = str(value)
    if not text or any(c.isspace() or c in '"=\\' for c in text):
        escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
        return f'"{escaped}"'
    return text


def details(record: logging.LogRecord) -> str:
    """The record's ``extra`` fields as ``key=value`` pairs (quoted where a value has spaces), in call order."""
    pairs = [f"{key}={_value(value)}" for key, value in record.__dict__.items() if key not in _RECORD_FIELDS]
    if not record.name.startswith("dicommail"):
        pairs.append(f"logger={record.name}")  # a library's line (pynetdicom, aioimaplib): say whose
    return " ".join(pairs)


class EventFormatter(logging.Formatter):
    """The text of one event: message, key=value details, then the traceback, if any."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        extra = details(record)
        if extra:
            text = f"{text} {extra}"
        if record.exc_info:
            text = f"{text}\n{self.formatException(record.exc_info)}"
        elif record.exc_text:
            text = f"{text}\n{record.exc_text}"
        return text


class JournalFormatter(EventFormatter):
    """``<N>message key=value``: one line per event, newlines (a traceback's too) escaped as ``\\n``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record).rstrip("\n").replace("\r", "").replace("\n", "\\n")
        return f"<{priority(record.levelno)}>{text}"


class JournalHandler(logging.Handler):
    """Writes each event as one journal line to the current ``sys.stderr`` (which tests may replace)."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(JournalFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            stream = sys.stderr
            stream.write(line + "\n")
            stream.flush()
        except Exception:
            self.handleError(record)


class TerminalHandler(logging.Handler):
    """``2026-11-23T08:00:01+01:00 INFO message``, through the stderr console (so progress bars stay intact)."""

    def __init__(self, level: int = logging.NOTSET) -> None:
        super().__init__(level)
        self.setFormatter(EventFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            when = datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="seconds")
            line = Text.assemble(
                (when, "dim"), " ", (f"{record.levelname:<7}", _STYLES.get(record.levelname, "")), " ",
                self.format(record),  # a Text part: printed as it is, brackets and all
            )
            err.print(line)
        except Exception:
            self.handleError(record)


def journal_mode(stream: IO[str] | None = None) -> bool:
    """True when log lines should be journal lines: ``stream`` is not a terminal, or is journald's stream.

    ``JOURNAL_STREAM`` (``device:inode``, set by systemd) counts when it names
    ``stream`` itself or cannot be compared; a shell started from a unit
    inherits the variable, and its terminal still gets terminal lines.
    """
    stream = stream if stream is not None else sys.stderr
    try:
        terminal = stream.isatty()
    except (AttributeError, ValueError):
        terminal = False
    if not terminal:
        return True
    return names_journal_stream(stream) is not False


def setup_logging(level: int = logging.INFO) -> None:
    """Log dicommail's events at ``level`` and above to stderr (journal or terminal lines, see above).

    Other libraries only get their warnings through (errors with ``error``);
    pynetdicom's own errors and python-gnupg's warnings describe conditions
    dicommail reports itself (as the warning or error they are), so they are
    silenced unless debugging.
    """
    handler: logging.Handler = JournalHandler() if journal_mode() else TerminalHandler()
    logging.basicConfig(level=max(logging.WARNING, level), handlers=[handler], force=True)
    logging.getLogger("dicommail").setLevel(level)
    logging.getLogger("pynetdicom").setLevel(logging.INFO if level <= logging.DEBUG else logging.CRITICAL)
    # python-gnupg warns "gpg returned a non-zero error code" for every refused mail or wrong
    # passphrase, which dicommail reports itself with the reason: kept for debugging only.
    logging.getLogger("gnupg").setLevel(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)


def log_level(name: str | None, quiet: bool, verbose: int) -> int:
    """The level the options ask for: --log-level, else -q (warning), else -v (debug), else info."""
    if name is not None:
        return LEVELS[name]
    if quiet and verbose:
        raise click.UsageError("give only one of -q/--quiet and -v/--verbose")
    if quiet:
        return logging.WARNING
    return logging.DEBUG if verbose else logging.INFO


def log_options(func: F) -> F:
    """``--log-level``, ``-q`` and ``-v`` for a service command; logging is set up before the command runs."""

    @functools.wraps(func)
    def wrapper(*args: Any, log_level_name: str | None, quiet: bool, verbose: int, **kwargs: Any) -> Any:
        setup_logging(log_level(log_level_name, quiet, verbose))
        return func(*args, **kwargs)

    options = [
        click.option("--log-level", "log_level_name", type=click.Choice(list(LEVELS)), default=None,
                     help="Log this level and above (default: info)."),
        click.option("-q", "--quiet", is_flag=True, help="Log warnings and errors only (= --log-level warning)."),
        click.option("-v", "--verbose", count=True, help="Log debugging detail (= --log-level debug)."),
    ]
    decorated: Any = wrapper
    for option in reversed(options):
        decorated = option(decorated)
    return decorated  # type: ignore[no-any-return]
