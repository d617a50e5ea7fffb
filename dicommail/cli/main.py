"""Entry point: the ``dicommail`` click group and ``init``.

The root group makes the command line behave as admins expect of git or
systemctl: ``--home`` may come before or after the command (every command
takes it), usage errors exit 2, and with ``--json`` a usage error is one
JSON document on stdout like every other failure.

A command's module is imported when the command is first looked up (see
:data:`SUBCOMMANDS`): ``dicommail unpack`` loads neither the receiver nor the
mail clients, and ``dicommail --help`` nothing of the library but its errors.
"""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import threading
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import click

from dicommail import __version__
from dicommail.cli.render import (
    JsonUsageError,
    handle_errors,
    info,
    json_printed,
    new_invocation,
    print_json,
    raise_terminated,
    set_home,
    wants_json,
)

if TYPE_CHECKING:
    from dicommail import Site
    from dicommail.config import Config

#: Whatever dicommail creates (spool, state, decoded parts, keys) is for the service account only.
PRIVATE_UMASK = 0o077

#: Keys in ``click.Context.meta`` (shared by all contexts of one invocation).
_HOME_KEY = "dicommail.home"
_JSON_KEY = "dicommail.json"


class AppContext:
    """What every command needs: the home directory and, lazily, the site opened there."""

    def __init__(self, home: Path, default_home: Path | None = None) -> None:
        self.home = home
        self.default_home = default_home or home  # commands in hints name --home unless it is this one
        self._site: Site | None = None
        set_home(home, self.default_home, SUBCOMMANDS)

    @property
    def site(self) -> Site:
        """The home as the library sees it (config validated, made private), opened on first use."""
        if self._site is None:
            from dicommail import Site  # the library is loaded by the first command that needs it

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
            set_home(home, self.default_home, SUBCOMMANDS)


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


class Listed(NamedTuple):
    """A subcommand as the root's ``--help`` lists it without importing it."""

    module: str  # under dicommail.cli; its COMMANDS list holds the command
    summary: str  # the first sentence of the command's help, which --help shortens to fit
    hidden: bool = False


#: The root's subcommands.  tests/unit/test_startup.py holds each entry to the command itself.
SUBCOMMANDS: dict[str, Listed] = {
    "check": Listed("check", "Check that this site can run: config, secret files, keys, a test signature, SMTP, "
                             "mailbox, PACS, gateway."),
    "cleanup": Listed("cleanup", "Remove mails of delivered or cancelled transfers, fetched mails of finished sets "
                                 "and sent acknowledgements."),
    "constancy": Listed("constancy", "DIN 6868-159 constancy checks of teleradiology links: run them, list them, "
                                     "document a month."),
    "echo": Listed("echo", "Check the connection to a PACS with C-ECHO."),
    "gateway": Listed("gateway", "Receive studies from the PACS by C-STORE and send each as a DICOM-Mail set."),
    "inbox": Listed("inbox", "Show received sets: incomplete (which parts are missing), waiting for the PACS "
                             "(and why), delivered, ..."),
    "keys": Listed("keys", "Manage this site's key and the keys of its peers."),
    "manpage": Listed("manpage", "Render the man pages from the commands' own help (roff, section 1).", hidden=True),
    "pack": Listed("transfer", "Pack DICOM files or folders into signed, encrypted DICOM-Mail sets "
                               "(one set per study)."),
    "quarantine": Listed("quarantine", "Mails and sets the receiver could not process, kept (encrypted) with "
                                       "the reason."),
    "receive": Listed("receive", "Poll the mailbox, verify incoming sets and forward complete studies to the PACS."),
    "send": Listed("send", "Send DICOM files or folders as DICOM-Mail sets over SMTP (one set per study)."),
    "stats": Listed("stats", "Transfers sent and sets received, images, bytes, failures and transfer times per "
                             "peer, month or route."),
    "status": Listed("status", "Show sent transfers: delivered, failed (and why) or on their way, and how long "
                               "delivery took."),
    "testdata": Listed("transfer", "Write a synthetic, patient-free CT study: a defined test data set for demos "
                                   "and DIN 6868-159 constancy checks (transfer time, completeness)."),
    "transfers": Listed("status", "Manage sent transfers: retry, cancel or delete one."),
    "unpack": Listed("transfer", "Decrypt, verify and reassemble DICOM-Mail files (any order, duplicates allowed)."),
}


class _Subcommands(MutableMapping[str, click.Command]):
    """The root's ``commands``: looking one up imports its module and registers that module's commands.

    Names are known without importing anything: ``in``, listing and click's
    "did you mean" read them from :data:`SUBCOMMANDS`.
    """

    def __init__(self, register: Callable[[click.Command], None]) -> None:
        self._register = register
        self._loaded: dict[str, click.Command] = {}

    def __getitem__(self, name: str) -> click.Command:
        if name not in self._loaded and name in SUBCOMMANDS:
            module = importlib.import_module(f"dicommail.cli.{SUBCOMMANDS[name].module}")
            commands: list[click.Command] = module.COMMANDS
            for command in commands:
                self._register(command)
        return self._loaded[name]

    def __setitem__(self, name: str, command: click.Command) -> None:
        self._loaded[name] = command

    def __delitem__(self, name: str) -> None:
        del self._loaded[name]

    def __contains__(self, name: object) -> bool:
        return name in self._loaded or name in SUBCOMMANDS

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._loaded.keys() | SUBCOMMANDS.keys()))

    def __len__(self) -> int:
        return len(self._loaded.keys() | SUBCOMMANDS.keys())

    def for_listing(self, name: str) -> click.Command:
        """The command if it is loaded, else a stand-in with its summary (for ``--help``)."""
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        listed = SUBCOMMANDS[name]
        return click.Command(name, help=listed.summary, hidden=listed.hidden)


class DicommailGroup(click.Group):
    """The root group: ``--home`` after any command, usage errors as JSON under ``--json``, lazy subcommands."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subcommands = _Subcommands(self.add_command)
        self.commands = self._subcommands

    def add_command(self, cmd: click.Command, name: str | None = None) -> None:
        _accept_home(cmd)
        super().add_command(cmd, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        # As click lists them, but from the stand-ins: listing imports no command's module.
        rows = [(name, command) for name in self.list_commands(ctx)
                if not (command := self._subcommands.for_listing(name)).hidden]
        if rows:
            limit = formatter.width - 6 - max(len(name) for name, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(name, command.get_short_help_str(limit)) for name, command in rows])

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
    # SIGTERM unwinds like Ctrl-C, so that no plaintext is left in scratch directories
    # (the daemons put their own handlers in place: they finish the current step).
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, raise_terminated)
        ctx.call_on_close(lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL))
    from dicommail.config import default_home

    home: Path | None = ctx.meta.get(_HOME_KEY)
    default = default_home().expanduser().absolute()
    # Hints name --home unless the home is ~/.dicommail: one from $DICOMMAIL_HOME (a unit's
    # Environment=) is not what the admin's own shell would use.
    ctx.obj = AppContext(home or default, (Path.home() / ".dicommail").absolute())


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
    from dicommail import Site

    site = Site.init(app.home, address, force=force)
    steps = next_steps(site.home, site.config.config_file, address)
    if as_json:
        print_json({"ok": True, "home": str(site.home), "config_file": str(site.config.config_file),
                    "next_steps": steps})
        return
    info(f"wrote {site.config.config_file}")
    info("next steps:\n" + "\n".join(f"  {step}" for step in steps))
