"""``status`` (the job manager) and ``transfers retry|cancel|delete``."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import click
from rich.table import Table

from dicommail import TransferDetail, TransferView
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import confirm, echo_escape, handle_errors, info, out, print_json, since_option
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


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


@click.command()
@click.argument("ident", required=False)
@click.option("--active", "filters", flag_value="active", help="Transfers not finished yet.")
@click.option("--waiting", "filters", flag_value="waiting", help="Sent, waiting for the receiver's notification.")
@click.option("--done", "filters", flag_value="done", help="Delivered transfers.")
@click.option("--failed", "filters", flag_value="failed", help="Failed, expired or cancelled transfers.")
@click.option("--since", help="Only transfers created on or after this date (ISO 8601, local time).")
@click.option("--show-patient", is_flag=True, help="Also show patient name and study description (local data).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
@handle_errors
def status(
    app: AppContext, ident: str | None, filters: str | None, since: str | None, show_patient: bool, as_json: bool
) -> None:
    """Show sent transfers: delivered, failed (and why) or on their way, and how long delivery took.

    With IDENT (a set ID or transfer number): that transfer's timeline, mail by mail.
    """
    if ident:
        detail = app.site.transfer(ident)
        if as_json:
            print_json(detail.to_json(show_patient))
        else:
            _show_one(detail, show_patient)
        return
    views = app.site.transfers(state=filters, since=since_option(since))
    if as_json:
        print_json({"ok": True, "transfers": [v.to_json(show_patient) for v in views]})
        return
    if not views:
        info("no transfers" + (" match" if filters or since else ""))
        return
    table = Table(show_lines=False, header_style="bold")
    for column in (
        "ID",
        "Set",
        "Status",
        "Created",
        "Recipient",
        "Parts sent",
        "Acknowledged",
        "Images",
        "Transfer time",
        "Error",
    ):
        table.add_column(column, no_wrap=column in ("Set", "Created"))
    if show_patient:
        table.add_column("Patient")
        table.add_column("Study")
    for view in views:
        style = _STYLE.get(view.status, "")
        row = [
            str(view.id),
            view.set_id,
            f"[{style}]{view.status}[/{style}]" if style else view.status,
            _when(view.created_at),
            echo_escape(view.recipient),
            f"{view.parts_sent}/{view.set_total}",
            f"{view.parts_acknowledged}/{view.set_total}",
            str(view.images) if view.images is not None else str(view.files),
            _duration(view.transfer_seconds),
            echo_escape(view.error or ""),
        ]
        if show_patient:
            row += [echo_escape(view.patient_name or "-"), echo_escape(view.study_description or "-")]
        table.add_row(*row)
    out.print(table)


def _show_one(detail: TransferDetail, show_patient: bool) -> None:
    view, events, report = detail.transfer, detail.timeline, detail.final_report
    style = _STYLE.get(view.status, "")
    out.print(
        f"[bold]set {view.set_id}[/bold] (transfer {view.id}) to {echo_escape(view.recipient)}: "
        + (f"[{style}]{view.status}[/{style}]" if style else view.status)
    )
    out.print(
        f"  {view.set_total} part(s), {view.mails} mail(s), {view.files} file(s), {format_size(view.bytes)}"
        + (f", {view.images} image(s)" if view.images is not None else "")
    )
    if show_patient:
        out.print(
            f"  patient: {echo_escape(view.patient_name or '-')}; study: {echo_escape(view.study_description or '-')}"
        )
    out.print(
        f"  created {_when(view.created_at)}; first mail sent {_when(view.first_sent_at)}; "
        f"parts acknowledged {view.parts_acknowledged}/{view.set_total}"
    )
    if view.transfer_seconds is not None:
        out.print(
            f"  transfer time {_duration(view.transfer_seconds)} (first mail handed to SMTP until the "
            "receiver's final notification)"
        )
    if report is not None:

        def field(name: str) -> str:
            value = report.get(name) if report is not None else None
            return "-" if value is None else str(value)

        out.print(
            f"  receiver: {field('files')} file(s), {field('dicom_instances')} DICOM instance(s) forwarded; "
            f"first part received {field('first_received_at')}, verified {field('verified_at')}, "
            f"forwarded {field('forwarded_at')}"
        )
    if view.error:
        out.print(f"  [red]error:[/red] {echo_escape(view.error)}")
    table = Table(header_style="bold")
    for column in ("Time", "Part", "Event", "Detail"):
        table.add_column(column)
    for event in events:
        table.add_row(_when(event.at), str(event.set_part or "-"), event.event, echo_escape(event.detail))
    out.print(table)


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


@transfers.command()
@click.argument("ident")
@click.option("--yes", is_flag=True, help="Do not ask (for scripts).")
@pass_app
@handle_errors
def retry(app: AppContext, ident: str, yes: bool) -> None:
    """Queue a failed, expired or cancelled transfer again (its unacknowledged parts)."""
    change = app.site.retry(ident, confirm=_asker(
        lambda v: f"Send the unacknowledged parts of set {v.set_id} ({v.status}) to {v.recipient} again?", yes))
    info(
        f"{change.mails_queued} mail(s) of set {change.transfer.set_id} queued again; they go out with "
        "`dicommail send --pending` or the running `dicommail receive`"
    )


@transfers.command()
@click.argument("ident")
@click.option("--yes", is_flag=True, help="Do not ask (for scripts).")
@pass_app
@handle_errors
def cancel(app: AppContext, ident: str, yes: bool) -> None:
    """Stop an active transfer: mails not yet sent stay unsent; later notifications change nothing."""
    change = app.site.cancel(ident, confirm=_asker(
        lambda v: f"Cancel set {v.set_id} ({v.status}, {v.parts_sent}/{v.set_total} part(s) sent) to {v.recipient}?",
        yes,
    ))
    info(f"set {change.transfer.set_id} cancelled")


@transfers.command()
@click.argument("ident")
@click.option("--yes", is_flag=True, help="Do not ask (for scripts).")
@pass_app
@handle_errors
def delete(app: AppContext, ident: str, yes: bool) -> None:
    """Remove a finished transfer, its records and its mails in the outbox."""
    change = app.site.delete(ident, confirm=_asker(
        lambda v: f"Delete set {v.set_id} ({v.status}) and its {v.mails} mail(s) from the outbox?", yes))
    info(f"set {change.transfer.set_id} deleted ({change.files_removed} file(s) removed)")


COMMANDS: list[click.Command] = [status, transfers]
