"""``dicommail receive``: fetch, verify and forward incoming studies."""

from __future__ import annotations

import logging

import click

from dicommail.cli.logs import log_options
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.packing import ProgressBars
from dicommail.cli.render import handle_errors, info, out, print_json


@click.command()
@click.option("--once", is_flag=True, help="Run one cycle and exit (for cron or a systemd timer).")
@click.option("--interval", type=click.IntRange(1, 86400), help="Seconds between polls (default: receiver.interval).")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the cycle's result as JSON.")
@log_options
@pass_app
@handle_errors
def receive(app: AppContext, once: bool, interval: int | None, as_json: bool) -> None:
    """Poll the mailbox, verify incoming sets and forward complete studies to the PACS.

    On a terminal, a bar shows each set's instances as they go to the PACS
    (not with --json or -q).
    """
    import asyncio  # here: the other commands need no event loop

    if as_json and not once:
        raise click.UsageError("--json needs --once: the daemon prints no document, it logs")

    site = app.site
    # -q (or --log-level warning) asks for problems only: no bars either.
    quiet = as_json or logging.getLogger("dicommail").getEffectiveLevel() > logging.INFO
    with ProgressBars(quiet) as bars:
        report = asyncio.run(site.receive(once=once, interval=interval, handle_signals=True, progress=bars))
    if report is None:
        return
    if as_json:
        print_json(report.to_json())
    else:
        summary = ", ".join(f"{n} {status}" for status, n in sorted(report.sets.items())) or "none"
        # All of this home's sets, not only this cycle's: what stands, as `inbox` lists it.
        out.print(f"sets in this home: {summary}; quarantined mails: {report.quarantined}", markup=False)
    if report.fetch_error is not None:
        raise report.fetch_error  # on stderr; the JSON document above already says ok=false and why
    if report.processing_error is not None:
        raise report.processing_error  # a timer's unit fails: `systemctl --failed` shows it
    if report.interrupted:
        info("interrupted: the rest is done by the next run")
        raise SystemExit(143)  # as a shell reports a command ended by SIGTERM


COMMANDS: list[click.Command] = [receive]
