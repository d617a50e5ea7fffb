"""``inbox``: the sets this site received, their state, and one set's timeline.

The output is plain text laid out for the terminal's width, or for 80
columns when stdout is no terminal (cron mail, a pipe), so that it never
depends on a guessed width; set IDs are never cut (a set ID that does not fit
beside the other columns gets a line of its own).  Text from the state is
printed literally: no markup is interpreted.
"""

from __future__ import annotations

import shutil
import sys
import textwrap
from collections.abc import Sequence
from datetime import UTC, datetime

import click

from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import handle_errors, info, print_json
from dicommail.config import format_size
from dicommail.site.tracking import ReceivedSet, ReceivedSetDetail
from dicommail.wire.partial import format_ranges

#: The width used when stdout is not a terminal.
PLAIN_WIDTH = 80
#: Narrowest a shrinkable column (a sender address) becomes before the layout gives up on one line.
MIN_SHRUNK = 12


def output_width() -> int:
    """The terminal's width (``COLUMNS`` first), or :data:`PLAIN_WIDTH` when stdout is not a terminal."""
    if not sys.stdout.isatty():
        return PLAIN_WIDTH
    return max(40, shutil.get_terminal_size((PLAIN_WIDTH, 24)).columns)


def local_time(at: datetime | None) -> str:
    """A time for people: local, to the second; "-" if absent."""
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at is not None else "-"


def age(at: datetime, now: datetime | None = None) -> str:
    """How long ago ``at`` was, in the largest unit that fits: "45 s", "12 min", "5 h", "3 d"."""
    seconds = max(0.0, ((now or datetime.now(UTC)) - at).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def wrapped(text: str, width: int, indent: str) -> list[str]:
    """``text`` wrapped to ``width`` after ``indent``; words (set IDs, fingerprints, addresses) are never cut."""
    return textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent + "  ",
                         break_long_words=False, break_on_hyphens=False) or [indent.rstrip()]


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 3)] + "..."


def table(
    key_header: str,
    headers: Sequence[str],
    rows: Sequence[tuple[str, Sequence[str], Sequence[str]]],
    width: int,
    shrink: int,
) -> list[str]:
    """Lines of a table whose first column (``key``: a set ID, a name) is never cut.

    ``rows`` are (key, cells, notes): notes are extra lines below the row,
    wrapped.  The column ``shrink`` (an index into ``cells``) gives way when
    the line is too long; if the key still does not fit beside the cells, it
    gets a line of its own with the cells indented below it.
    """
    widths = [max([len(header), *(len(cells[i]) for _, cells, _ in rows)]) for i, header in enumerate(headers)]
    key_width = max([len(key_header), *(len(key) for key, _, _ in rows)])

    def fit(room: int) -> list[int] | None:
        fixed = sum(w for i, w in enumerate(widths) if i != shrink) + 2 * (len(widths) - 1)
        left = room - fixed
        if left < min(widths[shrink], MIN_SHRUNK):
            return None
        return [min(w, left) if i == shrink else w for i, w in enumerate(widths)]

    def line(cells: Sequence[str], sizes: list[int]) -> str:
        return "  ".join(_cut(c, s).ljust(s) for c, s in zip(cells, sizes, strict=True)).rstrip()

    one_line = fit(width - key_width - 2)
    lines: list[str] = []
    if one_line is not None:
        lines.append(f"{key_header.ljust(key_width)}  {line(headers, one_line)}")
        for key, cells, notes in rows:
            lines.append(f"{key.ljust(key_width)}  {line(cells, one_line)}")
            lines += [part for note in notes for part in wrapped(note, width, "  ")]
        return lines
    sizes = fit(width - 2) or [len(h) for h in headers]
    lines.append(key_header)
    lines.append("  " + line(headers, sizes))
    for key, cells, notes in rows:
        lines.append(key)
        lines.append("  " + line(cells, sizes))
        lines += [part for note in notes for part in wrapped(note, width, "    ")]
    return lines


