"""``send``: pack studies into the outbox and submit them over SMTP; ``send --pending`` retries."""

from __future__ import annotations

import asyncio
import functools
import sqlite3
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.packing import byte_progress, find_studies, pack_studies, packing_options
from dicommail.cli.render import EXIT_FAILURE, echo_escape, err, handle_errors, info, out, print_json, warn
from dicommail.config import Config, is_mail_address
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import own_key
from dicommail.dicom import DicomFile
from dicommail.errors import ConfigError, DicommailError, InputError
from dicommail.sender.outbox import (
    OutboundMail,
    TransferResult,
    queue_set,
    send_pending,
    sender_lock,
    transfer_mails,
    transfer_result,
)
from dicommail.sender.packing import pack_options, sender_address
from dicommail.sender.tracking import record_study_details
from dicommail.store.db import Database
from dicommail.transport.smtp import SmtpClient
from dicommail.wire.pack import PackedSet

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
    pending: bool,
    as_json: bool,
) -> None:
    """Send DICOM files or folders as DICOM-Mail sets over SMTP (one set per study).

    Each set is packed into the outbox, queued and then sent mail by mail.
    Exit status: 0 all sent; 75 some mails wait for a retry (run
    `dicommail send --pending`, e.g. from cron); 1 a failure that needs you.
    """
    if pending:
        if paths or recipient or note or attachments or emergency or max_mail_size:
            raise click.UsageError("--pending takes no PATHS and no packing options")
    elif not paths:
        raise click.UsageError("give DICOM files or folders to send, or --pending to retry the outbox")
    elif not recipient:
        raise click.UsageError("--to is required when sending PATHS")
    config = app.config
    # Checked before packing, which may take long: a bad [smtp] section fails at once.
    client = SmtpClient.from_config(config)
    db = Database(config.state_db)
    try:
        transfer_ids: list[int] | None = None
        if pending:
            sender = sender or config.identity.address or _own_address(config)
        else:
            studies: dict[str, list[DicomFile]] = {}
            sender, sets = _pack(
                config, paths, recipient, sender, max_mail_size, note, attachments, emergency, as_json, studies
            )
            # What each transfer holds (images, patient, study) is remembered locally, for `dicommail status`.
            transfer_ids = [
                queue_set(db, packed, on_queued=functools.partial(_remember, studies.get(packed.study_uid, [])))
                for packed in sets
            ]
        if not is_mail_address(sender):
            raise ConfigError("no sender address", "set identity.address in dicommail.toml or pass --from")
        try:
            results = _send(db, client, config, sender, transfer_ids, as_json)
        except DicommailError:
            if transfer_ids:
                info(
                    f"{len(transfer_ids)} set(s) stay queued in the outbox; once this is fixed, "
                    "send them with: dicommail send --pending"
                )
            raise
        if as_json:
            shown = [_result_json(r, transfer_mails(db, r.transfer_id)) for r in results]
            print_json({"ok": all(r.done for r in results), "sets": shown})
    finally:
        db.close()
    if not as_json:
        _print_results(results)
    if any(r.status == "failed" for r in results):
        raise SystemExit(EXIT_FAILURE)
    if any(r.waiting for r in results):
        raise SystemExit(EXIT_TEMPFAIL)


def _remember(files: list[DicomFile], conn: sqlite3.Connection, transfer_id: int) -> None:
    record_study_details(conn, transfer_id, files)


def _own_address(config: Config) -> str:
    keyring = Keyring(config.gnupg_home)
    try:
        return own_key(keyring, config.identity.key).email
    finally:
        keyring.close()


