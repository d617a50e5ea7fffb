"""``dicommail keys`` through click's test runner, on real keyrings."""

from __future__ import annotations

import ast
import json
import re
import stat
import subprocess
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from dicommail import Site
from dicommail.cli.main import cli
from dicommail.crypto.gpg import Keyring

GROUPED = re.compile(r"\b(?:[0-9A-F]{4} ){4}[0-9A-F]{4}  (?:[0-9A-F]{4} ){4}[0-9A-F]{4}\b")


def run(home: Path, *args: str, input: str | None = None) -> Result:
    return CliRunner().invoke(cli, ["--home", str(home), "keys", *args], input=input)


def ok(home: Path, *args: str) -> Result:
    result = run(home, *args)
    assert result.exit_code == 0, result.output
    return result


def listing(home: Path) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = json.loads(ok(home, "list", "--json").stdout)["keys"]
    return keys


@pytest.fixture
def homes(tmp_path: Path) -> Any:
    """Two dicommail homes with short paths (gpg-agent socket length)."""
    import shutil
    import tempfile

    made = [Path(tempfile.mkdtemp(prefix="dm")) for _ in range(2)]
    for home in made:
        (home / "dicommail.toml").touch()
    yield made
    for home in made:
        if (home / "gnupg").exists():
            Keyring(home / "gnupg").close()
        shutil.rmtree(home, ignore_errors=True)


def generate(home: Path, name: str) -> str:
    result = ok(home, "generate", "--name", f"{name} (TEST ONLY)", "--email", f"{name}@{name}.test",
                "--algo", "ed25519", "--no-passphrase")
    match = GROUPED.search(result.stdout)
    assert match, result.output
    return match.group(0).replace(" ", "")


def test_generate_needs_exactly_one_passphrase_option(homes: list[Path], tmp_path: Path) -> None:
    home = homes[0]
    neither = run(home, "generate", "--name", "Site", "--email", "site@site.test", "--algo", "ed25519")
    assert neither.exit_code != 0 and "--passphrase-file" in neither.output
    secret = tmp_path / "pass"
    secret.write_text("a passphrase\n")
    both = run(home, "generate", "--name", "Site", "--email", "site@site.test", "--passphrase-file", str(secret),
               "--no-passphrase")
    assert both.exit_code != 0
    assert not (home / "gnupg").exists() or listing(home) == []


def test_generate_with_passphrase_file_never_prints_it(homes: list[Path], tmp_path: Path) -> None:
    secret = tmp_path / "pass"
    secret.write_text("sesame-open-up\n")
    (homes[0] / "gnupg").mkdir(mode=0o700)
    # Fast key derivation (a test key); dicommail keeps an existing agent config.
    (homes[0] / "gnupg" / "gpg-agent.conf").write_text("s2k-count 65536\n")
    result = ok(homes[0], "generate", "--name", "Locked (TEST ONLY)", "--email", "locked@locked.test",
                "--algo", "ed25519", "--passphrase-file", str(secret))
    assert "sesame" not in result.output
    (key,) = listing(homes[0])
    assert key["has_secret"] and key["algorithm"] == "ed25519"


