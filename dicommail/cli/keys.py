"""``dicommail keys``: this site's key and the peers' keys (a thin layer over :class:`dicommail.site.keys.Keys`)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import click
from rich.table import Table

from dicommail import KeyInfo
from dicommail.cli.main import AppContext, pass_app
from dicommail.cli.render import confirm, echo_escape, err, error_document, handle_errors, info, out, print_json
from dicommail.errors import DicommailError, InputError
from dicommail.site.keys import Algorithm


def _read_passphrase_file(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read the passphrase file {path}: {exc.strerror}") from exc
    passphrase = text.splitlines()[0] if text else ""
    if not passphrase:
        raise InputError(f"the passphrase file {path} is empty", "put the passphrase on its first line")
    return passphrase


def _ask(question: str, assume_yes: bool) -> None:
    """Confirm with the user, or refuse: never act on a silent default."""
    if assume_yes:
        return
    if not sys.stdin.isatty():
        raise InputError("cannot ask for confirmation: no terminal", "confirm on the command line with --yes")
    if not confirm(question, assume_yes=False):
        raise InputError("cancelled")


def _describe(key: KeyInfo, as_json: bool = False) -> None:
    """Fingerprint grouped for reading aloud, and who the key claims to be (on stderr with --json)."""
    console = err if as_json else out
    console.print(f"  {key.grouped_fingerprint}")
    for uid in key.user_ids:
        console.print(f"  {echo_escape(uid)}")


def _say(text: str) -> None:
    """A message on stderr, each line word-wrapped to 80 columns (a path or fingerprint is never cut)."""
    lines = [
        textwrap.fill(line, width=80, break_long_words=False, break_on_hyphens=False, subsequent_indent=indent)
        for line in text.splitlines()
        for indent in [" " * (len(line) - len(line.lstrip()))]
    ]
    info("\n".join(lines))


def _or_null(value: str) -> str | None:
    return value or None


_JSON_HELP = "Print the result as one JSON document (also on failure)."


@click.group()
def keys() -> None:
    """Manage this site's key and the keys of its peers."""


@keys.command()
@click.option("--name", required=True, help="The site's name, e.g. 'Radiology Example Town'.")
@click.option("--email", required=True, help="The site's mail address (the one it sends DICOM mails from).")
@click.option("--algo", type=click.Choice(["rsa3072", "ed25519"]), default="rsa3072", show_default=True)
@click.option("--expires", default="2y", show_default=True, help="e.g. 2y, 18m, 365d, 2028-12-31 or never.")
@click.option(
    "--passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File whose first line is the new key's passphrase.",
)
@click.option(
    "--new-passphrase-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Create this file (mode 0600) with a random passphrase for the new key; it must not exist yet.",
)
@click.option("--no-passphrase", is_flag=True, help="Leave the secret key unprotected (e.g. a locked-down server).")
@click.option(
    "--make-default", is_flag=True, help="Make the new key this site's key even if identity.key names another key."
)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@pass_app
@handle_errors
def generate(
    app: AppContext,
    name: str,
    email: str,
    algo: Algorithm,
    expires: str,
    passphrase_file: Path | None,
    new_passphrase_file: Path | None,
    no_passphrase: bool,
    make_default: bool,
    as_json: bool,
) -> None:
    """Generate this site's key pair (signing key plus encryption subkey).

    The key and its passphrase file are recorded as identity.key and
    identity.passphrase_file in dicommail.toml, unless identity.key names
    another key (then --make-default switches).  Relative paths are
    relative to the current directory; the config gets paths that mean the
    same.
    """
    given = [passphrase_file is not None, new_passphrase_file is not None, no_passphrase]
    if given.count(True) != 1:
        raise InputError(
            "give exactly one of --passphrase-file, --new-passphrase-file and --no-passphrase",
            "--new-passphrase-file FILE creates a random passphrase; a passphrase protects the key if the "
            "keyring is copied; --no-passphrase is for protected servers",
        )
    site = app.site  # a home that cannot be opened fails before any file is created
    if new_passphrase_file is not None:
        new_passphrase_file = new_passphrase_file.expanduser().absolute()
        passphrase: str | None = site.keys.create_passphrase_file(new_passphrase_file)
    else:
        passphrase = _read_passphrase_file(passphrase_file) if passphrase_file else None
    # Relative to the current directory, whatever the config makes of it.
    passphrase_path = new_passphrase_file or (passphrase_file.absolute() if passphrase_file else None)
    try:
        key = site.keys.generate(name, email, algo=algo, expires=expires, passphrase=passphrase)
    except BaseException:
        if new_passphrase_file is not None:
            # A passphrase for no key: gone, so that running the command again works.
            new_passphrase_file.unlink(missing_ok=True)
        raise
    if not as_json:
        out.print(f"generated {key.algorithm} key for {echo_escape(key.user_id)}:")
        out.print(f"  {key.grouped_fingerprint}")
        if new_passphrase_file is not None:
            _say(f"wrote its passphrase to {new_passphrase_file} (mode 0600): keep a copy in a safe place")
    try:
        change = site.keys.make_default(key.fingerprint, passphrase_file=passphrase_path, replace=make_default)
    except DicommailError as exc:
        if as_json:
            print_json({"ok": False, "error": error_document(exc), "key": key.to_json()})
        _say(f"the key {key.fingerprint} was generated, but dicommail.toml does not name it yet")
        raise
    identity = site.config.identity
    if as_json:
        print_json({
            "ok": True,
            "key": key.to_json(),
            "passphrase_file": str(passphrase_path) if passphrase_path else None,
            "identity": {
                "changed": change.changed,
                "message": change.message,
                "config_file": str(site.config.config_file),
                "key": _or_null(identity.key),
                "passphrase_file": _or_null(identity.passphrase_file),
            },
        })
        return
    _say(change.message)
    if identity.key != key.fingerprint:
        return  # not this site's key (yet): nothing to send to the peers
    _say(
        f"next: send the public key (dicommail keys export {key.fingerprint} -o site.pub.asc) to your peers "
        "and read them the fingerprint by phone"
    )