def _pack(
    config: Config,
    paths: tuple[Path, ...],
    recipient: str,
    sender: str,
    max_mail_size: int | None,
    note: str,
    attachments: tuple[Path, ...],
    emergency: bool,
    as_json: bool,
    studies_out: dict[str, list[DicomFile]] | None = None,
) -> tuple[str, list[PackedSet]]:
    """Pack each study into the outbox spool; on failure leave no mails of this run behind."""
    if not is_mail_address(recipient):
        raise InputError(f"--to {recipient!r} is not a mail address")
    keyring = Keyring(config.gnupg_home)
    sets: list[PackedSet] = []
    try:
        me = own_key(keyring, config.identity.key)
        sender = sender_address(config, me, sender)
        studies = find_studies(paths, "send")
        options = pack_options(
            config,
            me,
            sender,
            recipient,
            note=note,
            attachments=attachments,
            emergency=emergency,
            max_mail_size=max_mail_size,
        )
        if studies_out is not None:
            studies_out.update(studies)
        pack_studies(keyring, options, studies, config.spool / "outbox", sets, quiet=as_json)
    except BaseException:
        # Nothing is queued yet: mails packed so far would only be orphans.
        for packed in sets:
            for mail in packed.mails:
                mail.path.unlink(missing_ok=True)
        raise
    finally:
        keyring.close()
    return sender, sets


def _send(
    db: Database,
    client: SmtpClient,
    config: Config,
    sender: str,
    transfer_ids: list[int] | None,
    as_json: bool,
) -> list[TransferResult]:
    # Only for the progress bar: what may go out in this run.
    rows = db.query(
        "SELECT m.transfer_id, m.size FROM outbound_mails m JOIN transfers t ON t.id = m.transfer_id"
        " WHERE m.status = 'queued' AND t.status IN ('queued', 'sending')"
    )
    queued = sum(row["size"] for row in rows if transfer_ids is None or row["transfer_id"] in transfer_ids)
    with (
        sender_lock(config.spool / "outbox", on_wait=lambda: info("waiting for another dicommail send to finish")),
        byte_progress(as_json, queued) as progress,
    ):
        task = progress.add_task("sending", total=queued)
        results = asyncio.run(
            send_pending(
                db,
                lambda: client,
                sender=sender,
                max_attempts=config.smtp.max_attempts,
                transfer_ids=transfer_ids,
                progress=lambda n: progress.advance(task, n),
            )
        )
    if transfer_ids is None:
        return results
    # Another run may have sent some of ours while we waited for the lock: report them all.
    by_id = {r.transfer_id: r for r in results}
    return [by_id.get(i) or transfer_result(db, i) for i in transfer_ids]


def _when(timestamp: float | None) -> str:
    if timestamp is None:
        return "-"
    return datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def _result_json(result: TransferResult, mails: list[OutboundMail]) -> dict[str, Any]:
    # Shaped like ``pack --json`` (a "mails" list), plus the sending state.
    return {
        "set_id": result.set_id,
        "recipient": result.recipient,
        "status": result.status,
        "set_total": result.set_total,
        "mails": [
            {
                "path": str(m.path),
                "set_part": m.set_part,
                "message_id": m.message_id,
                "size": m.size,
                "fragment": m.fragment,
                "fragments": m.fragments,
                "status": m.status,
                "attempts": m.attempts,
                "sent_at": m.sent_at,
                "error": m.last_error,
            }
            for m in mails
        ],
        "mails_sent": result.mails_sent,
        "sent_now": result.sent_now,
        "error": result.error,
        "hint": result.hint or None,
        "next_attempt_at": result.next_attempt_at,
    }


def _print_results(results: list[TransferResult]) -> None:
    if not results:
        info("nothing to send")
        return
    for r in results:
        status = {"sent": "[green]sent[/green]", "failed": "[red]failed[/red]"}.get(r.status, "[yellow]queued[/yellow]")
        out.print(f"{r.set_id}  {r.mails_sent}/{r.mails} mail(s) sent to {echo_escape(r.recipient)}  {status}")
    waiting = [r for r in results if r.waiting]
    for r in results:
        if r.status == "failed":
            err.print(f"[bold red]error:[/bold red] set {r.set_id} failed: {echo_escape(r.error or 'unknown')}")
            if r.hint:
                err.print(f"[dim]hint:[/dim] {echo_escape(r.hint)}")
        elif r.waiting:
            reason = f": {echo_escape(r.error)}" if r.error else ""
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