def test_generate_list_export_import_certify(homes: list[Path], tmp_path: Path) -> None:
    alpha, beta = homes
    fpr_a = generate(alpha, "alpha")
    fpr_b = generate(beta, "beta")

    (key,) = listing(alpha)
    assert key["fingerprint"] == fpr_a and key["email"] == "alpha@alpha.test"
    assert key["has_secret"] and key["validity"] == "ultimate" and key["certified"]
    assert key["algorithm"] == "ed25519" and key["expires"]
    table = ok(alpha, "list").stdout
    assert fpr_a in table and "alpha (TEST ONLY) <alpha@alpha.test>" in table and "own key" in table

    printed = ok(alpha, "fingerprint", "alpha@alpha.test").stdout.strip()
    assert GROUPED.fullmatch(printed) and printed.replace(" ", "") == fpr_a

    exported = tmp_path / "alpha.pub.asc"
    ok(alpha, "export", fpr_a, "-o", str(exported))
    assert exported.read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    assert ok(alpha, "export", fpr_a).stdout == exported.read_text()
    imported = ok(beta, "import", str(exported))
    assert GROUPED.search(imported.stdout) and "certify" in imported.output
    peer = next(k for k in listing(beta) if k["fingerprint"] == fpr_a)
    assert not peer["has_secret"] and not peer["certified"]

    # No terminal and no --yes: refuse instead of certifying unasked.
    refused = run(beta, "certify", fpr_a)
    assert refused.exit_code != 0 and "--yes" in refused.output
    assert not next(k for k in listing(beta) if k["fingerprint"] == fpr_a)["certified"]

    certified = ok(beta, "certify", fpr_a, "--yes")
    assert "certified" in certified.stdout
    peer = next(k for k in listing(beta) if k["fingerprint"] == fpr_a)
    assert peer["certified"] and peer["validity"] == "full"
    assert "already certified" in ok(beta, "certify", fpr_a, "--yes").stdout
    assert "own key" in ok(beta, "certify", fpr_b, "--yes").stdout

    # Withdrawing the certification makes it untrusted again.
    ok(beta, "revoke", fpr_a, "--yes")
    assert not next(k for k in listing(beta) if k["fingerprint"] == fpr_a)["certified"]

    secret = tmp_path / "alpha.sec.asc"
    ok(alpha, "export", fpr_a, "--secret", "-o", str(secret))
    assert secret.read_text().startswith("-----BEGIN PGP PRIVATE KEY BLOCK-----")
    assert secret.stat().st_mode & 0o077 == 0


def test_revoked_own_key_reaches_peers(homes: list[Path], tmp_path: Path) -> None:
    alpha, beta = homes
    fpr_a = generate(alpha, "alpha")
    exported = tmp_path / "alpha.pub.asc"
    ok(alpha, "export", fpr_a, "-o", str(exported))
    ok(beta, "import", str(exported))

    refused = run(alpha, "revoke", fpr_a)
    assert refused.exit_code != 0 and "--yes" in refused.output
    ok(alpha, "revoke", fpr_a, "--yes")
    assert listing(alpha)[0]["validity"] == "revoked"

    ok(alpha, "export", fpr_a, "-o", str(exported))
    ok(beta, "import", str(exported))
    (peer,) = listing(beta)
    assert peer["fingerprint"] == fpr_a and peer["validity"] == "revoked" and not peer["certified"]
    # Plain gpg agrees.
    shown = subprocess.run(["gpg", "--homedir", str(beta / "gnupg"), "--batch", "--list-keys", fpr_a],
                           capture_output=True, text=True, check=True).stdout
    assert "revoked" in shown


def test_delete(homes: list[Path], tmp_path: Path) -> None:
    alpha, beta = homes
    fpr_a = generate(alpha, "alpha")
    exported = tmp_path / "alpha.pub.asc"
    ok(alpha, "export", fpr_a, "-o", str(exported))
    ok(beta, "import", str(exported))

    assert run(beta, "delete", fpr_a).exit_code != 0  # no terminal, no --yes
    ok(beta, "delete", fpr_a, "--yes")
    assert listing(beta) == []

    own = run(alpha, "delete", fpr_a, "--yes")
    assert own.exit_code != 0 and "--secret" in own.output
    ok(alpha, "delete", fpr_a, "--secret", "--yes")
    assert listing(alpha) == []


def test_errors_become_messages_with_hints(homes: list[Path], tmp_path: Path) -> None:
    home = homes[0]
    missing = run(home, "fingerprint", "nobody@nowhere.test")
    assert missing.exit_code == 1 and "nobody@nowhere.test" in missing.output and "hint" in missing.output
    garbage = tmp_path / "garbage.asc"
    garbage.write_text("not a key\n")
    bad = run(home, "import", str(garbage))
    assert bad.exit_code == 1 and "no key could be imported" in bad.output
    assert "Traceback" not in bad.output


def test_import_refuses_secret_keys_without_secret_option(homes: list[Path], tmp_path: Path) -> None:
    alpha, beta = homes
    fpr_a = generate(alpha, "alpha")
    fpr_b = generate(beta, "beta")
    secret = tmp_path / "alpha.sec.asc"
    ok(alpha, "export", fpr_a, "--secret", "-o", str(secret))

    refused = run(beta, "import", str(secret))
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "SECRET key of " + fpr_a in refused.output and "nothing was imported" in refused.output
    assert str(secret) in refused.output and "--secret" in refused.output
    assert [key["fingerprint"] for key in listing(beta)] == [fpr_b]

    imported = ok(beta, "import", "--secret", str(secret))
    assert "imported secret key" in imported.stdout
    # beta's own key is configured: alpha's key (secret and all) is certified as a peer's, not as our own.
    (beta / "dicommail.toml").write_text(f'[identity]\nkey = "{fpr_b}"\n')
    certified = ok(beta, "certify", fpr_a, "--yes")
    assert "not this site's key" in certified.stdout
    keys = {key["fingerprint"]: key for key in listing(beta)}
    assert keys[fpr_a]["validity"] == "full" and keys[fpr_b]["validity"] == "ultimate"