@keys.command(name="list")
@click.option("--secret", is_flag=True, help="Only keys with a secret part (this site's own keys).")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@pass_app
@handle_errors
def list_(app: AppContext, secret: bool, as_json: bool) -> None:
    """List the keys in the keyring and whether they are trusted."""
    found = app.site.keys.list(secret=secret)
    if as_json:
        print_json({"ok": True, "keys": [key.to_json() for key in found]})
        return
    if not found:
        info("no keys" + (" with a secret part" if secret else "") + "; see dicommail keys generate / import")
        return
    # Fits 80 columns; the fingerprint is never shortened: it is what people compare.
    table = Table(box=None, pad_edge=False, collapse_padding=True)
    table.add_column("fingerprint / user id", min_width=40, max_width=44, overflow="fold")
    table.add_column("algo")
    table.add_column("expires")
    table.add_column("trust")
    table.add_column("sec")
    for key in found:
        if key.validity == "ultimate":
            trust = "[green]own key[/green]"
        elif key.validity == "full":
            trust = "[green]certified[/green]"
        elif key.validity in ("revoked", "expired", "disabled", "invalid"):
            trust = f"[red]{key.validity}[/red]"
        else:
            trust = "[yellow]not certified[/yellow]"
        user_ids = "\n".join(echo_escape(uid) for uid in key.user_ids)
        table.add_row(
            f"{key.fingerprint}\n{user_ids}",
            key.algorithm,
            key.expires.date().isoformat() if key.expires else "never",
            trust,
            "yes" if key.has_secret else "",
        )
    out.print(table)


@keys.command(name="import")
# Not exists=True: a missing file is reported by the command itself, as one JSON document with --json.
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option(
    "--secret", is_flag=True, help="Also import secret keys (only to restore this site's own key from a backup)."
)
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@pass_app
@handle_errors
def import_(app: AppContext, file: Path, secret: bool, as_json: bool) -> None:
    """Import keys from FILE (armored or binary; - reads stdin)."""
    try:
        data = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {file}: {exc.strerror}", "check the file name and its permissions") from exc
    try:
        imported = app.site.keys.import_(data, secret=secret)
    except InputError as exc:
        source = "standard input" if str(file) == "-" else str(file)
        raise InputError(f"{source}: {exc.message}", exc.hint) from exc
    if as_json:
        print_json({"ok": True, "keys": [key.to_json() for key in imported]})
        return
    for key in imported:
        kind = "secret key" if key.has_secret else "key"
        out.print(f"imported {kind} {echo_escape(key.user_id)} ({key.validity}):")
        out.print(f"  {key.grouped_fingerprint}")
        if key.certified or key.validity in ("revoked", "expired"):
            continue
        if key.has_secret:
            info(
                f'if this is this site\'s own key: set identity.key = "{key.fingerprint}" in dicommail.toml '
                f"and run: dicommail keys certify {key.fingerprint}"
            )
        else:
            info(
                "not trusted yet: check this fingerprint with the key owner by phone, then run: "
                f"dicommail keys certify {key.fingerprint}"
            )


