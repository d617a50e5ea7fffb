"""``dicommail gateway``: a DICOM node the PACS pushes to; each study leaves as DICOM-Mail."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path

import click

from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import handle_errors, setup_logging
from dicommail.crypto.gpg import Keyring
from dicommail.errors import DicommailError
from dicommail.store.db import Database
from dicommail.store.files import pid_lock


class GatewayLockedError(DicommailError):
    code = "locked"


@contextlib.contextmanager
def gateway_lock(home: Path) -> Iterator[None]:
    """Hold ``<home>/gateway.lock``, or fail at once if another gateway runs for this home."""
    with pid_lock(home / "gateway.lock") as locked:
        if not locked:
            raise GatewayLockedError(
                f"another dicommail gateway is running for {home}", "run one gateway per home; stop the other one"
            )
        yield


@click.command()
@click.option("-v", "--verbose", count=True, help="Log debugging detail.")
@pass_app
@handle_errors
def gateway(app: AppContext, verbose: int) -> None:
    """Receive studies from the PACS by C-STORE and send each as a DICOM-Mail set.

    Listens on gateway.host:gateway.port.  The called AE title picks the route
    ([routes."AETITLE"]: the recipients); a study is sent once nothing arrived
    for it for gateway.study_idle_seconds.  Runs until SIGTERM; queued
    studies resume after a restart.
    """
    # Imported here: pynetdicom loads slowly and only this command needs it.
    from dicommail.gateway.service import Gateway
    from dicommail.receiver.daemon import crash_hook_from_env

    config = app.config
    setup_logging(verbose)
    with gateway_lock(config.home):
        db = Database(config.state_db)
        keyring = Keyring(config.gnupg_home)
        try:
            service = Gateway(config, db, keyring, crash_hook=crash_hook_from_env())

            async def main() -> None:
                service.install_signal_handlers()
                await service.run()

            asyncio.run(main())
        finally:
            keyring.close()
            db.close()


COMMANDS: list[click.Command] = [gateway]
