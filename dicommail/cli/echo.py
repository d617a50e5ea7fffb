"""``echo``: is the PACS there and does it talk to us (C-ECHO)?"""

from __future__ import annotations

import dataclasses
import re

import click

from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import handle_errors, out, print_json
from dicommail.config import PacsConfig
from dicommail.receiver.destinations import echo as send_echo

# AE titles: 1-16 characters of the default repertoire without backslash.
_AET_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
# AE@HOST:PORT, the host in brackets when it is an IPv6 address.
_TARGET_RE = re.compile(r"^(?:(?P<aet>[^@]+)@)?(?:\[(?P<ipv6>[^\]]+)\]|(?P<host>[^:@\[\]]+)):(?P<port>\d{1,5})$")


def _aet(value: str, what: str) -> str:
    if not _AET_RE.match(value) or not value.strip():
        raise click.BadParameter(f"{value!r} is not a DICOM AE title (1-16 characters, no backslash)", param_hint=what)
    return value


def _target(config: PacsConfig, value: str) -> PacsConfig:
    match = _TARGET_RE.match(value)
    port = int(match.group("port")) if match else 0
    if not match or not 1 <= port <= 65535:
        raise click.BadParameter(f"{value!r} is not AE@HOST:PORT (e.g. PACS@192.0.2.7:104)", param_hint="TARGET")
    called = _aet(match.group("aet"), "TARGET") if match.group("aet") else config.called_aet
    return dataclasses.replace(config, called_aet=called, host=match.group("ipv6") or match.group("host"), port=port)


@click.command()
@click.argument("target", required=False)
@click.option("--calling-aet", help="Our AE title for this test (default: pacs.calling_aet).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
@handle_errors
def echo(app: AppContext, target: str | None, calling_aet: str | None, as_json: bool) -> None:
    """Check the connection to a PACS with C-ECHO.

    TARGET is AE@HOST:PORT; without it, the PACS configured in [pacs].
    """
    config = app.config.pacs
    if target:
        config = _target(config, target)
    if calling_aet is not None:
        config = dataclasses.replace(config, calling_aet=_aet(calling_aet, "--calling-aet"))
    seconds = send_echo(config)
    if as_json:
        print_json(
            {
                "ok": True,
                "called_aet": config.called_aet,
                "host": config.host,
                "port": config.port,
                "calling_aet": config.calling_aet,
                "seconds": round(seconds, 6),
            }
        )
        return
    out.print(
        f"C-ECHO {config.called_aet}@{config.host}:{config.port} from {config.calling_aet}: "
        f"success in {seconds * 1000:.1f} ms",
        markup=False,
    )