@keys.command()
@click.argument("key_id", metavar="ID")
@click.option("--secret", is_flag=True, help="Export the secret key (for a backup; keep it safe).")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), help="Write to a file, not stdout.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP + " Without -o it holds the armored key.")
@pass_app
@handle_errors
def export(app: AppContext, key_id: str, secret: bool, output: Path | None, as_json: bool) -> None:
    """Export a key, ASCII-armored (public unless --secret)."""
    if output is None:
        text = app.site.keys.export(key_id, secret=secret)
        if not as_json:
            sys.stdout.write(text)
            return
        print_json({"ok": True, "key": app.site.keys.get(key_id).to_json(), "secret": secret, "file": None,
                    "armored": text})
        return
    path = output.expanduser().absolute()
    app.site.keys.export_file(key_id, path, secret=secret)
    if as_json:
        print_json({"ok": True, "key": app.site.keys.get(key_id).to_json(), "secret": secret, "file": str(path)})
        return
    info(f"wrote {path}")


@keys.command()
@click.argument("key_id", metavar="ID")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@pass_app
@handle_errors
def fingerprint(app: AppContext, key_id: str, as_json: bool) -> None:
    """Print a key's fingerprint in groups of four, for reading aloud."""
    key = app.site.keys.get(key_id)
    if as_json:
        print_json({"ok": True, "fingerprint": key.fingerprint, "grouped": key.grouped_fingerprint,
                    "key": key.to_json()})
        return
    out.print(key.grouped_fingerprint)


@keys.command()
@click.argument("key_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask: you checked the fingerprint with the key owner.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@pass_app
@handle_errors
def certify(app: AppContext, key_id: str, yes: bool, as_json: bool) -> None:
    """Trust a peer's key: certify it locally after checking its fingerprint."""
    key = app.site.keys.get(key_id)
    if not key.certified:
        err.print("certify this key?")
        _describe(key, as_json)
        _ask("Did you check this fingerprint with the key owner?", yes)
    change = app.site.keys.certify(key.fingerprint)
    if as_json:
        print_json({"ok": True, **change.to_json()})
        return
    out.print(echo_escape(change.message))


@keys.command()
@click.argument("key_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@pass_app
@handle_errors
def revoke(app: AppContext, key_id: str, yes: bool, as_json: bool) -> None:
    """Revoke this site's key, or withdraw the certification of a peer's key."""
    key = app.site.keys.get(key_id)
    _describe(key, as_json)
    if key.has_secret:
        question = "Revoke this site's OWN key for good (peers will refuse it once they import the revocation)?"
    else:
        question = "Withdraw this site's certification (mail signed with this key will be refused)?"
    _ask(question, yes)
    change = app.site.keys.revoke(key.fingerprint)
    if as_json:
        print_json({"ok": True, **change.to_json()})
        return
    out.print(echo_escape(change.message))
    if key.has_secret and change.changed:
        info(f"next: dicommail keys export {key.fingerprint} -o revoked.pub.asc and send it to every peer")


@keys.command()
@click.argument("key_id", metavar="ID")
@click.option("--secret", is_flag=True, help="Also delete the secret part (required for this site's own key).")
@click.option("--yes", is_flag=True, help="Do not ask.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@pass_app
@handle_errors
def delete(app: AppContext, key_id: str, secret: bool, yes: bool, as_json: bool) -> None:
    """Delete a key from the keyring."""
    key = app.site.keys.get(key_id)
    _describe(key, as_json)
    if key.has_secret and secret:
        question = "Delete this site's SECRET key? Mail encrypted to it can never be read again."
    else:
        question = "Delete this key?"
    _ask(question, yes)
    deleted = app.site.keys.delete(key.fingerprint, secret=secret)
    if as_json:
        print_json({"ok": True, "changed": True, "message": f"deleted {deleted.fingerprint}", "key": deleted.to_json()})
        return
    out.print(f"deleted {deleted.fingerprint}")


@keys.command()
@click.argument("key_id", metavar="[ID]", required=False)
@click.option("--expires", default="2y", show_default=True, help="e.g. 2y, 18m, 365d, 2028-12-31 or never.")
@click.option("--json", "as_json", is_flag=True, help=_JSON_HELP)
@pass_app
@handle_errors
def extend(app: AppContext, key_id: str | None, expires: str, as_json: bool) -> None:
    """Extend the expiry of this site's own key (default) and its subkeys."""
    change = app.site.keys.extend(key_id, expires)
    if as_json:
        print_json({"ok": True, **change.to_json()})
        return
    out.print(echo_escape(change.message))


COMMANDS: list[click.Command] = [keys]
