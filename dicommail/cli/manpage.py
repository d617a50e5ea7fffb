"""``dicommail manpage``: man pages in roff, rendered from the commands' own help.

One page per command, named as git names its pages: ``dicommail(1)``,
``dicommail-status(1)``, ``dicommail-keys-list(1)``.  Everything on a page
comes from click's metadata (help text, usage, options), so the pages say
what ``--help`` says and cannot drift from it.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path

import click

from dicommail import __version__
from dicommail.cli.render import handle_errors, info, print_json

#: The root's extra sections: what ``--help`` has no room for.
_ROOT_SECTIONS = {
    "ENVIRONMENT": [
        (r"\fBDICOMMAIL_HOME\fR", "The home when no --home is given (default ~/.dicommail)."),
        (r"\fB_DICOMMAIL_COMPLETE\fR",
         "bash_source, zsh_source or fish_source: print the shell completion script instead of running."),
    ],
    "EXIT STATUS": [
        ("0", "Success."),
        ("1", "A failure: an error message and a hint on stderr (with --json also as a document on stdout)."),
        ("2", "A usage error: unknown option or command, missing or bad argument."),
        ("75", "send, constancy run: some work is still pending; it is retried later."),
        ("130", "Interrupted."),
    ],
}


@dataclass(frozen=True)
class ManPage:
    """One rendered page: its name (``dicommail-keys-list``) and its roff text."""

    name: str
    text: str

    @property
    def file_name(self) -> str:
        return f"{self.name}.1"


def _escape(text: str) -> str:
    """Text as roff shows it literally: backslashes and minus signs escaped; `code` in bold."""
    text = text.replace("\\", r"\e").replace("-", r"\-")
    return re.sub(r"`([^`]+)`", r"\\fB\1\\fR", text)


def _lines(text: str) -> list[str]:
    # A line that starts with "." or "'" would be read as a request.
    return [("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines()]


def _help_paragraphs(command: click.Command) -> list[str]:
    """The command's help as roff paragraphs; a paragraph that starts with click's ``\\b`` stays unwrapped."""
    text = inspect.cleandoc(command.help or "").partition("\f")[0]
    result: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text.strip()):
        if not paragraph:
            continue
        if paragraph.startswith("\b"):
            body = paragraph.split("\n", 1)[1] if "\n" in paragraph else ""
            result.append("\n".join([".nf", *_lines(_escape(body)), ".fi"]))
        else:
            result.append("\n".join(_lines(_escape(" ".join(paragraph.split())))))
    return result


def _option_spec(spec: str) -> str:
    """``-q, --quiet`` or ``--since TEXT`` with the option names in bold and the value in italics."""
    parts = []
    for word in spec.split(" "):
        name = word.rstrip(",")
        style = "B" if name.startswith("-") else "I"
        parts.append(f"\\f{style}{_escape(name)}\\fR{word[len(name):]}")
    return " ".join(parts)


def _command_name(ctx: click.Context) -> str:
    return ctx.command_path.replace(" ", "-")


def render_page(ctx: click.Context, *, day: date) -> ManPage:
    """The man page of ``ctx.command``; ``ctx`` is a context made for it under its parents'."""
    command = ctx.command
    name = _command_name(ctx)
    out = [
        f'.TH "{_escape(name.upper())}" "1" "{day.isoformat()}" "dicommail {__version__}" "dicommail manual"',
        ".nh",  # no hyphenation: names like dicommail-keys-list stay whole
        ".SH NAME",
        f"{_escape(name)} \\- {_escape(command.get_short_help_str(limit=200))}",
        ".SH SYNOPSIS",
        f".B {_escape(ctx.command_path)}",
        *_lines(_escape(" ".join(command.collect_usage_pieces(ctx)))),
    ]
    paragraphs = _help_paragraphs(command)
    if paragraphs:
        out.append(".SH DESCRIPTION")
        out.append("\n.PP\n".join(paragraphs))
    arguments = [p for p in command.get_params(ctx) if isinstance(p, click.Argument) and getattr(p, "help", None)]
    if arguments:
        out.append(".SH ARGUMENTS")
        for argument in arguments:
            out += [".TP", f"\\fI{_escape(argument.human_readable_name)}\\fR", *_lines(_escape(argument.help or ""))]
    options = [record for p in command.get_params(ctx) if isinstance(p, click.Option)
               if (record := p.get_help_record(ctx)) is not None]
    if options:
        out.append(".SH OPTIONS")
        for spec, text in options:
            out += [".TP", _option_spec(spec), *_lines(_escape(" ".join(text.split())))]
    subcommands = list(_subcommands(ctx))
    if subcommands:
        out.append(".SH COMMANDS")
        for sub in subcommands:
            out += [".TP", f"\\fB{_escape(sub.info_name or '')}\\fR",
                    *_lines(_escape(sub.command.get_short_help_str(limit=200)))]
    if ctx.parent is None:
        for section, rows in _ROOT_SECTIONS.items():
            out.append(f".SH {section}")
            for term, text in rows:
                out += [".TP", term, *_lines(_escape(text))]
    see_also = [_command_name(c) for c in (ctx.parent,) if c is not None] + [_command_name(s) for s in subcommands]
    if see_also:
        out += [".SH SEE ALSO", ",\n".join(f"\\fB{_escape(page)}\\fR(1)" for page in see_also)]
    return ManPage(name, "\n".join(out) + "\n")


