"""``dicommail cleanup``: remove the spool's files of finished work after ``[retention]``'s days."""

from __future__ import annotations

import click

from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import EXIT_FAILURE, handle_errors, info, print_json
from dicommail.config import format_size
from dicommail.site.operations import CleanupReport

_ROW = "{:<15}{:>10}{:>8}{:>13}"


def _kept(days: int) -> str:
    return "for ever" if days <= 0 else f"{days} day{'s' if days != 1 else ''}"


def _table(report: CleanupReport) -> list[str]:
    lines = [_ROW.format("kind", "kept", "files", "size")]
    lines.extend(_ROW.format(c.kind, _kept(c.days), c.files, format_size(c.bytes)) for c in report.counts)
    verb = "would remove" if report.dry_run else "removed"
    lines.append(f"{verb} {report.files} file(s), {format_size(report.bytes)}"
                 + ("; nothing was removed (dry run)" if report.dry_run else "; the records in state.db stay"))
    return lines


@click.command()
@click.option("--dry-run", is_flag=True, help="Only show what would be removed now.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@pass_app
@handle_errors
def cleanup(app: AppContext, dry_run: bool, as_json: bool) -> None:
    """Remove mails of delivered or cancelled transfers, fetched mails of finished sets and sent acknowledgements.

    After the days of [retention] in dicommail.toml (and the quarantine after
    receiver.quarantine_days).  The records in state.db stay.  The running
    receiver and gateway do this once an hour; exit status 1 if a file could
    not be removed.
    """
    report = app.site.cleanup(dry_run=dry_run)
    if as_json:
        print_json(report.to_json())
    else:
        click.echo("\n".join(_table(report)))
        for error in report.errors:
            info(f"cannot remove {error}")
    if report.errors:
        raise SystemExit(EXIT_FAILURE)


COMMANDS: list[click.Command] = [cleanup]
