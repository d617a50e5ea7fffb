"""``status`` (the job manager) and ``transfers retry|cancel|delete``.

``status`` prints plain columns, as ``systemctl list-units`` or ``ps`` do:
at most 80 characters a line (ID, state, recipient, age, transfer time, and
the set ID on a line of its own, never cut), or every column with
``--wide``, whatever the terminal or pipe it writes to.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import click
from rich.cells import cell_len
from rich.text import Text

from dicommail import TransferChange, TransferDetail, TransferView
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import confirm, format_duration, handle_errors, info, out, print_json, since_option
from dicommail.config import format_size
from dicommail.errors import InputError

_STYLE = {
    "delivered": "green",
    "acknowledged": "cyan",
    "sent": "cyan",
    "sending": "yellow",
    "queued": "yellow",
    "failed": "red",
    "expired": "red",
    "cancelled": "dim",
}

#: The width of ``status`` without ``--wide`` and of ``status IDENT``, on a terminal or not.
WIDTH = 80
_GAP = "  "


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _age(seconds: float) -> str:
    """How long ago, coarsely: "45 s", "12 min", "3 h 05 min", "2 d 04 h"."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes = seconds // 60
    if minutes < 60:
        return f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours:02d} h"


def _plain(text: str) -> str:
    """One line of text: control characters (a newline in an error, say) become spaces."""
    return "".join(c if c.isprintable() else " " for c in text)


