"""Entry point: the ``dicommail`` click group and ``init``."""

from __future__ import annotations

import os
from pathlib import Path

import click

from dicommail import __version__
from dicommail.cli.render import handle_errors, info
from dicommail.config import CONFIG_NAME, Config, default_home, load_config, render_template
from dicommail.errors import ConfigError
from dicommail.store.files import PRIVATE_UMASK, make_home_private, make_private


class AppContext:
    """What every command needs: the home directory and, lazily, the config."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.home)
            # Before any command reads or writes it: a home that was made
            # with a 0755 umask (or by hand) must not stay readable by others.
            make_home_private(self._config)
        return self._config


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
    path = app.home / CONFIG_NAME
    if path.exists() and not force:
        raise ConfigError(f"{path} already exists", "edit it, or use --force to overwrite it with defaults")
    app.home.mkdir(parents=True, exist_ok=True, mode=0o700)
    make_private(app.home)  # it may have existed already, e.g. made 0755 by hand
    text = render_template(address)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)
    load_config(app.home)  # the template must itself validate
    info(f"wrote {path}")


def _register_subcommands() -> None:
    # Imported here so that each command module can import ``cli`` helpers
    # from this module without a cycle.
    from dicommail.cli import check, echo, gateway, keys, receive, send, status, transfer

    cli.add_command(keys.keys)
    cli.add_command(echo.echo)
    cli.add_command(receive.receive)
    for module in (transfer, send, gateway, check, status):
        for command in module.COMMANDS:
            cli.add_command(command)


_register_subcommands()
