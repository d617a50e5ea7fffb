"""``dicommail keys`` through click's test runner, on real keyrings."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

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
