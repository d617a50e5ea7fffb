"""Entry point: the ``dicommail`` click group and ``init``.

The root group makes the command line behave as admins expect of git or
systemctl: ``--home`` may come before or after the command (every command
takes it), usage errors exit 2, and with ``--json`` a usage error is one
JSON document on stdout like every other failure.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from dicommail import Site, __version__
from dicommail.cli.render import (
    JsonUsageError,
    handle_errors,
    info,
    json_printed,
    new_invocation,
    print_json,
    wants_json,
)
from dicommail.config import Config, default_home

#: Whatever dicommail creates (spool, state, decoded parts, keys) is for the service account only.
PRIVATE_UMASK = 0o077

#: Keys in ``click.Context.meta`` (shared by all contexts of one invocation).
_HOME_KEY = "dicommail.home"
_JSON_KEY = "dicommail.json"


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

    def use_home(self, home: Path) -> None:
        """Switch to ``home`` (a ``--home`` after the command); the site is opened there when first used."""
        if home != self.home:
            self.home = home
            self._site = None


pass_app = click.make_pass_decorator(AppContext)


def _take_home(ctx: click.Context, param: click.Parameter, values: Sequence[Path]) -> None:
    """Record ``--home`` wherever on the command line it came; a second, different one is a usage error."""
    given: Path | None = ctx.meta.get(_HOME_KEY)
    for value in values:
        home = value.expanduser().absolute()
        if given is not None and home != given:
            raise click.BadParameter(f"given twice, as {given} and {home}; give it once", ctx, param)
        given = home
    if given is None:
        return
    ctx.meta[_HOME_KEY] = given
    app = ctx.find_object(AppContext)
    if app is not None:
        app.use_home(given)


_HOME_TYPE = click.Path(file_okay=False, path_type=Path)


def _home_option() -> click.Option:
    """The ``--home`` every subcommand takes, so that it may follow the command."""
    return click.Option(
        ["--home"], type=_HOME_TYPE, multiple=True, expose_value=False, callback=_take_home,
        metavar="DIRECTORY", help="Directory with dicommail.toml (the same as --home before the command).",
    )


def _accept_home(command: click.Command) -> None:
    """Give ``command`` and, for a group, each of its subcommands a ``--home`` option."""
    if not any("--home" in param.opts for param in command.params):
        command.params.append(_home_option())
    if isinstance(command, click.Group):
        for subcommand in command.commands.values():
            _accept_home(subcommand)


class DicommailGroup(click.Group):
    """The root group: ``--home`` after any command, and usage errors as JSON under ``--json``."""

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _accept_home(cmd)
        super().add_command(cmd, name)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        if parent is None:
            new_invocation()
        as_json = wants_json(args)
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            if as_json:
                raise _as_json(exc) from None
            raise
        ctx.meta[_JSON_KEY] = as_json
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as exc:
            if ctx.meta.get(_JSON_KEY):
                raise _as_json(exc) from None
            raise
        except click.Abort:
            # Ctrl-C or end of input at a prompt: --json still promises its one document.
            if ctx.meta.get(_JSON_KEY) and not json_printed():
                print_json({"ok": False, "error": {"code": "interrupted", "message": "interrupted", "hint": ""}})
            raise


def _as_json(error: click.UsageError) -> click.UsageError:
    return error if isinstance(error, JsonUsageError) else JsonUsageError(error)


_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


@click.group(cls=DicommailGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--home", type=_HOME_TYPE, multiple=True, expose_value=False, callback=_take_home, metavar="DIRECTORY",
    help="Directory with dicommail.toml, the keyring and the state (default $DICOMMAIL_HOME or "
         "~/.dicommail). May also follow the command.",
)
@click.version_option(__version__, "--version", prog_name="dicommail", message="%(prog)s %(version)s")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Send and receive DICOM studies as signed, encrypted e-mail (DRG/@GIT DICOM-E-Mail).

    Usage errors exit with status 2, other failures with 1 (see each
    command); --json prints one JSON document, also on failure.
    """
    # Whatever dicommail creates (spool, state, decoded parts, keys) is for
    # this user only.  Restored when the command ends, for callers in-process.
    previous = os.umask(PRIVATE_UMASK)
    ctx.call_on_close(lambda: os.umask(previous))
    home: Path | None = ctx.meta.get(_HOME_KEY)
    ctx.obj = AppContext(home or default_home().expanduser().absolute())


def next_steps(home: Path, config_file: Path, address: str) -> list[str]:
    """What to do after ``init``, as commands to copy."""
    base = f"dicommail --home {shlex.quote(str(home))}"
    return [
        f"{base} keys generate --name 'Your Site' --email {shlex.quote(address) if address else 'ADDRESS'} "
        f"--new-passphrase-file {shlex.quote(str(home / 'passphrase'))}",
        f"edit {config_file}: identity, [smtp], [mailbox], [pacs] (see examples/)",
        f"{base} keys import PEER.asc && {base} keys certify PEER-ADDRESS",
        f"{base} check",
    ]


@cli.command()
@click.option("--address", default="", help="This site's mail address (identity.address).")
@click.option("--force", is_flag=True, help="Overwrite an existing dicommail.toml.")
@_JSON_OPTION
@pass_app
@handle_errors
def init(app: AppContext, address: str, force: bool, as_json: bool) -> None:
    """Create the home directory with a commented dicommail.toml."""
    site = Site.init(app.home, address, force=force)
    steps = next_steps(site.home, site.config.config_file, address)
    if as_json:
        print_json({"ok": True, "home": str(site.home), "config_file": str(site.config.config_file),
                    "next_steps": steps})
        return
    info(f"wrote {site.config.config_file}")
    info("next steps:\n" + "\n".join(f"  {step}" for step in steps))


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
    from dicommail.cli import cleanup, manpage, stats

    for command in (*cleanup.COMMANDS, *stats.COMMANDS, *manpage.COMMANDS):
        cli.add_command(command)


_register_subcommands()