def _shorten(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


@dataclass(frozen=True)
class _Cell:
    text: str
    style: str = ""
    right: bool = False


def _widths(header: Sequence[str], rows: Sequence[Sequence[_Cell]]) -> list[int]:
    return [max([cell_len(h)] + [cell_len(row[i].text) for row in rows]) for i, h in enumerate(header)]


def _columns(header: Sequence[str], rows: Sequence[Sequence[_Cell]]) -> tuple[list[int], list[Text]]:
    """Left-aligned columns two spaces apart (numbers right-aligned), without trailing blanks."""
    widths = _widths(header, rows)
    lines = [Text(_GAP.join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip(), style="bold")]
    for row in rows:
        line = Text()
        for i, (cell, width) in enumerate(zip(row, widths, strict=True)):
            if i:
                line.append(_GAP)
            blank = " " * (width - cell_len(cell.text))
            line.append(blank + cell.text if cell.right else cell.text + blank, style=cell.style or None)
        line.rstrip()
        lines.append(line)
    return widths, lines


def _wrapped(label: str, body: str, indent: int, *, style: str = "", width: int = WIDTH) -> list[Text]:
    """``label`` and ``body`` word-wrapped to ``width`` under ``indent`` spaces; a word is never cut.

    A word longer than the line (a long message ID) stands on a line of its own, longer than ``width``.
    """
    pad = " " * indent
    lines = textwrap.wrap(
        _plain(body), width=width, initial_indent=pad + label, subsequent_indent=pad + " " * len(label),
        break_long_words=False, break_on_hyphens=False,
    ) or [pad + label.rstrip()]
    result = [Text(line) for line in lines]
    if style and label:
        result[0].stylize(style, indent, indent + len(label.rstrip()))
    return result


def status_lines(views: Sequence[TransferView], *, wide: bool = False, show_patient: bool = False,
                 now: float | None = None) -> list[Text]:
    """What ``dicommail status`` prints for ``views``: at most :data:`WIDTH` characters a line unless ``wide``.

    Without ``wide``: ID, state, recipient (shortened with "…" only if it would
    not fit), age and transfer time, then the set ID on a line of its own and,
    where there is one, the error; with ``wide`` every column on one line.
    """
    now = time.time() if now is None else now
    if wide:
        return _wide_lines(views, show_patient)
    header = ["ID", "STATE", "RECIPIENT", "AGE", "TRANSFER TIME"]
    rows = [
        [
            _Cell(str(view.id), right=True),
            _Cell(view.status, _STYLE.get(view.status, "")),
            _Cell(_plain(view.recipient)),
            _Cell(_age(now - view.created_at)),
            _Cell(format_duration(view.transfer_seconds)),
        ]
        for view in views
    ]
    widths = _widths(header, rows)
    room = WIDTH - sum(widths) + widths[2] - len(_GAP) * (len(header) - 1)
    if widths[2] > room:
        for row in rows:
            row[2] = _Cell(_shorten(row[2].text, room))
    widths, table = _columns(header, rows)
    indent = widths[0] + len(_GAP)
    lines = table[:1]
    for view, line in zip(views, table[1:], strict=True):
        lines.append(line)
        lines.append(Text(" " * indent + "set " + view.set_id))
        if show_patient:
            lines += _wrapped("patient: ", f"{view.patient_name or '-'}; study: {view.study_description or '-'}",
                              indent)
        if view.error:
            lines += _wrapped("error: ", view.error, indent, style=_STYLE.get(view.status, "") or "red")
    return lines


def _wide_lines(views: Sequence[TransferView], show_patient: bool) -> list[Text]:
    header = ["ID", "SET", "STATE", "CREATED", "RECIPIENT", "PARTS SENT", "ACKNOWLEDGED", "IMAGES",
              "TRANSFER TIME"]
    if show_patient:
        header += ["PATIENT", "STUDY"]
    header.append("ERROR")
    rows: list[list[_Cell]] = []
    for view in views:
        row = [
            _Cell(str(view.id), right=True),
            _Cell(view.set_id),
            _Cell(view.status, _STYLE.get(view.status, "")),
            _Cell(_when(view.created_at)),
            _Cell(_plain(view.recipient)),
            _Cell(f"{view.parts_sent}/{view.set_total}", right=True),
            _Cell(f"{view.parts_acknowledged}/{view.set_total}", right=True),
            _Cell(str(view.images) if view.images is not None else str(view.files), right=True),
            _Cell(format_duration(view.transfer_seconds)),
        ]
        if show_patient:
            row += [_Cell(_plain(view.patient_name or "-")), _Cell(_plain(view.study_description or "-"))]
        row.append(_Cell(_plain(view.error or "-")))
        rows.append(row)
    return _columns(header, rows)[1]


def detail_lines(detail: TransferDetail, show_patient: bool = False) -> list[Text]:
    """What ``dicommail status IDENT`` prints: the transfer, then its timeline, word-wrapped to :data:`WIDTH`."""
    view, events, report = detail.transfer, detail.timeline, detail.final_report
    style = _STYLE.get(view.status, "")
    head = Text()
    head.append(f"set {view.set_id}", style="bold")
    head.append(f" (transfer {view.id})")
    lines = [head, *_wrapped("to ", f"{view.recipient}: {view.status}", 2)]
    lines[-1].stylize(style, len(lines[-1]) - len(view.status), len(lines[-1]))
    lines += _wrapped("", f"{view.set_total} part(s), {view.mails} mail(s), {view.files} file(s), "
                      f"{format_size(view.bytes)}" + (f", {view.images} image(s)" if view.images is not None else ""),
                      2)
    if show_patient:
        lines += _wrapped("patient: ", f"{view.patient_name or '-'}; study: {view.study_description or '-'}", 2)
    lines += _wrapped("", f"created {_when(view.created_at)}; first mail sent {_when(view.first_sent_at)}; "
                      f"parts acknowledged {view.parts_acknowledged}/{view.set_total}", 2)
    if view.transfer_seconds is not None:
        lines += _wrapped("", f"transfer time {format_duration(view.transfer_seconds)} (first mail handed to SMTP "
                          "until the receiver's final notification)", 2)
    if report is not None:

        def field(name: str) -> str:
            value = report.get(name)
            return "-" if value is None else str(value)

        def when(name: str) -> str:
            value = report.get(name)
            try:
                return _when(datetime.fromisoformat(str(value)).timestamp()) if value is not None else "-"
            except ValueError:
                return str(value)

        lines += _wrapped("receiver: ", f"{field('files')} file(s), {field('dicom_instances')} DICOM instance(s) "
                          f"forwarded; first part received {when('first_received_at')}, verified "
                          f"{when('verified_at')}, forwarded {when('forwarded_at')}", 2)
    if view.error:
        lines += _wrapped("error: ", view.error, 2, style="red")
    lines.append(Text())
    rows = [[_Cell(_when(e.at)), _Cell(str(e.set_part or "-")), _Cell(_plain(e.event))] for e in events]
    widths, table = _columns(["TIME", "PART", "EVENT"], rows)
    # Each detail under its event, unless a word of one (a message ID) would not fit there.
    indent = widths[0] + widths[1] + 2 * len(_GAP)
    longest = max((len(word) for e in events for word in _plain(e.detail).split()), default=0)
    if indent + longest > WIDTH:
        indent = 4
    lines.append(table[0])
    for event, line in zip(events, table[1:], strict=True):
        lines.append(line)
        if event.detail:
            lines += _wrapped("", event.detail, indent)
    return lines


def _print(lines: Sequence[Text]) -> None:
    for line in lines:
        out.print(line)


@click.command()
@click.argument("ident", required=False)
@click.option("--active", "filters", flag_value="active", help="Transfers not finished yet.")
@click.option("--waiting", "filters", flag_value="waiting", help="Sent, waiting for the receiver's notification.")
@click.option("--done", "filters", flag_value="done", help="Delivered transfers.")
@click.option("--failed", "filters", flag_value="failed", help="Failed, expired or cancelled transfers.")
@click.option("--since",
              help="Only transfers created on or after this date (ISO 8601, local time; YYYY-MM: that month).")
@click.option("--wide", is_flag=True,
              help="Every column (set, created, parts, images, error) on one line, however long.")
@click.option("--show-patient", is_flag=True, help="Also show patient name and study description (local data).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON (times in ISO 8601 with offset).")
@pass_app
@handle_errors
def status(
    app: AppContext, ident: str | None, filters: str | None, since: str | None, wide: bool, show_patient: bool,
    as_json: bool,
) -> None:
    """Show sent transfers: delivered, failed (and why) or on their way, and how long delivery took.

    Lines fit 80 columns: ID, state, recipient, age and transfer time, with
    the set ID (and any error) below; --wide puts every column on one line.

    With IDENT (a set ID or transfer number): that transfer's timeline, mail by mail.
    """
    if ident:
        detail = app.site.transfer(ident)
        if as_json:
            print_json(detail.to_json(show_patient))
        else:
            _print(detail_lines(detail, show_patient))
        return
    views = app.site.transfers(state=filters, since=since_option(since))
    if as_json:
        print_json({"ok": True, "transfers": [v.to_json(show_patient) for v in views]})
        return
    if not views:
        info("no transfers" + (" match" if filters or since else ""))
        return
    _print(status_lines(views, wide=wide, show_patient=show_patient))


@click.group()
def transfers() -> None:
    """Manage sent transfers: retry, cancel or delete one."""


def _asker(question: Callable[[TransferView], str], yes: bool) -> Callable[[TransferView], bool]:
    """The library's ``confirm`` hook: ask before anything changes, or refuse without a terminal."""

    def ask(view: TransferView) -> bool:
        if not confirm(question(view), yes):
            raise InputError("not confirmed; nothing was changed", "answer yes on a terminal, or pass --yes in scripts")
        return True

    return ask


def _report(change: TransferChange, as_json: bool, message: str) -> None:
    """What a change did: ``message`` on stderr, or with ``as_json`` one document on stdout."""
    if as_json:
        print_json({"ok": True, "action": change.action, "transfer": change.transfer.to_json(),
                    "mails_queued": change.mails_queued, "files_removed": change.files_removed})
    else:
        info(message)


_YES = click.option("--yes", is_flag=True, help="Do not ask (for scripts).")
_JSON = click.option("--json", "as_json", is_flag=True,
                     help="Print what was done as JSON (the transfer as it was before).")


@transfers.command()
@click.argument("ident")
@_YES
@_JSON
@pass_app
@handle_errors
def retry(app: AppContext, ident: str, yes: bool, as_json: bool) -> None:
    """Queue a failed, expired or cancelled transfer again (its unacknowledged parts)."""
    change = app.site.retry(ident, confirm=_asker(
        lambda v: f"Send the unacknowledged parts of set {v.set_id} ({v.status}) to {v.recipient} again?", yes))
    _report(change, as_json,
            f"{change.mails_queued} mail(s) of set {change.transfer.set_id} queued again; they go out with "
            "`dicommail send --pending` or the running `dicommail receive`")


@transfers.command()
@click.argument("ident")
@_YES
@_JSON
@pass_app
@handle_errors
def cancel(app: AppContext, ident: str, yes: bool, as_json: bool) -> None:
    """Stop an active transfer: mails not yet sent stay unsent; later notifications change nothing."""
    change = app.site.cancel(ident, confirm=_asker(
        lambda v: f"Cancel set {v.set_id} ({v.status}, {v.parts_sent}/{v.set_total} part(s) sent) to {v.recipient}?",
        yes,
    ))
    _report(change, as_json, f"set {change.transfer.set_id} cancelled")


@transfers.command()
@click.argument("ident")
@_YES
@_JSON
@pass_app
@handle_errors
def delete(app: AppContext, ident: str, yes: bool, as_json: bool) -> None:
    """Remove a finished transfer, its records and its mails in the outbox."""
    change = app.site.delete(ident, confirm=_asker(
        lambda v: f"Delete set {v.set_id} ({v.status}) and its {v.mails} mail(s) from the outbox?", yes))
    _report(change, as_json, f"set {change.transfer.set_id} deleted ({change.files_removed} file(s) removed)")


COMMANDS: list[click.Command] = [status, transfers]
