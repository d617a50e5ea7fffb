"""``dicommail stats``: transfers sent and sets received per peer, month or route."""

from __future__ import annotations

import csv
import io
from datetime import datetime

import click

from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import format_duration, handle_errors, parse_moment, print_json
from dicommail.config import format_size
from dicommail.site.operations import StatsFigures, StatsReport

# Figures right-aligned after an indented direction label: 66 columns, whatever the group's name.
_ROW = "  {:<10}{:>7}{:>8}{:>12}{:>8}{:>10}{:>9}"


def _moment(ctx: click.Context, param: click.Parameter, value: str | None) -> datetime | None:
    """An ISO 8601 date or time (local unless it names an offset), or a month (YYYY-MM: its first day)."""
    if value is None:
        return None
    try:
        return parse_moment(value)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a date; use e.g. 2026-11, 2026-11-23 or 2026-11-23T08:00",
                                 ctx=ctx, param=param) from None


def _line(label: str, figures: StatsFigures) -> str:
    return _ROW.format(label, figures.transfers, figures.images, format_size(figures.bytes), figures.failures,
                       format_duration(figures.median_seconds, compact=True),
                       format_duration(figures.p95_seconds, compact=True))


def _period(report: StatsReport) -> str:
    since = report.since.strftime("%Y-%m-%d %H:%M") if report.since is not None else "the start"
    until = report.until.strftime("%Y-%m-%d %H:%M") if report.until is not None else "now"
    return f"by {report.by}, from {since} until {until}"


def _table(report: StatsReport) -> list[str]:
    """The report in at most 80 columns: each group's name on a line of its own, then its figures."""
    lines = [_period(report), _ROW.format("", "Sets", "Images", "Size", "Failed", "Median", "p95")]
    for group in (*report.groups, report.total):
        lines.append(group.key)
        shown = [(label, figures) for label, figures in (("sent", group.sent), ("received", group.received))
                 if figures.transfers or group is report.total]
        lines.extend(_line(label, figures) for label, figures in shown)
    return lines


def _csv(report: StatsReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(report.csv_header())
    writer.writerows(report.csv_rows())
    return buffer.getvalue()


@click.command()
@click.option("--since", callback=_moment, help="From this date on (ISO 8601, local time; YYYY-MM: that month).")
@click.option("--until", callback=_moment, help="Before this date (exclusive; same forms as --since).")
@click.option("--by", type=click.Choice(["peer", "month", "route"]), default="peer", show_default=True,
              help="Group by peer (recipient or sender), month (local time) or gateway route.")
@click.option("--json", "as_json", is_flag=True, help="Print the statistics as one JSON document.")
@click.option("--csv", "as_csv", is_flag=True, help="Print a header row and one CSV row per group.")
@pass_app
@handle_errors
def stats(app: AppContext, since: datetime | None, until: datetime | None, by: str, as_json: bool,
          as_csv: bool) -> None:
    """Transfers sent and sets received, images, bytes, failures and transfer times per peer, month or route.

    Sent: transfers by when they were created; time from the first mail handed
    to SMTP until the receiver's final notification.  Received: sets by when
    their first part arrived; time from the first mail fetched until delivery.
    Times are of delivered ones (median and 95th percentile); sizes are the
    mails on the wire.  Constancy check test sets are left out.
    """
    if as_json and as_csv:
        raise click.UsageError("--json and --csv exclude each other")
    report = app.site.stats(since=since, until=until, by=by)
    if as_json:
        print_json(report.to_json())
    elif as_csv:
        click.echo(_csv(report), nl=False)
    else:
        click.echo("\n".join(_table(report)))


COMMANDS: list[click.Command] = [stats]
