"""Changing settings in a home's ``dicommail.toml`` in place.

The admin's file is edited line by line, so that its comments, its order and
every other setting stay as they were: a setting's line is replaced, or a
commented-out default (``# key = ""``) is taken up, or the line is added
under its section's header.  The result is re-read and must differ from
the old file in exactly the settings asked for, and validate, before it
replaces the old file atomically; otherwise nothing is written.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tempfile
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dicommail.config import Config, parse_config
from dicommail.errors import ConfigError, DicommailError
from dicommail.store.files import fsync_dir

__all__ = ["set_settings", "toml_string"]

_HEADER_RE = re.compile(r"^\s*\[")
_TABLE_RE = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
#: A single-line string value and what may follow it on its line.
_VALUE_RE = re.compile(r"""^("(?:[^"\\]|\\.)*"|'[^']*')(\s*#.*)?\s*$""")


def toml_string(value: str) -> str:
    """``value`` as a TOML basic string: quotes, backslashes and control characters escaped."""
    escaped = []
    for char in value:
        if char in ('"', "\\"):
            escaped.append("\\" + char)
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            escaped.append(f"\\u{ord(char):04X}")
        else:
            escaped.append(char)
    return '"' + "".join(escaped) + '"'


def set_settings(config: Config, section: str, values: Mapping[str, str]) -> Config:
    """Set string settings of ``[section]`` in ``config``'s file; returns the config as it now reads.

    Raises :class:`~dicommail.errors.ConfigError` (and writes nothing) if the
    file cannot be read, cannot be edited so that exactly these settings
    change (e.g. ``[section]`` is an inline table), or would not validate.
    """
    path = config.config_file
    # A symlinked config (from configuration management) is edited where it lives.
    target = path.resolve()
    by_hand = _by_hand(path, section, values)
    try:
        # newline="": CRLF lines stay CRLF.
        with target.open(encoding="utf-8", newline="") as handle:
            text = handle.read()
        before = tomllib.loads(text)
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {path} to change it: {exc}", by_hand) from exc
    edited = _edit(text, section, values)
    expected = copy.deepcopy(before)
    table = expected.setdefault(section, {})
    if not isinstance(table, dict):
        raise ConfigError(f"cannot change {path}: [{section}] is not a table", by_hand)
    table.update(values)
    try:
        after: dict[str, Any] = tomllib.loads(edited)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"cannot change {path} by itself (the edit would not be valid TOML: {exc})", by_hand) \
            from exc
    if after != expected:
        # The section is written some way a line edit cannot follow (an inline table, dotted keys, ...).
        raise ConfigError(f"cannot change {path} by itself: [{section}] is not written as plain lines", by_hand)
    try:
        updated = parse_config(after, config.home, source=str(path))
    except DicommailError as exc:
        raise ConfigError(f"the change would make {path} invalid: {exc.message}", exc.hint) from exc
    _replace(target, edited)
    return updated


def _by_hand(path: Path, section: str, values: Mapping[str, str]) -> str:
    lines = ", ".join(f"{name} = {toml_string(value)}" for name, value in values.items())
    return f"set {lines} in [{section}] of {path} by hand"


def _is_name(found: str, name: str) -> bool:
    return found.strip() in (name, f'"{name}"', f"'{name}'")


def _edit(text: str, section: str, values: Mapping[str, str]) -> str:
    """``text`` with each of ``values`` set in ``[section]`` (see the module's docstring)."""
    newline = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    start = next(
        (i for i, line in enumerate(lines) if (match := _TABLE_RE.match(line)) and _is_name(match[1], section)),
        None,
    )
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        added = [f"[{section}]", *(f"{name} = {toml_string(value)}" for name, value in values.items())]
        lines += ([""] if lines else []) + added
        return newline.join(lines) + newline
    end = next((i for i in range(start + 1, len(lines)) if _HEADER_RE.match(lines[i])), len(lines))
    missing: list[str] = []
    for name, value in values.items():
        setting = re.compile(rf"""^(\s*)({re.escape(name)}|"{re.escape(name)}"|'{re.escape(name)}')(\s*=\s*)(.*)$""")
        commented = re.compile(rf"^(\s*)#\s*{re.escape(name)}\s*=")
        found = next((i for i in range(start + 1, end) if setting.match(lines[i])), None)
        if found is not None:
            match = setting.match(lines[found])
            assert match is not None
            old_value = _VALUE_RE.match(match[4])
            comment = (old_value[2] or "") if old_value else ""
            lines[found] = f"{match[1]}{match[2]}{match[3]}{toml_string(value)}{comment}"
            continue
        found = next((i for i in range(start + 1, end) if commented.match(lines[i])), None)
        if found is not None:
            indent = commented.match(lines[found])
            lines[found] = f"{indent[1] if indent else ''}{name} = {toml_string(value)}"
            continue
        missing.append(f"{name} = {toml_string(value)}")
    lines[start + 1 : start + 1] = missing
    return newline.join(lines) + newline


def _replace(target: Path, text: str) -> None:
    """Write ``target`` through a temporary sibling: fsynced, mode 0600, then renamed into place."""
    try:
        owner = target.stat()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise ConfigError(f"cannot write {target}: {exc.strerror}", "check the home directory's permissions") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), 0o600)
            if os.geteuid() == 0:
                # root editing a service account's home: the file stays that account's.
                with contextlib.suppress(OSError):
                    os.fchown(handle.fileno(), owner.st_uid, owner.st_gid)
            os.fsync(handle.fileno())
        tmp.replace(target)
        fsync_dir(target.parent)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ConfigError(f"cannot write {target}: {exc.strerror or exc}", "check the disk and the permissions") \
            from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
