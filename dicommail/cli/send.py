"""``send``: pack studies into the outbox and submit them over SMTP; ``send --pending`` retries."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import click
from rich.table import Table
from rich.text import Text

from dicommail import TransferResult
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.packing import ProgressBars, ScanTally, packing_options
from dicommail.cli.render import (
    EXIT_FAILURE,
    error_document,
    handle_errors,
    info,
    os_error,
    out,
    print_error,
    print_json,
    warn,
)
from dicommail.errors import DicommailError

#: sysexits.h EX_TEMPFAIL: the study is queued and will be retried; cron and scripts know this code.
EXIT_TEMPFAIL = 75


@click.command()
@click.argument("paths", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--to", "recipient", default="", help="Recipient's mail address (their key must be certified).")
@packing_options
@click.option(
    "--pending",
    is_flag=True,
    help="Send what is queued and due for another try (no PATHS; for cron).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
@handle_errors
def send(
    app: AppContext,
    paths: tuple[Path, ...],
    recipient: str,
    sender: str,
    max_mail_size: int | None,
    note: str,
    attachments: tuple[Path, ...],
    emergency: bool,
    strict: bool,
    pending: bool,
    as_json: bool,
) -> None:
    """Send DICOM files or folders as DICOM-Mail sets over SMTP (one set per study).

    Each set is packed into the outbox, queued and then sent mail by mail.
    Files that are not DICOM, or are truncated or damaged, are skipped with a
    warning; --strict refuses the whole job instead (nothing is sent).
    Exit status: 0 all sent; 75 some mails wait for a retry (run
    `dicommail send --pending`, e.g. from cron); 1 a failure that needs you.
    """
    if pending:
        if paths or recipient or note or attachments or emergency or max_mail_size or strict:
            raise click.UsageError("--pending takes no PATHS and no packing options")
    elif not paths:
        raise click.UsageError("give DICOM files or folders to send, or --pending to retry the outbox")
    elif not recipient:
        raise click.UsageError("--to is required when sending PATHS")
    site = app.site
    tally = ScanTally(strict)
    try:
        with ProgressBars(as_json) as bars:

            def waiting() -> None:
                bars.close()  # the packing bar, if it is still shown
                info("waiting for another process sending from this home to finish")

            if pending:
                results = site.send_pending(sender=sender, progress=bars, on_wait=waiting)
            else:
                results = site.send(
                    list(paths),
                    recipient,
                    sender=sender,
                    note=note,
                    attachments=attachments,
                    emergency=emergency,
                    max_mail_size=max_mail_size,
                    progress=bars,
                    on_wait=waiting,
                    on_skip=tally.skip,
                    strict=strict,
                    on_found=tally.found,
                )
    except (DicommailError, OSError) as exc:
        error = exc if isinstance(exc, DicommailError) else os_error(exc)
        queued = error.queued_transfers
        if as_json:
            # Packed only if the sets were queued before the error.
            counts = _counts(tally, pending, packed=bool(queued))
            print_json({"ok": False, "error": error_document(error), **counts})
        if queued:
            info(
                f"{len(queued)} set(s) stay queued in the outbox; once this is fixed, "
                "send them with: dicommail send --pending"
            )
        raise
    if as_json:
        print_json({"ok": all(r.done for r in results), **_counts(tally, pending),
                    "sets": [r.to_json() for r in results]})
    else:
        _print_results(results, None if pending else tally)
    if any(r.status == "failed" for r in results):
        raise SystemExit(EXIT_FAILURE)
    if any(r.waiting for r in results):
        raise SystemExit(EXIT_TEMPFAIL)


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _counts(tally: ScanTally, pending: bool, packed: bool = True) -> dict[str, object]:
    """The scan's counts for the JSON document; null with --pending, which packs nothing."""
    if pending:
        return {"packed": None, "bytes": None, "skipped": None, "skipped_files": None}
    return tally.to_json(packed)


def _print_results(results: list[TransferResult], tally: ScanTally | None) -> None:
    if not results:
        info("nothing to send")
        return
    # No borders: a set ID (up to 44 characters) stays whole in 80 columns.  One recipient (the
    # usual case) goes into the line below; several get a column of their own, folded if need be.
    recipients = sorted({r.recipient for r in results})
    table = Table(box=None, pad_edge=False)
    table.add_column("set", no_wrap=True)
    table.add_column("mails sent", justify="right")
    table.add_column("status")
    if len(recipients) > 1:
        table.add_column("to", overflow="fold")
    styles = {"sent": "green", "failed": "red", "queued": "yellow"}
    for r in results:
        status = r.status if r.status in ("sent", "failed") else "queued"
        cells: list[str | Text] = [r.set_id, f"{r.mails_sent}/{r.mails}", f"[{styles[status]}]{status}[/]"]
        table.add_row(*cells, *([Text(r.recipient)] if len(recipients) > 1 else []))
    out.print(table)
    to = f"to {recipients[0]}" if len(recipients) == 1 else f"to {len(recipients)} recipients"
    out.print(f"{tally.summary()}; {to}" if tally is not None else to, markup=False)
    waiting = [r for r in results if r.waiting]
    for r in results:
        if r.status == "failed":
            print_error(f"set {r.set_id} failed: {r.error or 'unknown'}", r.hint or "")
        elif r.waiting:
            reason = f": {r.error}" if r.error else ""
            warn(f"set {r.set_id} is not sent completely{reason}")
    if waiting:
        first = min((r.next_attempt_at or 0) for r in waiting)
        warn(
            f"{len(waiting)} set(s) are queued and will be retried with `dicommail send --pending` "
            f"(next attempt due {_when(first)}); run it from cron, e.g. every 5 minutes"
        )
    sent = sum(r.sent_now for r in results)
    if sent:
        info(f"{sent} mail(s) handed to the SMTP server")


COMMANDS: list[click.Command] = [send]
