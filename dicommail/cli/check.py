"""``dicommail check``: config, secrets, keys, mail servers, PACS, gateway and acknowledgements, in one table."""

from __future__ import annotations

import click
from rich import box
from rich.table import Table
from rich.text import Text

from dicommail import CheckResult
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import EXIT_FAILURE, for_this_home, handle_errors, out, print_json
from dicommail.errors import DicommailError

#: How each status looks in the table.
_STATUS_STYLE = {"ok": ("ok", "green"), "warning": ("warning", "yellow"), "failed": ("FAILED", "bold red"),
                 "skipped": ("skipped", "dim")}
#: A fingerprint (40 hex digits) and the comma after it fit on one line of the detail column: never split.
_DETAIL_MIN_WIDTH = 41
#: Columns between two columns of the table: padding and the (blank) divider.
_GAP = 2


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@pass_app
@handle_errors
def check(app: AppContext, as_json: bool) -> None:
    """Check that this site can run: config, secret files, keys, a test signature, SMTP, mailbox, PACS, gateway.

    Every check has a row; one that does not apply says "skipped" and which
    setting would enable it.  Keys must not expire within 30 days.  Exit
    status 1 if anything failed; warnings (e.g. a password file others can
    read) exit 0.
    """
    try:
        results = app.site.check()
    except DicommailError as exc:  # the config itself cannot be read: nothing else can be checked
        results = [CheckResult("config", False, exc.message, exc.hint)]
    failed = [r for r in results if r.status == "failed"]
    warnings = [r for r in results if r.status == "warning"]
    if as_json:
        overall = "failed" if failed else "warning" if warnings else "ok"
        documents = [{**r.to_json(), "hint": for_this_home(r.hint) if r.hint else None} for r in results]
        print_json({"ok": not failed, "status": overall, "checks": documents})
    else:
        out.print(_table(results, out.width), soft_wrap=False)  # the table wraps in its cells
        out.print(_summary(results))
    if failed:
        raise SystemExit(EXIT_FAILURE)


def _table(results: list[CheckResult], width: int) -> Table:
    # Widths set here, not measured by rich: a long address in the check column must not squeeze the detail
    # column below a whole fingerprint, nor push the table past the terminal.
    status_width = max(len(label) for label, _ in _STATUS_STYLE.values())
    room = width - status_width - 2 * _GAP
    check_width = max(1, min(max(len(r.name) for r in results), room - _DETAIL_MIN_WIDTH))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, header_style="bold", pad_edge=False, padding=(0, 1),
                  collapse_padding=True)
    table.add_column("check", width=check_width, overflow="fold")
    table.add_column("status", width=status_width, no_wrap=True)
    table.add_column("detail", width=max(1, room - check_width), overflow="fold")
    for result in results:
        label, style = _STATUS_STYLE[result.status]
        detail = Text(result.detail)
        if result.hint:
            detail.append("\nhint: " + for_this_home(result.hint), style="dim")
        table.add_row(Text(result.name), Text(label, style=style), detail)
    return table


def _summary(results: list[CheckResult]) -> Text:
    counts = {status: sum(r.status == status for r in results) for status in ("failed", "warning", "skipped")}
    if not counts["failed"] and not counts["warning"]:
        text = "all checks passed" + (f" ({counts['skipped']} skipped)" if counts["skipped"] else "")
        return Text(text, style="green")
    parts = [f"{counts['failed']} failed"] if counts["failed"] else []
    if counts["warning"]:
        parts.append(f"{counts['warning']} warning{'s' if counts['warning'] > 1 else ''}")
    if counts["skipped"]:
        parts.append(f"{counts['skipped']} skipped")
    return Text(", ".join(parts), style="bold red" if counts["failed"] else "yellow")


COMMANDS: list[click.Command] = [check]
