"""``site.keys``: every method against real keyrings, errors as the documented types."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from dicommail import (
    AmbiguousKeyError,
    ConfigError,
    CryptoError,
    InputError,
    KeyNotFoundError,
    PassphraseError,
    Site,
)
from dicommail.cli.main import cli
from dicommail.crypto import keys as crypto_keys
from dicommail.crypto.gpg import Keyring
from dicommail.site.keys import KeyChange, KeyInfo
from tests.conftest import short_tempdir

NewSite = Callable[[str], Site]
PAST = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
def new_site() -> Iterator[NewSite]:
    """A factory for fresh, empty sites in short directories (gpg-agent's socket path)."""
    made: list[Path] = []

    def make(name: str) -> Site:
        home = short_tempdir()
        made.append(home)
        return Site.init(home, f"{name}@{name}.test")

    yield make
    for home in made:
        if (home / "gnupg").exists():
            Keyring(home / "gnupg").close()
        shutil.rmtree(home, ignore_errors=True)


def with_key(site: Site, name: str, expires: str = "2y", passphrase: str | None = None) -> KeyInfo:
    """Give ``site`` its own ed25519 key (quick to make), unprotected unless a passphrase is given."""
    return site.keys.generate(
        f"{name} (TEST ONLY)", f"{name}@{name}.test", algo="ed25519", expires=expires, passphrase=passphrase
    )


def configure(site: Site, **identity: str) -> Site:
    """The site reopened with identity settings changed in its dicommail.toml."""
    text = site.config.config_file.read_text(encoding="utf-8")
    for setting, value in identity.items():
        text = text.replace(f'\n{setting} = ""\n', f'\n{setting} = "{value}"\n', 1)
    site.config.config_file.write_text(text, encoding="utf-8")
    return Site.open(site.home)


def befriend(site: Site, peer: Site) -> KeyInfo:
    """``site`` imports ``peer``'s public key (not certified); returns it as imported."""
    (key,) = site.keys.import_(peer.keys.export(peer.keys.own().fingerprint).encode())
    return key


def cli_keys(site: Site, *args: str) -> Result:
    return CliRunner().invoke(cli, ["--home", str(site.home), "keys", *args])


def subkey_expiries(site: Site, fingerprint: str) -> list[str]:
    """Each subkey's expiry as plain gpg lists it (empty: never)."""
    listing = subprocess.run(
        ["gpg", "--homedir", str(site.config.gnupg_home), "--batch", "--with-colons", "--list-keys", fingerprint],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [line.split(":")[6] for line in listing.splitlines() if line.startswith("sub:")]


# -- listing and finding -----------------------------------------------------------


def test_generate_list_get_own_fingerprint(new_site: NewSite) -> None:
    site = new_site("alpha")
    assert site.keys.list() == []
    key = with_key(site, "alpha", expires="1y")
    assert key.email == "alpha@alpha.test" and key.algorithm == "ed25519"
    assert key.has_secret and key.validity == "ultimate" and key.certified
    assert key.can_sign and key.can_encrypt and key.expires is not None
    assert site.keys.list() == [key] and site.keys.list(secret=True) == [key]
    assert site.keys.get("alpha@alpha.test") == key == site.keys.get(key.key_id)
    assert site.keys.own() == key
    grouped = site.keys.fingerprint(key.fingerprint.lower())
    assert grouped == key.grouped_fingerprint and grouped.replace(" ", "") == key.fingerprint
    assert len(grouped.split("  ")) == 2  # two halves, as gpg prints it


def test_list_json_is_what_the_cli_prints(new_site: NewSite) -> None:
    site = new_site("alpha")
    with_key(site, "alpha")
    result = cli_keys(site, "list", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"ok": True, "keys": [k.to_json() for k in site.keys.list()]}


def test_generate_refuses_bad_input(new_site: NewSite) -> None:
    site = new_site("alpha")
    with pytest.raises(InputError):
        site.keys.generate("Alpha", "not an address", passphrase=None)
    with pytest.raises(InputError):
        site.keys.generate("Alpha", "alpha@alpha.test", expires="soon", passphrase=None)
    assert site.keys.list() == []


def test_errors_are_documented_types(new_site: NewSite) -> None:
    site = new_site("alpha")
    with pytest.raises(KeyNotFoundError):
        site.keys.own()
    with_key(site, "alpha")
    with pytest.raises(KeyNotFoundError):
        site.keys.get("nobody@nowhere.test")
    with pytest.raises(KeyNotFoundError):
        site.keys.get("ABCD1234")  # short key ids are refused
    with pytest.raises(KeyNotFoundError):
        site.keys.export("nobody@nowhere.test")
    with pytest.raises(CryptoError, match="no key could be imported"):
        site.keys.import_(b"not a key\n")
    with pytest.raises(InputError):
        site.keys.import_(b"")
    # A second key for the same address: naming it by address is ambiguous.
    site.keys.generate("alpha again (TEST ONLY)", "alpha@alpha.test", algo="ed25519", passphrase=None)
    with pytest.raises(AmbiguousKeyError):
        site.keys.get("alpha@alpha.test")
    with pytest.raises(AmbiguousKeyError):
        site.keys.own()


# -- export, import, certify, revoke, delete ------------------------------------------


def test_export_import_certify_and_withdraw(new_site: NewSite) -> None:
    alpha, beta = new_site("alpha"), new_site("beta")
    key_a, key_b = with_key(alpha, "alpha"), with_key(beta, "beta")
    armored = alpha.keys.export(key_a.fingerprint)
    assert armored.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")

    (peer,) = beta.keys.import_(armored.encode())
    assert peer.fingerprint == key_a.fingerprint and not peer.has_secret and not peer.certified

    change = beta.keys.certify(key_a.fingerprint)
    assert isinstance(change, KeyChange) and change.changed
    assert change.key.certified and change.key.validity == "full"
    assert beta.keys.get(key_a.fingerprint).certified
    again = beta.keys.certify(key_a.fingerprint)
    assert not again.changed and "already certified" in again.message
    own = beta.keys.certify(key_b.fingerprint)
    assert not own.changed and "own key" in own.message
    assert change.to_json() == {"changed": True, "message": change.message, "key": change.key.to_json()}

    withdrawn = beta.keys.revoke(key_a.fingerprint)
    assert withdrawn.changed and not withdrawn.key.certified
    assert not beta.keys.get(key_a.fingerprint).certified
    assert beta.keys.certify(key_a.fingerprint).key.certified  # and it can be certified again


def test_export_file_is_private_and_matches_export(new_site: NewSite) -> None:
    site = new_site("alpha")
    key = with_key(site, "alpha")
    public = site.home / "out" / "alpha.pub.asc"
    site.keys.export_file(key.fingerprint, public)
    assert public.read_text() == site.keys.export(key.fingerprint)
    secret = site.home / "alpha.sec.asc"
    site.keys.export_file(key.fingerprint, secret, secret=True)
    assert secret.read_text().startswith("-----BEGIN PGP PRIVATE KEY BLOCK-----")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert [p.name for p in secret.parent.iterdir() if p.name.endswith(".tmp")] == []


def test_secret_import_needs_secret(new_site: NewSite) -> None:
    alpha, beta = new_site("alpha"), new_site("beta")
    key_a, key_b = with_key(alpha, "alpha"), with_key(beta, "beta")
    backup = alpha.keys.export(key_a.fingerprint, secret=True).encode()
    with pytest.raises(InputError, match="SECRET key of " + key_a.fingerprint):
        beta.keys.import_(backup)
    assert [k.fingerprint for k in beta.keys.list()] == [key_b.fingerprint]
    (restored,) = beta.keys.import_(backup, secret=True)
    assert restored.fingerprint == key_a.fingerprint and restored.has_secret


def test_revoke_own_key_reaches_peers(new_site: NewSite) -> None:
    alpha, beta = new_site("alpha"), new_site("beta")
    key_a = with_key(alpha, "alpha")
    befriend(beta, alpha)
    change = alpha.keys.revoke(key_a.fingerprint)
    assert change.changed and change.key.validity == "revoked" and "every peer" in change.message
    assert not alpha.keys.revoke(key_a.fingerprint).changed
    (peer,) = beta.keys.import_(alpha.keys.export(key_a.fingerprint).encode())
    assert peer.validity == "revoked" and not peer.certified


def test_delete(new_site: NewSite) -> None:
    alpha, beta = new_site("alpha"), new_site("beta")
    key_a, key_b = with_key(alpha, "alpha"), with_key(beta, "beta")
    befriend(beta, alpha)
    deleted = beta.keys.delete(key_a.fingerprint)
    assert deleted.fingerprint == key_a.fingerprint
    assert [k.fingerprint for k in beta.keys.list()] == [key_b.fingerprint]
    with pytest.raises(CryptoError, match="secret"):
        beta.keys.delete(key_b.fingerprint)
    assert beta.keys.delete(key_b.fingerprint, secret=True).has_secret
    assert beta.keys.list() == []
    with pytest.raises(KeyNotFoundError):
        beta.keys.delete(key_b.fingerprint)


# -- extend ----------------------------------------------------------------------


def test_extend_own_key_and_subkeys(new_site: NewSite) -> None:
    site = new_site("alpha")
    key = with_key(site, "alpha", expires="1y")
    assert key.expires is not None
    subkeys_before = subkey_expiries(site, key.fingerprint)

    change = site.keys.extend(expires="3y")  # no id: this site's own key
    assert change.changed and change.key.fingerprint == key.fingerprint
    assert change.key.expires is not None and change.key.expires > key.expires + timedelta(days=700)
    assert site.keys.get(key.fingerprint).expires == change.key.expires
    subkeys_after = subkey_expiries(site, key.fingerprint)
    assert len(subkeys_after) == 1 and subkeys_after != subkeys_before
    assert int(subkeys_after[0]) > int(subkeys_before[0]) + 700 * 86400
    assert "export" in change.message and "peer" in change.message

    forever = site.keys.extend(key.key_id, "never")
    assert forever.changed and forever.key.expires is None and subkey_expiries(site, key.fingerprint) == [""]
    assert not site.keys.extend(key.fingerprint, "never").changed


def test_extend_revives_an_expired_key(new_site: NewSite) -> None:
    site = new_site("alpha")
    # Backdated, so that it and its encryption subkey expired long ago (only crypto.keys can backdate).
    keyring = Keyring(site.config.gnupg_home)
    try:
        old = crypto_keys.generate(keyring, "Alpha (TEST ONLY)", "alpha@alpha.test", "ed25519", "1y", created=PAST)
    finally:
        keyring.close()
    assert old.validity == "expired" and not old.can_encrypt

    change = site.keys.extend()
    assert change.changed and change.key.validity == "ultimate" and change.key.can_encrypt
    assert change.key.expires is not None and change.key.expires > datetime.now(UTC) + timedelta(days=700)


def test_extend_refuses_keys_that_are_not_ours(new_site: NewSite) -> None:
    alpha, beta = new_site("alpha"), new_site("beta")
    key_a, key_b = with_key(alpha, "alpha"), with_key(beta, "beta")
    peer = befriend(beta, alpha)
    before = beta.keys.get(peer.fingerprint).expires
    with pytest.raises(CryptoError, match="peer's key") as refused:
        beta.keys.extend(key_a.fingerprint)
    assert refused.value.hint
    assert beta.keys.get(peer.fingerprint).expires == before

    # A secret key that is not this site's (identity.key names another) is not ours to extend either.
    beta.keys.import_(alpha.keys.export(key_a.fingerprint, secret=True).encode(), secret=True)
    beta = configure(beta, key=key_b.fingerprint)
    with pytest.raises(CryptoError, match="not this site's key"):
        beta.keys.extend(key_a.fingerprint)
    assert beta.keys.extend().key.fingerprint == key_b.fingerprint  # identity.key picks ours

    with pytest.raises(InputError):
        beta.keys.extend(expires="soon")
    with pytest.raises(KeyNotFoundError):
        beta.keys.extend("nobody@nowhere.test")


def test_extend_revoked_key_is_refused(new_site: NewSite) -> None:
    site = new_site("alpha")
    key = with_key(site, "alpha")
    site.keys.revoke(key.fingerprint)
    with pytest.raises(CryptoError, match="revoked"):
        site.keys.extend(key.fingerprint)


def test_extend_uses_the_passphrase_file(new_site: NewSite) -> None:
    site = new_site("locked")
    site.config.gnupg_home.mkdir(mode=0o700)
    # Fast key derivation (a test key); dicommail keeps an existing agent config.
    (site.config.gnupg_home / "gpg-agent.conf").write_text("s2k-count 65536\n")
    key = with_key(site, "locked", expires="1y", passphrase="sesame-open-up")

    with pytest.raises(PassphraseError):
        site.keys.extend()  # no identity.passphrase_file
    (site.home / "passphrase").write_text("wrong\n")
    site = configure(site, passphrase_file="passphrase")
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        site.keys.extend()
    (site.home / "passphrase").write_text("sesame-open-up\n")
    change = site.keys.extend(expires="3y")
    assert change.changed and key.expires is not None and change.key.expires is not None
    assert change.key.expires > key.expires + timedelta(days=700)


def test_cli_extend(new_site: NewSite) -> None:
    alpha, beta = new_site("alpha"), new_site("beta")
    key_a = with_key(alpha, "alpha", expires="1y")
    with_key(beta, "beta")
    befriend(beta, alpha)

    shown = cli_keys(alpha, "extend", "--expires", "3y", "--json")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    after = alpha.keys.get(key_a.fingerprint)
    assert data == {"ok": True, "changed": True, "message": data["message"], "key": after.to_json()}
    assert after.expires is not None and key_a.expires is not None and after.expires > key_a.expires

    plain = cli_keys(alpha, "extend", key_a.fingerprint, "--expires", "never")
    assert plain.exit_code == 0 and "dicommail keys export" in plain.stdout
    assert alpha.keys.get(key_a.fingerprint).expires is None

    refused = cli_keys(beta, "extend", key_a.fingerprint)
    assert refused.exit_code == 1 and "peer's key" in refused.output and "hint" in refused.output
    refused_json = cli_keys(beta, "extend", key_a.fingerprint, "--json")
    assert refused_json.exit_code == 1
    assert json.loads(refused_json.stdout)["error"]["code"] == "crypto"


# -- passphrase files and this site's key in dicommail.toml ------------------------------


def test_create_passphrase_file(tmp_path: Path, new_site: NewSite) -> None:
    site = new_site("alpha")
    path = tmp_path / "passphrase"
    previous = os.umask(0)  # 0600 whatever the umask
    try:
        passphrase = site.keys.create_passphrase_file(path)
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text() == passphrase + "\n" and len(passphrase) >= 32
    assert site.keys.create_passphrase_file(tmp_path / "other") != passphrase
    with pytest.raises(InputError, match="exists already"):
        site.keys.create_passphrase_file(path)
    assert path.read_text() == passphrase + "\n"
    with pytest.raises(InputError, match="cannot create"):
        site.keys.create_passphrase_file(tmp_path / "missing" / "passphrase")


def test_make_default_records_keeps_and_replaces(new_site: NewSite) -> None:
    site = new_site("alpha")
    key_a = with_key(site, "alpha")
    change = site.keys.make_default(key_a.fingerprint, passphrase_file=None)
    assert change.changed and change.key == key_a
    assert site.config.identity.key == key_a.fingerprint  # the site reads the new file
    assert Site.open(site.home).config.identity.key == key_a.fingerprint
    assert not site.keys.make_default(key_a.key_id, passphrase_file=None).changed

    key_b = site.keys.generate("beta (TEST ONLY)", "beta@beta.test", algo="ed25519", passphrase=None)
    (site.home / "passphrase").write_text("unused: the key has none\n")
    kept = site.keys.make_default(key_b.fingerprint, passphrase_file=site.home / "passphrase")
    assert not kept.changed and site.config.identity.key == key_a.fingerprint
    assert f'key = "{key_b.fingerprint}"' in kept.message and 'passphrase_file = "passphrase"' in kept.message
    switched = site.keys.make_default(key_b.fingerprint, passphrase_file=None, replace=True)
    assert switched.changed and Site.open(site.home).keys.own() == site.keys.get(key_b.fingerprint)

    peer = new_site("gamma")
    befriend(site, with_key_site(peer, "gamma"))
    with pytest.raises(KeyNotFoundError):
        site.keys.make_default("gamma@gamma.test", passphrase_file=None)  # a peer's key has no secret here


def with_key_site(site: Site, name: str) -> Site:
    with_key(site, name)
    return site


def test_make_default_paths_mean_the_same(new_site: NewSite, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    site = new_site("alpha")
    key = with_key(site, "alpha")
    (site.home / "secrets").mkdir()
    (site.home / "secrets" / "pass").write_text("x\n")
    monkeypatch.chdir(site.home / "secrets")
    site.keys.make_default(key.fingerprint, passphrase_file=Path("pass"))
    assert site.config.identity.passphrase_file == "secrets/pass"
    assert site.config.resolve(site.config.identity.passphrase_file) == site.home / "secrets" / "pass"

    monkeypatch.chdir(tmp_path)
    Path("outside").write_text("x\n")
    Path("sub").mkdir()
    site.keys.make_default(key.fingerprint, passphrase_file=Path("sub/../outside"))
    assert site.config.identity.passphrase_file == str(tmp_path / "outside")

    before = site.config.config_file.read_bytes()
    with pytest.raises(InputError, match="cannot read the passphrase file"):
        site.keys.make_default(key.fingerprint, passphrase_file=Path("missing"))
    assert site.config.config_file.read_bytes() == before


def test_make_default_leaves_an_uneditable_config_alone(new_site: NewSite) -> None:
    site = new_site("alpha")
    key = with_key(site, "alpha")
    text = 'identity = { address = "alpha@alpha.test" }\n'
    site.config.config_file.write_text(text)
    site = Site.open(site.home)
    with pytest.raises(ConfigError) as refused:
        site.keys.make_default(key.fingerprint, passphrase_file=None)
    assert f'key = "{key.fingerprint}"' in refused.value.hint
    assert site.config.config_file.read_text() == text and site.config.identity.key == ""


def test_cli_extend_by_id_for_two_years(new_site: NewSite) -> None:
    site = new_site("alpha")
    key = with_key(site, "alpha", expires="1y")
    result = cli_keys(site, "extend", key.fingerprint, "--expires", "2y")
    assert result.exit_code == 0, result.output
    after = site.keys.get(key.fingerprint)
    assert after.expires is not None
    assert timedelta(days=725) <= after.expires - datetime.now(UTC) <= timedelta(days=732)
    # Set in a second gpg run: the same date, perhaps a second later.
    (subkey,) = subkey_expiries(site, key.fingerprint)
    assert abs(int(subkey) - after.expires.timestamp()) < 60