def state_label(one: ReceivedSet) -> str:
    """The state as ``inbox`` shows it: "incomplete 2/5", "waiting for the PACS", "forwarding 3/10", ..."""
    state = one.state
    if state == "incomplete":
        return f"incomplete {one.parts_received}/{one.set_total}"
    if state == "waiting":
        return "waiting for the PACS"
    if state == "forwarding":
        total = f"/{one.instances_total}" if one.instances_total is not None else ""
        return f"forwarding {one.instances_forwarded}{total}"
    return state


def state_notes(one: ReceivedSet) -> list[str]:
    """What explains the state: the missing parts, why the PACS has not taken it, why it failed."""
    notes: list[str] = []
    if one.missing_parts and one.status in ("collecting", "expired", "failed"):
        notes.append(f"missing part(s): {format_ranges(list(one.missing_parts))}")
    if one.state == "waiting":
        next_try = f", next try {local_time(one.next_attempt_at)}" if one.next_attempt_at else ""
        done = f", {one.instances_forwarded} instance(s) forwarded" if one.instances_forwarded else ""
        notes.append(f"attempt {one.attempts}{next_try}{done}: {one.error}")
    elif one.state in ("failed", "expired") and one.error:
        notes.append(one.error)
    return notes


def _list(sets: list[ReceivedSet], width: int) -> list[str]:
    now = datetime.now(UTC)
    rows = [
        (one.set_id, [state_label(one), one.sender or "-", age(one.first_seen_at, now), format_size(one.bytes)],
         state_notes(one))
        for one in sets
    ]
    return table("SET", ["STATE", "SENDER", "AGE", "SIZE"], rows, width, shrink=1)


def _detail(detail: ReceivedSetDetail, width: int) -> list[str]:
    one = detail.set
    lines = wrapped(f"set {one.set_id}: {state_label(one)}", width, "")
    facts = [
        f"from {one.sender or 'a key without a certified address'} (key {one.signer})",
        f"{one.parts_received}/{one.set_total} part(s) verified, {one.mails} mail(s), {format_size(one.bytes)}; "
        f"{one.instances_forwarded}"
        + (f"/{one.instances_total}" if one.instances_total is not None else "")
        + " instance(s) forwarded",
        f"first seen {local_time(one.first_seen_at)} ({age(one.first_seen_at)} ago), "
        f"last change {local_time(one.updated_at)}",
        *state_notes(one),
    ]
    lines += [part for fact in facts for part in wrapped(fact, width, "  ")]
    lines.append("timeline:")
    for event in detail.timeline:
        what = event.event + (f" (part {event.set_part})" if event.set_part is not None else "")
        text = f"{local_time(event.at)}  {what}" + (f": {event.detail}" if event.detail else "")
        lines += wrapped(text, width, "  ")
    lines.append("notifications:" if detail.notifications else "notifications: none recorded")
    for note in detail.notifications:
        sent = f", sent {local_time(note.sent_at)}" if note.sent_at is not None else ""
        reason = f" ({note.reason})" if note.reason else ""
        error = f", last error: {note.last_error}" if note.last_error and note.sent_at is None else ""
        method = f" by {note.method}" if note.method else ""
        text = (f"{local_time(note.created_at)}  {note.event}: {note.outcome}{reason}, {note.status}{method}"
                f"{sent}{error}")
        lines += wrapped(text, width, "  ")
    return lines


@click.command()
@click.argument("set_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
@handle_errors
def inbox(app: AppContext, set_id: str | None, as_json: bool) -> None:
    """Show received sets: incomplete (which parts are missing), waiting for the PACS (and why), delivered, ...

    With SET_ID: that set's timeline and the notifications sent back (each
    set of that ID, if several peers used it).
    """
    width = output_width()
    if set_id:
        details = app.site.received_set(set_id)
        if as_json:
            print_json({"ok": True, "sets": [d.to_json() for d in details]})
            return
        for number, detail in enumerate(details):
            if number:
                click.echo("")
            click.echo("\n".join(_detail(detail, width)))
        return
    sets = app.site.received_sets()
    if as_json:
        print_json({"ok": True, "sets": [s.to_json() for s in sets]})
        return
    if not sets:
        info("no sets received")
        return
    click.echo("\n".join(_list(sets, width)))


COMMANDS: list[click.Command] = [inbox]
