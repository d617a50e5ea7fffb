"""Entry point: the ``dicommail`` click group and ``init``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from dicommail import Site, __version__
from dicommail.cli.render import handle_errors, info
from dicommail.config import Config, default_home

#: Whatever dicommail creates (spool, state, decoded parts, keys) is for the service account only.
PRIVATE_UMASK = 0o077


class AppContext:
    """What every command needs: the home directory and, lazily, the site opened there."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._site: Site | None = None

    @property
    def site(self) -> Site:
        """The home as the library sees it (config validated, made private), opened on first use."""
        if self._site is None:
            self._site = Site.open(self.home)
        return self._site

    @property
    def config(self) -> Config:
        return self.site.config


pass_app = click.make_pass_decorator(AppContext)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="DICOMMAIL_HOME",
    help="Directory with dicommail.toml, the keyring and the state (default ~/.dicommail).",
)
@click.version_option(__version__, prog_name="dicommail")
@click.pass_context
def cli(ctx: click.Context, home: Path | None) -> None:
    """Send and receive DICOM studies as signed, encrypted e-mail (DRG/@GIT DICOM-E-Mail)."""
    # Whatever dicommail creates (spool, state, decoded parts, keys) is for
    # this user only.  Restored when the command ends, for callers in-process.
    previous = os.umask(PRIVATE_UMASK)
    ctx.call_on_close(lambda: os.umask(previous))
    ctx.obj = AppContext((home or default_home()).expanduser().absolute())


@cli.command()
@click.option("--address", default="", help="This site's mail address (identity.address).")
@click.option("--force", is_flag=True, help="Overwrite an existing dicommail.toml.")
@pass_app
@handle_errors
def init(app: AppContext, address: str, force: bool) -> None:
    """Create the home directory with a commented dicommail.toml."""
    site = Site.init(app.home, address, force=force)
    info(f"wrote {site.config.config_file}")
    home = f"--home {site.home}"
    info("next steps:\n"
         f"  dicommail {home} keys generate --name 'Your Site' --email {address or 'ADDRESS'} "
         "--passphrase-file FILE\n"
         f"  edit {site.config.config_file}: identity, [smtp], [mailbox], [pacs] (see examples/)\n"
         f"  dicommail {home} keys import PEER.asc && dicommail {home} keys certify PEER-ADDRESS\n"
         f"  dicommail {home} check")


def _register_subcommands() -> None:
    # Imported here so that each command module can import ``cli`` helpers
    # from this module without a cycle.
    from dicommail.cli import check, constancy, echo, gateway, inbox, keys, quarantine, receive, send, status, transfer

    cli.add_command(keys.keys)
    cli.add_command(echo.echo)
    cli.add_command(receive.receive)
    for module in (transfer, send, gateway, check, status, constancy, inbox, quarantine):
        for command in module.COMMANDS:
            cli.add_command(command)
    from dicommail.cli import cleanup, stats

    for command in (*cleanup.COMMANDS, *stats.COMMANDS):
        cli.add_command(command)


_register_subcommands()
