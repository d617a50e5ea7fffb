"""``dicommail gateway``: a DICOM node the PACS pushes to; each study leaves as DICOM-Mail."""

from __future__ import annotations

import click

from dicommail.cli.logs import log_options
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import handle_errors


@click.command()
@log_options
@pass_app
@handle_errors
def gateway(app: AppContext) -> None:
    """Receive studies from the PACS by C-STORE and send each as a DICOM-Mail set.

    Listens on gateway.host:gateway.port.  The called AE title picks the route
    ([routes."AETITLE"]: the recipients); a study is sent once nothing arrived
    for it for gateway.study_idle_seconds.  Runs until SIGTERM; queued
    studies resume after a restart.
    """
    import asyncio  # here: the other commands need no event loop

    site = app.site
    asyncio.run(site.gateway(handle_signals=True))


COMMANDS: list[click.Command] = [gateway]