def _subcommands(ctx: click.Context) -> Iterator[click.Context]:
    """Contexts for the visible subcommands of a group, in the order ``--help`` lists them."""
    group = ctx.command
    if not isinstance(group, click.Group):
        return
    for name in group.list_commands(ctx):
        sub = group.get_command(ctx, name)
        if sub is not None and not sub.hidden:
            yield click.Context(sub, info_name=name, parent=ctx)


def _walk(ctx: click.Context) -> Iterator[click.Context]:
    yield ctx
    for sub in _subcommands(ctx):
        yield from _walk(sub)


def _today() -> date:
    # Reproducible builds set SOURCE_DATE_EPOCH; the page's date is then the source's.
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    if epoch.isdigit():
        return datetime.fromtimestamp(int(epoch), UTC).date()
    return date.today()


def _root_context(root: click.Command) -> click.Context:
    # As click makes it for a run, so that e.g. "-h, --help" is listed as it is there.
    return click.Context(root, info_name="dicommail", **root.context_settings)


def render_pages(root: click.Command, *, day: date | None = None) -> list[ManPage]:
    """The pages of ``root`` (named ``dicommail``) and of every visible command under it."""
    day = day or _today()
    return [render_page(ctx, day=day) for ctx in _walk(_root_context(root))]


def _find(root: click.Context, words: Sequence[str]) -> click.Context:
    ctx = root
    for word in words:
        found = next((sub for sub in _subcommands(ctx) if sub.info_name == word), None)
        if found is None:
            raise click.BadParameter(f"no command {' '.join([ctx.command_path, word])!r}", param_hint="COMMAND")
        ctx = found
    return ctx


@click.command(hidden=True)
@click.argument("words", nargs=-1, metavar="[COMMAND]...")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Write every page (dicommail.1, dicommail-status.1, ...) into this directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the files written as JSON (with --output).")
@click.pass_context
@handle_errors
def manpage(ctx: click.Context, words: tuple[str, ...], output: Path | None, as_json: bool) -> None:
    """Render the man pages from the commands' own help (roff, section 1).

    Without --output, print the page of `dicommail` or of COMMAND (e.g.
    `dicommail manpage keys list | man -l -`).
    """
    root = ctx.find_root().command
    if output is None:
        if as_json:
            raise click.UsageError("--json needs --output")
        page = render_page(_find(_root_context(root), words), day=_today())
        click.echo(page.text, nl=False)
        return
    if words:
        raise click.UsageError("--output writes every page; give no COMMAND")
    # Man pages are for every user of the machine, unlike what else dicommail writes (umask 077).
    if not output.exists():
        output.mkdir(parents=True)
        output.chmod(0o755)
    written = []
    for page in render_pages(root):
        path = output / page.file_name
        path.write_text(page.text, encoding="utf-8")
        path.chmod(0o644)
        written.append(path)
    if as_json:
        print_json({"ok": True, "directory": str(output), "files": [str(path) for path in written]})
        return
    info(f"wrote {len(written)} man pages to {output}; read one with `man -l {written[0]}`")


COMMANDS: list[click.Command] = [manpage]
