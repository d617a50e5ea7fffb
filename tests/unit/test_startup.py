"""Start-up: a command imports what it needs only, and the root's help lists every command without importing it.

Each check runs in a fresh interpreter, since this one has imported
everything by now.  No timing: what is imported is what is checked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import click
import pytest

from dicommail.cli.main import SUBCOMMANDS, cli
from tests.conftest import short_tempdir

#: What only the receiver, the gateway, sending and the constancy report need.
SLOW_TO_IMPORT = ("pynetdicom", "aiosmtplib", "aioimaplib", "matplotlib", "fpdf")

#: Prints, as JSON, the top-level packages imported after running the code it is given.
_IMPORTED = """
import json, sys
{code}
print(json.dumps(sorted({{name.partition(".")[0] for name in sys.modules}})))
"""


def imported_after(code: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", _IMPORTED.format(code=code)],
                            capture_output=True, text=True, check=True)
    return set(json.loads(result.stdout.splitlines()[-1]))


def test_importing_the_library_and_the_command_line_loads_none_of_the_slow_packages() -> None:
    imported = imported_after("import dicommail\nimport dicommail.cli.main")
    assert imported.isdisjoint(SLOW_TO_IMPORT), sorted(imported.intersection(SLOW_TO_IMPORT))


def test_unpack_loads_none_of_the_slow_packages() -> None:
    home = short_tempdir()
    try:
        (home / "dicommail.toml").touch()
        mail = home / "not-a-set.eml"
        mail.write_text("From: someone@example.test\n\nplain text\n", encoding="utf-8")
        # A mail that is refused still goes through Site.open and Site.unpack.
        args = ["--home", str(home), "unpack", "--json", "-o", str(home / "out"), str(mail)]
        code = f"from dicommail.cli import cli\ntry:\n    cli.main({args!r})\nexcept SystemExit:\n    pass"
        imported = imported_after(code)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "all"], check=False,
                       capture_output=True)
        shutil.rmtree(home, ignore_errors=True)
    assert "dicommail" in imported
    assert imported.isdisjoint(SLOW_TO_IMPORT), sorted(imported.intersection(SLOW_TO_IMPORT))


def test_the_root_help_imports_no_command_nor_the_library_and_lists_them_as_they_are() -> None:
    code = """
import click, sys
from dicommail.cli import cli
def root_help():
    return click.Context(cli, info_name="dicommail", terminal_width=80, **cli.context_settings).get_help()
before = root_help()
loaded = sorted(name for name in sys.modules if name.startswith("dicommail.") and name not in
                ("dicommail.cli", "dicommail.cli.main", "dicommail.cli.render", "dicommail.errors"))
list(cli.commands.items())  # imports every command
print(json.dumps({"before": before, "after": root_help(), "loaded": loaded}))
"""
    result = subprocess.run([sys.executable, "-c", "import json\n" + code], capture_output=True, text=True,
                            check=True)
    found = json.loads(result.stdout)
    assert found["loaded"] == []
    assert found["before"] == found["after"]
    assert "unpack      Decrypt, verify and reassemble" in found["before"]


def _root_context() -> click.Context:
    return click.Context(cli, info_name="dicommail")


@pytest.mark.parametrize("name", sorted(SUBCOMMANDS))
def test_each_listed_command_is_described_as_it_describes_itself(name: str) -> None:
    listed = SUBCOMMANDS[name]
    command = cli.get_command(_root_context(), name)
    assert command is not None
    assert command.callback is not None or isinstance(command, click.Group)
    module = sys.modules[f"dicommail.cli.{listed.module}"]
    assert command in module.COMMANDS
    assert command.hidden == listed.hidden
    assert command.get_short_help_str(limit=10_000) == listed.summary


def test_every_command_of_a_listed_module_is_listed() -> None:
    for module_name in sorted({listed.module for listed in SUBCOMMANDS.values()}):
        cli.get_command(_root_context(), next(n for n, v in SUBCOMMANDS.items() if v.module == module_name))
        module = sys.modules[f"dicommail.cli.{module_name}"]
        for command in module.COMMANDS:
            assert command.name in SUBCOMMANDS, f"{command.name} of dicommail/cli/{module_name}.py"
            assert SUBCOMMANDS[command.name].module == module_name


def test_an_unknown_command_still_suggests_the_unloaded_ones(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "dicommail", "statu"], capture_output=True, text=True,
                            cwd=tmp_path)
    assert result.returncode == 2
    assert "Did you mean" in result.stderr and "'status'" in result.stderr
