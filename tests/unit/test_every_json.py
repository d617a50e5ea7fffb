"""Every command that offers --json prints exactly one JSON document, on success and on failure."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from dicommail.cli.main import cli

#: Arguments that keep a command from running for ever or from doing slow work in this test.
EXTRA: dict[str, list[str]] = {
    "receive": ["--once"],
    "keys generate": [],  # no --name: a usage error, as JSON
}


def _commands(group: click.Group, ctx: click.Context, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is None or command.hidden:
            continue
        path = (*prefix, name)
        if isinstance(command, click.Group):
            yield from _commands(command, ctx, path)
        elif any("--json" in getattr(param, "opts", ()) for param in command.params):
            yield path


def _json_commands() -> list[tuple[str, ...]]:
    with click.Context(cli) as ctx:
        return sorted(_commands(cli, ctx))


def test_the_commands_are_found() -> None:
    found = {" ".join(path) for path in _json_commands()}
    assert {"status", "inbox", "check", "stats", "init", "keys list", "transfers retry", "quarantine list"} <= found


@pytest.mark.parametrize("path", _json_commands(), ids=" ".join)
def test_one_document(path: tuple[str, ...], tmp_path: Path) -> None:
    home = tmp_path / "home"
    if path != ("init",):
        home.mkdir()
        (home / "dicommail.toml").write_text('[identity]\naddress = "site@example.test"\n')
    with click.Context(cli) as ctx:
        command: click.Command | None = cli
        for name in path:
            assert isinstance(command, click.Group)
            command = command.get_command(ctx, name)
    assert command is not None
    # A placeholder for every required argument: the command fails, but as one document.
    arguments = [("x" if not param.multiple and param.nargs == 1 else str(tmp_path / "missing"))
                 for param in command.params if isinstance(param, click.Argument) and param.required]
    args = ["--home", str(home), *path, *EXTRA.get(" ".join(path), []), *arguments, "--json"]
    result = CliRunner().invoke(cli, args, input="")
    document = json.loads(result.stdout)  # exactly one document: json.loads refuses a second
    assert isinstance(document, dict) and isinstance(document.get("ok"), bool), result.stdout
    assert (result.exit_code == 0) == document["ok"], (result.exit_code, result.stdout, result.stderr)
    if not document["ok"] and "error" in document:
        assert document["error"]["message"], document
    elif not document["ok"]:
        assert len(document) > 1, document  # e.g. check: the failed rows say why
