"""``echo``: is the PACS there and does it talk to us (C-ECHO)?"""

from __future__ import annotations

import click

from dicommail import InvalidArgumentError
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import handle_errors, out, print_json

#: The CLI's names for the library's arguments, for click's usage errors.
_PARAMETERS = {"target": "TARGET", "calling_aet": "--calling-aet"}


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
    try:
        result = app.site.echo(target, calling_aet)
    except InvalidArgumentError as exc:  # a usage error (exit status 2), as click reports its own
        raise click.BadParameter(exc.message, param_hint=_PARAMETERS.get(exc.argument, exc.argument)) from None
    if as_json:
        print_json(result.to_json())
        return
    out.print(
        f"C-ECHO {result.called_aet}@{result.host}:{result.port} from {result.calling_aet}: "
        f"success in {result.seconds * 1000:.1f} ms",
        markup=False,
    )


COMMANDS: list[click.Command] = [echo]