# -- generate records the identity; passphrase files; paths ------------------------


@pytest.fixture
def site_home(homes: list[Path]) -> Path:
    """A home made by ``dicommail init`` (the commented template) whose keyring derives keys quickly."""
    home = homes[0]
    (home / "dicommail.toml").unlink()
    result = CliRunner().invoke(cli, ["--home", str(home), "init", "--address", "site@site.test"])
    assert result.exit_code == 0, result.output
    fast_key_derivation(home)
    return home


def fast_key_derivation(home: Path) -> None:
    """Passphrase-protected test keys without the agent's calibrated (slow) key derivation."""
    (home / "gnupg").mkdir(mode=0o700, exist_ok=True)
    (home / "gnupg" / "gpg-agent.conf").write_text("s2k-count 65536\n")


def identity(home: Path) -> dict[str, str]:
    settings: dict[str, str] = tomllib.loads((home / "dicommail.toml").read_text())["identity"]
    return settings


def make_key(home: Path, name: str, *options: str) -> Result:
    return run(home, "generate", "--name", f"{name} (TEST ONLY)", "--email", f"{name}@{name}.test",
               "--algo", "ed25519", *options)


def test_new_passphrase_file_is_private_random_and_recorded(site_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    template = (site_home / "dicommail.toml").read_text()
    monkeypatch.chdir(site_home)
    result = make_key(site_home, "alpha", "--new-passphrase-file", "passphrase")
    assert result.exit_code == 0, result.output
    fpr = (match := GROUPED.search(result.stdout)) and match.group(0).replace(" ", "")
    assert fpr
    secret = site_home / "passphrase"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    passphrase = secret.read_text().splitlines()[0]
    assert len(passphrase) >= 32 and passphrase not in result.output
    assert str(secret) in result.output and "is now this site's key" in result.output
    # Only the two settings changed; the template's comments are all still there.
    expected = template.replace('\nkey = ""\n', f'\nkey = "{fpr}"\n', 1)
    expected = expected.replace('\npassphrase_file = ""\n', '\npassphrase_file = "passphrase"\n', 1)
    assert (site_home / "dicommail.toml").read_text() == expected
    (key,) = listing(site_home)
    assert key["fingerprint"] == fpr
    # The key is protected, and the recorded path unlocks it.
    extended = ok(site_home, "extend", "--expires", "3y", "--json")
    assert json.loads(extended.stdout)["changed"]
    secret.write_text("wrong\n")
    assert "wrong passphrase" in run(site_home, "extend", "--expires", "4y").output


def test_new_passphrase_file_refusals(site_home: Path, tmp_path: Path) -> None:
    existing = tmp_path / "existing"
    existing.write_text("keep me\n")
    refused = make_key(site_home, "alpha", "--new-passphrase-file", str(existing))
    assert refused.exit_code == 1 and "exists already" in refused.output and "--passphrase-file" in refused.output
    assert existing.read_text() == "keep me\n"
    as_json = make_key(site_home, "alpha", "--new-passphrase-file", str(existing), "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["error"]["code"] == "input"

    fresh = tmp_path / "fresh"
    both = make_key(site_home, "alpha", "--new-passphrase-file", str(fresh), "--passphrase-file", str(existing))
    assert both.exit_code == 1 and "exactly one of" in both.output
    no_dir = make_key(site_home, "alpha", "--new-passphrase-file", str(tmp_path / "missing" / "pass"))
    assert no_dir.exit_code == 1 and "cannot create the passphrase file" in no_dir.output
    # A key that cannot be made leaves no passphrase file behind either.
    bad = run(site_home, "generate", "--name", "x", "--email", "nobody", "--new-passphrase-file", str(fresh))
    assert bad.exit_code == 1
    assert not fresh.exists() and listing(site_home) == [] and identity(site_home)["key"] == ""


def test_relative_paths_mean_the_same_in_the_config(homes: list[Path], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    inside, outside = homes
    for home in homes:
        fast_key_derivation(home)
    # Relative to the current directory on the command line; relative to the home in the config.
    (inside / "secrets").mkdir()
    monkeypatch.chdir(inside / "secrets")
    assert make_key(inside, "alpha", "--new-passphrase-file", "pass").exit_code == 0
    assert identity(inside)["passphrase_file"] == "secrets/pass"
    # Outside the home: absolute.
    monkeypatch.chdir(tmp_path)
    Path("given").write_text("a passphrase\n")
    assert make_key(outside, "beta", "--passphrase-file", "given").exit_code == 0
    assert identity(outside)["passphrase_file"] == str(tmp_path / "given")
    for home in homes:
        assert json.loads(ok(home, "extend", "--json").stdout)["ok"]  # both unlock from anywhere

    exported = ok(inside, "export", "alpha@alpha.test", "-o", "alpha.asc", "--json")
    assert json.loads(exported.stdout)["file"] == str(tmp_path / "alpha.asc")
    assert (tmp_path / "alpha.asc").read_text().startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    imported = ok(outside, "import", "alpha.asc", "--json")
    assert [k["email"] for k in json.loads(imported.stdout)["keys"]] == ["alpha@alpha.test"]


def test_generate_never_switches_this_sites_key_unasked(site_home: Path) -> None:
    first = make_key(site_home, "alpha", "--no-passphrase")
    assert first.exit_code == 0, first.output
    fpr_a = identity(site_home)["key"]
    assert fpr_a and identity(site_home)["passphrase_file"] == ""

    second = make_key(site_home, "beta", "--no-passphrase")
    assert second.exit_code == 0, second.output
    assert identity(site_home)["key"] == fpr_a
    fpr_b = next(k["fingerprint"] for k in listing(site_home) if k["email"] == "beta@beta.test")
    assert "names another key" in second.output and f'  key = "{fpr_b}"' in second.output
    assert "next: send" not in second.output
    assert max(len(line) for line in second.output.splitlines()) <= 80

    third = make_key(site_home, "gamma", "--no-passphrase", "--make-default", "--json")
    assert third.exit_code == 0, third.output
    data = json.loads(third.stdout)
    fpr_c = data["key"]["fingerprint"]
    assert data["ok"] and data["passphrase_file"] is None
    assert data["identity"] == {"changed": True, "message": data["identity"]["message"],
                                "config_file": str(site_home / "dicommail.toml"), "key": fpr_c,
                                "passphrase_file": None}
    assert identity(site_home)["key"] == fpr_c


def test_generate_keeps_the_only_key_in_use_when_identity_is_unset(homes: list[Path]) -> None:
    home = homes[0]
    old = Site.open(home).keys.generate("old (TEST ONLY)", "old@old.test", algo="ed25519", passphrase=None)
    result = make_key(home, "new", "--no-passphrase")
    assert result.exit_code == 0, result.output
    assert "stays " + old.fingerprint in result.output
    # Set, so that two secret keys do not leave the site without one.
    assert identity(home) == {"key": old.fingerprint}
    assert Site.open(home).keys.own().fingerprint == old.fingerprint


def test_a_config_that_cannot_be_edited_is_left_alone(homes: list[Path]) -> None:
    home = homes[0]
    text = 'identity = { address = "site@site.test" }\n'
    (home / "dicommail.toml").write_text(text)
    result = make_key(home, "alpha", "--no-passphrase", "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert not data["ok"] and data["error"]["code"] == "config" and "by hand" in data["error"]["hint"]
    assert data["key"]["fingerprint"] in result.output.split("hint:")[0]  # the key is named: it exists
    assert (home / "dicommail.toml").read_text() == text


# -- --json everywhere -------------------------------------------------------------


def one_document(result: Result, ok_expected: bool = True) -> dict[str, Any]:
    assert result.exit_code == (0 if ok_expected else 1), result.output
    data: dict[str, Any] = json.loads(result.stdout)  # exactly one document, nothing else on stdout
    assert data["ok"] is ok_expected
    return data


def assert_key_json(key: dict[str, Any]) -> None:
    assert re.fullmatch(r"[0-9A-F]{40}", key["fingerprint"])
    assert datetime.fromisoformat(key["created"]).utcoffset() is not None
    assert key["expires"] is None or datetime.fromisoformat(key["expires"]).utcoffset() is not None


def test_every_keys_command_prints_one_json_document(homes: list[Path], tmp_path: Path) -> None:
    alpha, beta = homes
    made = one_document(make_key(alpha, "alpha", "--no-passphrase", "--json"))
    assert_key_json(made["key"])
    fpr_a = made["key"]["fingerprint"]
    generate(beta, "beta")

    listed = one_document(run(alpha, "list", "--json"))
    assert [k["fingerprint"] for k in listed["keys"]] == [fpr_a]
    shown = one_document(run(alpha, "fingerprint", "alpha@alpha.test", "--json"))
    assert shown["fingerprint"] == fpr_a and shown["grouped"].replace(" ", "") == fpr_a
    assert_key_json(shown["key"])
    armored = one_document(run(alpha, "export", fpr_a, "--json"))
    assert armored["armored"].startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----") and armored["file"] is None
    written = one_document(run(alpha, "export", fpr_a, "-o", str(tmp_path / "a.asc"), "--json"))
    assert written["file"] == str(tmp_path / "a.asc") and written["key"]["fingerprint"] == fpr_a

    imported = one_document(run(beta, "import", str(tmp_path / "a.asc"), "--json"))
    assert [k["fingerprint"] for k in imported["keys"]] == [fpr_a]
    one_document(run(beta, "certify", fpr_a, "--json"), ok_expected=False)  # no terminal, no --yes
    certified = one_document(run(beta, "certify", fpr_a, "--yes", "--json"))
    assert certified["changed"] and certified["key"]["certified"]
    withdrawn = one_document(run(beta, "revoke", fpr_a, "--yes", "--json"))
    assert withdrawn["changed"] and not withdrawn["key"]["certified"]
    deleted = one_document(run(beta, "delete", fpr_a, "--yes", "--json"))
    assert deleted["changed"] and deleted["key"]["fingerprint"] == fpr_a
    extended = one_document(run(alpha, "extend", fpr_a, "--json"))
    assert_key_json(extended["key"])
    revoked = one_document(run(alpha, "revoke", fpr_a, "--yes", "--json"))
    assert revoked["key"]["validity"] == "revoked"

    for failing in (
        ("fingerprint", "nobody@nowhere.test"),
        ("export", "nobody@nowhere.test", "-o", str(tmp_path / "x.asc")),
        ("import", str(tmp_path / "a.asc.missing")),
        ("delete", fpr_a, "--yes"),
        ("extend", "nobody@nowhere.test"),
        ("list",),
    ):
        args = (*failing, "--json")
        if failing == ("list",):
            (alpha / "dicommail.toml").write_text("[identity\n")
        result = run(alpha, *args)
        data = one_document(result, ok_expected=False)
        assert data["error"]["message"] and "hint" in data["error"], failing


def test_extend_by_id_for_two_years(homes: list[Path]) -> None:
    home = homes[0]
    made = json.loads(ok(home, "generate", "--name", "alpha (TEST ONLY)", "--email", "alpha@alpha.test",
                         "--algo", "ed25519", "--no-passphrase", "--expires", "1y", "--json").stdout)
    fpr = made["key"]["fingerprint"]
    result = ok(home, "extend", fpr, "--expires", "2y")
    assert f"extended {fpr}" in result.stdout
    (key,) = listing(home)
    days = (datetime.fromisoformat(key["expires"]) - datetime.now(UTC)).days
    assert 725 <= days <= 732, days


# -- hints ------------------------------------------------------------------------------

#: Text that names gpg for someone else's keyring: the reader of a signed constancy report.
FOREIGN_KEYRING = {"constancy/report.py": "gpg --verify FILE.pdf.asc FILE.pdf"}


def test_every_gpg_command_in_a_message_names_this_sites_homedir() -> None:
    root = Path(__file__).resolve().parents[2] / "dicommail"
    offending = []
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
        docstrings = {id(node.value) for node in ast.walk(tree) if isinstance(node, ast.Expr)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Constant | ast.JoinedStr) or id(node) in docstrings:
                continue
            text = ast.get_source_segment(source, node) or ""
            if not re.search(r"\bgpg --", text) or "--homedir" in text:
                continue
            if FOREIGN_KEYRING.get(path.relative_to(root).as_posix(), "\0") in text:
                continue
            offending.append(f"{path.relative_to(root)}:{node.lineno}: {text}")
    assert offending == []
