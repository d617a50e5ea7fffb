"""``quarantine list|show|retry|purge``: what the receiver put aside, and putting it back."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click

from dicommail.cli.inbox import age, local_time, output_width, table, wrapped
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import confirm, handle_errors, info, print_json
from dicommail.errors import InputError
from dicommail.site.tracking import QuarantinedItem

_JSON = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group()
def quarantine() -> None:
    """Mails and sets the receiver could not process, kept (encrypted) with the reason."""


@quarantine.command("list")
@_JSON
@pass_app
@handle_errors
def list_items(app: AppContext, as_json: bool) -> None:
    """List quarantined items, newest first, with their reason."""
    items = app.site.quarantine()
    if as_json:
        print_json({"ok": True, "items": [item.to_json() for item in items]})
        return
    if not items:
        info("the quarantine is empty")
        return
    now = datetime.now(UTC)
    rows = [(item.name, [item.code, age(item.quarantined_at, now), str(len(item.mails))], [item.message])
            for item in items]
    click.echo("\n".join(table("NAME", ["REASON", "AGE", "MAILS"], rows, output_width(), shrink=0)))


@quarantine.command()
@click.argument("name")
@_JSON
@pass_app
@handle_errors
def show(app: AppContext, name: str, as_json: bool) -> None:
    """Show one item: the reason, what to do, when, and its mails.

    NAME is the item's folder name, or its end (e.g. mail-12).
    """
    item = app.site.quarantined(name)
    if as_json:
        print_json({"ok": True, "item": item.to_json()})
        return
    width = output_width()
    facts = [
        f"reason: {item.code}: {item.message}",
        f"hint: {item.hint or '-'}",
        f"quarantined {local_time(item.quarantined_at)} ({age(item.quarantined_at)} ago)",
    ]
    if item.set_id:
        facts.append(f"set {item.set_id}")
    if item.detail:
        facts.append(f"detail (may quote the mail): {item.detail}")
    facts.append(f"folder {item.path}")
    lines = wrapped(item.name, width, "")
    lines += [part for fact in facts for part in wrapped(fact, width, "  ")]
    lines.append(f"  {len(item.mails)} mail(s), as they arrived (encrypted):")
    lines += [part for mail in item.mails for part in wrapped(mail.name, width, "    ")]
    click.echo("\n".join(lines))


@quarantine.command()
@click.argument("name")
@_JSON
@pass_app
@handle_errors
def retry(app: AppContext, name: str, as_json: bool) -> None:
    """Put an item back into the receiver's pipeline (e.g. after `keys certify` of its signer).

    The next `dicommail receive` cycle processes its mails again; if they
    fail again, they come back to the quarantine with the new reason.
    """
    change = app.site.retry_quarantined(name)
    if as_json:
        print_json(change.to_json())
        return
    [item] = change.items
    what = f"set {item.set_id}: " if change.sets_reset else ""
    info(f"{what}{change.mails_requeued} mail(s) of {item.name} stored again; the next `dicommail receive` "
         "cycle processes them")


@quarantine.command()
@click.argument("name", required=False)
@click.option("--older-than", "days", type=click.FloatRange(min=0), metavar="DAYS",
              help="Only items quarantined more than DAYS days ago.")
@click.option("--yes", is_flag=True, help="Do not ask (for scripts).")
@_JSON
@pass_app
@handle_errors
def purge(app: AppContext, name: str | None, days: float | None, yes: bool, as_json: bool) -> None:
    """Remove quarantined items: NAME, those older than --older-than DAYS, or all."""
    if name is not None and days is not None:
        raise click.UsageError("give NAME or --older-than, not both")

    def ask(items: list[QuarantinedItem]) -> bool:
        question = (f"Remove {items[0].name} from the quarantine?" if len(items) == 1
                    else f"Remove {len(items)} items from the quarantine?")
        if not confirm(question, yes):
            raise InputError("not confirmed; nothing was changed", "answer yes on a terminal, or pass --yes in scripts")
        return True

    older = timedelta(days=days) if days is not None else None
    change = app.site.purge_quarantine(name, older_than=older, confirm=ask)
    if as_json:
        print_json(change.to_json())
        return
    info(f"removed {len(change.items)} item(s) from the quarantine")


COMMANDS: list[click.Command] = [quarantine]
