"""``constancy run|list|report``: DIN 6868-159 constancy checks of teleradiology links."""

from __future__ import annotations

import re
from pathlib import Path

import click
from rich import box
from rich.table import Table

from dicommail import ConstancyCheck, ProgressUpdate
from dicommail.cli.logs import log_options
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.packing import ProgressBars
from dicommail.cli.render import (
    EXIT_FAILURE,
    echo_escape,
    handle_errors,
    info,
    out,
    print_json,
    since_option,
)
from dicommail.constancy.values import KINDS
from dicommail.errors import InputError

#: sysexits.h EX_TEMPFAIL: no result yet (still pending after --wait); a later run, list or the daemon finishes it.
EXIT_PENDING = 75

_STYLE = {"passed": "green", "failed": "red", "pending": "yellow"}
_MONTH_RE = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("yes" if value else "[red]NO[/red]")


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _result(check: ConstancyCheck) -> str:
    style = _STYLE.get(check.result, "")
    return f"[{style}]{check.result}[/{style}]" if style else check.result


class _Progress:
    """Bars for packing and sending; one line when waiting for the receipt begins."""

    def __init__(self, bars: ProgressBars, quiet: bool) -> None:
        self._bars = bars
        self._quiet = quiet
        self._waiting = False

    def __call__(self, update: ProgressUpdate) -> None:
        if update.task != "waiting":
            self._waiting = False
            self._bars(update)
        elif not self._waiting:
            self._waiting = True
            self._bars.close()
            if not self._quiet and update.total:
                info(f"waiting up to {update.total} s for the receipt")


@click.group()
def constancy() -> None:
    """DIN 6868-159 constancy checks of teleradiology links: run them, list them, document a month."""


@constancy.command("run")
@click.option("--to", "to", default="", help="The peer to check (default: each of [constancy] peers).")
@click.option("--kind", type=click.Choice(KINDS), default="daily", show_default=True,
              help="daily: function; monthly: transfer time, completeness, quality; acceptance: reference values.")
@click.option("--dataset", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A folder with one study to send (default [constancy] dataset, else a synthetic CT).")
@click.option("--wait", type=click.FloatRange(min=0), default=None,
              help="Seconds to wait for the receipt (default: the time limit); 0 returns at once (exit 75).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@log_options
@pass_app
@handle_errors
def run(app: AppContext, to: str, kind: str, dataset: Path | None, wait: float | None, as_json: bool) -> None:
    """Send the test data set, wait for the receiver's receipt, record and show the result.

    Exit status: 0 passed; 1 failed (logged as an ERROR, mailed to
    [constancy] admin_address if set); 75 no result yet (pending after
    --wait: a later run, `constancy list` or `dicommail receive` finishes it).
    """
    site = app.site
    peers = [to] if to else list(site.config.constancy.peers)
    if not peers:
        raise click.UsageError("give --to, or list the peers to check in [constancy] peers")
    checks: list[ConstancyCheck] = []
    for peer in peers:
        with ProgressBars(as_json) as bars:
            checks.append(site.constancy_run(peer, kind=kind, dataset=dataset, wait=wait,
                                             progress=_Progress(bars, as_json)))
    if as_json:
        print_json({"ok": all(c.passed for c in checks), "checks": [c.to_json() for c in checks]})
    else:
        for check in checks:
            _print_check(check)
    if any(c.result == "failed" for c in checks):
        raise SystemExit(EXIT_FAILURE)
    if any(c.pending for c in checks):
        raise SystemExit(EXIT_PENDING)


def _print_check(check: ConstancyCheck) -> None:
    out.print(
        f"constancy check {check.id} ({check.kind}, attempt {check.attempt}) to {echo_escape(check.peer)}: "
        f"{_result(check)}"
    )
    out.print(
        f"  transfer time {_seconds(check.transfer_time_s)} s (limit {check.limit_s} s); complete "
        f"{_flag(check.complete)}; header entries {_flag(check.headers_ok)}; image quality {_flag(check.quality_ok)}"
    )
    if check.reason:
        out.print(f"  {echo_escape(check.reason)}")
    if check.pending:
        out.print("  no receipt yet: `dicommail constancy list` shows the result once `dicommail receive` has it")


@constancy.command("list")
@click.option("--since", help="Only checks started on or after this date (ISO 8601, local time; YYYY-MM: that month).")
@click.option("--to", "to", default=None, help="Only checks of this peer.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
@pass_app
@handle_errors
def list_(app: AppContext, since: str | None, to: str | None, as_json: bool) -> None:
    """One row per recorded check: kind, attempt, transfer time, per-criterion results, result."""
    checks = app.site.constancy_checks(since=since_option(since), to=to)
    if as_json:
        print_json({"ok": True, "checks": [c.to_json() for c in checks]})
        return
    if not checks:
        info("no constancy checks" + (" match" if since or to else " recorded yet"))
        return
    # Narrow columns (reasons below the table): the list must stay readable in an 80-column terminal.
    table = Table(header_style="bold", box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 1))
    for column in ("ID", "Started", "Kind", "Peer", "Try", "Time/limit s", "Compl", "Hdrs", "Qual", "Result"):
        table.add_column(column, no_wrap=column != "Peer", overflow="fold", min_width=12 if column == "Peer" else None)
    for c in checks:
        table.add_row(
            str(c.id), c.started_at.strftime("%Y-%m-%d %H:%M"), c.kind, echo_escape(c.peer), str(c.attempt),
            f"{_seconds(c.transfer_time_s)}/{c.limit_s}", _flag(c.complete), _flag(c.headers_ok),
            _flag(c.quality_ok), _result(c),
        )
    out.print(table)
    for c in checks:
        if c.reason:
            out.print(f"{c.id}: {echo_escape(c.reason)}")


@constancy.command("report")
@click.option("--month", required=True, help="The month to document, YYYY-MM.")
@click.option("--to", "to", default=None, help="Only checks of this peer (default: all peers).")
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The PDF to write; its detached signature goes to OUTPUT.asc.")
@click.option("--json", "as_json", is_flag=True, help="Print a summary as JSON.")
@pass_app
@handle_errors
def report(app: AppContext, month: str, to: str | None, output: Path, as_json: bool) -> None:
    """Write the month's constancy documentation as a PDF, signed by this site's key (OUTPUT.asc)."""
    if not _MONTH_RE.match(month):
        raise InputError(f"--month {month!r} is not a month", "use YYYY-MM, e.g. 2026-11")
    result = app.site.constancy_report(month, output, to=to)
    if as_json:
        print_json({"ok": True, **result.to_json()})
        return
    info(f"wrote {result.pdf} and its signature {result.signature}")
    out.print(
        f"{result.month}: {result.checks} check(s), {result.passed} passed, {result.failed} failed"
        + (f", {result.pending} pending" if result.pending else "")
        + f"; {len(result.days_without_passed_daily)} of {result.working_days} working day(s) without a passed "
        "daily check"
    )


COMMANDS: list[click.Command] = [constancy]
