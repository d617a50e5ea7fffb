"""``dicommail check``: config, keys, mail servers and PACS, in one table."""

from __future__ import annotations

import click
from rich.table import Table

from dicommail import CheckResult
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import EXIT_FAILURE, echo_escape, out, print_json
from dicommail.errors import DicommailError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@pass_app
def check(app: AppContext, as_json: bool) -> None:
    """Check that this site can run: config, own key, peers' keys, SMTP, mailbox, PACS.

    Keys must not expire within 30 days.  Exit status 1 if anything fails.
    """
    try:
        results = app.site.check()
    except DicommailError as exc:  # the config itself cannot be read: nothing else can be checked
        results = [CheckResult("config", False, exc.message, exc.hint)]
    ok = all(r.ok for r in results)
    if as_json:
        print_json({"ok": ok, "checks": [r.to_json() for r in results]})
    else:
        table = Table("check", "status", "detail")
        for r in results:
            status = "[green]ok[/green]" if r.ok else "[bold red]FAILED[/bold red]"
            detail = echo_escape(r.detail) + (f"\n[dim]hint: {echo_escape(r.hint)}[/dim]" if r.hint else "")
            table.add_row(echo_escape(r.name), status, detail)
        out.print(table)
    if not ok:
        raise SystemExit(EXIT_FAILURE)


COMMANDS: list[click.Command] = [check]
