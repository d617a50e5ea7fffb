"""``dicommail receive``: fetch, verify and forward incoming studies."""

from __future__ import annotations

import asyncio
import dataclasses

import click

from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import handle_errors, out, print_json, setup_logging
from dicommail.crypto.gpg import Keyring
from dicommail.receiver.daemon import CycleReport, Receiver, crash_hook_from_env, receiver_lock
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database


@click.command()
@click.option("--once", is_flag=True, help="Run one cycle and exit (for cron or a systemd timer).")
@click.option("--interval", type=click.IntRange(1, 86400), help="Seconds between polls (default: receiver.interval).")
@click.option("-v", "--verbose", count=True, help="Log debugging detail.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print the cycle's result as JSON.")
@pass_app
@handle_errors
def receive(app: AppContext, once: bool, interval: int | None, verbose: int, as_json: bool) -> None:
    """Poll the mailbox, verify incoming sets and forward complete studies to the PACS."""
    # Imported here: pynetdicom and aioimaplib load slowly and only this command needs them.
    from dicommail.receiver.destinations import make_destination
    from dicommail.receiver.retrievers import make_retriever

    config = app.config
    if interval is not None:
        config = dataclasses.replace(config, receiver=dataclasses.replace(config.receiver, interval=interval))
    setup_logging(verbose)
    with receiver_lock(config.home):
        db = Database(config.state_db)
        keyring = Keyring(config.gnupg_home)
        try:
            spool = Spool(config.spool)
            retriever = make_retriever(config, db, spool)
            receiver = Receiver(config, retriever, make_destination(config), db, keyring, crash_hook_from_env())

            async def main() -> CycleReport | None:
                receiver.install_signal_handlers()
                try:
                    if once:
                        return await receiver.cycle()
                    await receiver.run_forever()
                    return None
                finally:
                    await retriever.close()

            report = asyncio.run(main())
        finally:
            keyring.close()
            db.close()
    if report is None:
        return
    if as_json:
        print_json(
            {
                "ok": report.fetch_error is None,
                "sets": report.sets,
                "quarantined_mails": report.quarantined,
                "fetch_error": report.fetch_error.message if report.fetch_error else None,
            }
        )
    else:
        summary = ", ".join(f"{n} {status}" for status, n in sorted(report.sets.items())) or "none"
        out.print(f"sets: {summary}; quarantined mails: {report.quarantined}")
    if report.fetch_error is not None:
        raise report.fetch_error
