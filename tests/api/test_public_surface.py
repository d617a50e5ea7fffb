"""The public API is exactly what docs/library.md documents, and the CLI stands on it alone."""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import dicommail

ROOT = Path(__file__).resolve().parents[2]
#: Internal packages a CLI module must not reach into: it calls the public API and renders.
INTERNAL = ("dicommail.sender", "dicommail.receiver", "dicommail.store", "dicommail.transport", "dicommail.gateway")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_cli_modules_import_no_internal_package() -> None:
    offending = {
        path.name: sorted(name for name in _imports(path) if name.startswith(INTERNAL))
        for path in sorted((ROOT / "dicommail" / "cli").glob("*.py"))
    }
    assert {name: found for name, found in offending.items() if found} == {}


def _documented_names() -> list[str]:
    text = (ROOT / "docs" / "library.md").read_text(encoding="utf-8")
    section = text.split("<!-- public-names -->", 2)[1]
    return sorted(set(re.findall(r"^- `([A-Za-z_][A-Za-z0-9_]*)`", section, re.MULTILINE)))


def test_the_public_names_are_exactly_the_documented_ones() -> None:
    assert sorted(dicommail.__all__) == _documented_names()
    for name in dicommail.__all__:
        assert hasattr(dicommail, name), name


def test_every_public_name_and_site_method_has_a_docstring() -> None:
    for name in dicommail.__all__:
        value = getattr(dicommail, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert inspect.getdoc(value), name
    from dicommail.site.keys import Keys

    for cls in (dicommail.Site, Keys):
        for name, member in inspect.getmembers(cls):
            if not name.startswith("_"):
                assert inspect.getdoc(member), f"{cls.__name__}.{name}"


def test_the_package_is_typed() -> None:
    assert (ROOT / "dicommail" / "py.typed").exists()
