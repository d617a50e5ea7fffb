"""The crypto layer against real gpg: the trust rule, every error, key management."""

from __future__ import annotations

import base64
import os
import re
import stat
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from dicommail.crypto import keys as k
from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.errors import (
    AmbiguousKeyError,
    CryptoError,
    DecryptionError,
    InputError,
    KeyNotFoundError,
    PassphraseError,
    RecipientKeyError,
    SignatureError,
)
from tests.conftest import HOSPITAL, PRACTICE, STRANGER

MAX = 64 * 1024**2
PAST = datetime(2020, 1, 1, tzinfo=UTC)
NewKeyring = Callable[[], Keyring]


def gpg(keyring: Keyring, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """The plain gpg command line on a keyring (for what dicommail itself never does)."""
    return subprocess.run(
        ["gpg", "--homedir", str(keyring.home), "--batch", "--no-tty", "--status-fd", "2",
         "--pinentry-mode", "loopback", "--passphrase", "", "--trust-model", "pgp", *args],
        input=stdin,
        capture_output=True,
        check=False,
    )


def fpr(keyring: Keyring) -> str:
    return k.own_key(keyring).fingerprint


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "plain.bin"
    path.write_bytes(os.urandom(100_000) + b"\0" * 100_000)
    return path


def seal(sender: Keyring, recipient: str, plain: Path, name: str = "mail.asc") -> Path:
    out = plain.with_name(name)
    sender.sign_encrypt_file(plain, out, recipient=recipient, signer=fpr(sender), passphrase=None)
    return out


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".part"))


def fresh_site(new_keyring: NewKeyring, name: str, **kwargs: object) -> tuple[Keyring, k.KeyInfo]:
    keyring = new_keyring()
    key = k.generate(keyring, f"{name} (TEST ONLY)", f"{name}@{name}.test", algo="ed25519", **kwargs)  # type: ignore[arg-type]
    return keyring, key


def befriend(a: Keyring, b: Keyring) -> None:
    """Exchange public keys and certify each other (both ways)."""
    for x, y in ((a, b), (b, a)):
        (key,) = k.import_keys(x, k.export_key(y, fpr(y)).encode())
        k.certify(x, key.fingerprint)


# -- the good path -------------------------------------------------------------


def test_round_trip(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    before = datetime.now(UTC) - timedelta(seconds=5)
    sealed = seal(hospital, PRACTICE, plain)
    text = sealed.read_text()
    assert text.startswith("-----BEGIN PGP MESSAGE-----") and text.rstrip().endswith("-----END PGP MESSAGE-----")
    out = plain.with_name("out.bin")
    verification = practice.decrypt_verify_file(sealed, out, max_output=MAX)
    assert out.read_bytes() == plain.read_bytes()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600  # plaintext is private
    assert verification.fingerprint == fpr(hospital)
    assert verification.signing_key_fingerprint == fpr(hospital)
    assert verification.user_id == f"dicommail demo hospital (TEST ONLY) <{HOSPITAL}>"
    assert verification.trust == "full"
    assert before <= verification.signed_at <= datetime.now(UTC) + timedelta(seconds=5)
    assert leftovers(plain.parent) == []


def test_plain_gpg_reads_what_we_write(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    sealed = seal(hospital, PRACTICE, plain)
    result = gpg(practice, "--decrypt", str(sealed))
    status = result.stderr.decode()
    assert result.returncode == 0 and result.stdout == plain.read_bytes()
    assert f"[GNUPG:] VALIDSIG {fpr(hospital)} " in status
    assert re.search(r"^\[GNUPG:\] GOODSIG [0-9A-F]{16} ", status, re.M)
    assert "[GNUPG:] TRUST_FULLY" in status
    # No local file name travels inside the mail (it might name the patient).
    assert re.search(r"^\[GNUPG:\] PLAINTEXT 62 \d+ *$", status, re.M), status


def test_mail_to_ourselves_is_ultimately_trusted(hospital: Keyring, plain: Path) -> None:
    sealed = seal(hospital, HOSPITAL, plain)
    verification = hospital.decrypt_verify_file(sealed, plain.with_name("out"), max_output=MAX)
    assert verification.trust == "ultimate" and verification.fingerprint == fpr(hospital)


def test_compression_level_is_used(hospital: Keyring, tmp_path: Path) -> None:
    zeros = tmp_path / "zeros"
    zeros.write_bytes(b"\0" * 1_000_000)
    stored = tmp_path / "stored.asc"
    hospital.sign_encrypt_file(zeros, stored, recipient=PRACTICE, signer=fpr(hospital), passphrase=None,
                               compress_level=0)
    packed = seal(hospital, PRACTICE, zeros, "packed.asc")
    assert stored.stat().st_size > 1_000_000 > 100 * packed.stat().st_size


# -- decryption failures ---------------------------------------------------------


def test_mail_for_another_key(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    sealed = seal(hospital, PRACTICE, plain)
    out = plain.with_name("out")
    with pytest.raises(DecryptionError) as info:
        hospital.decrypt_verify_file(sealed, out, max_output=MAX)
    encryption_subkey = k.own_key(practice).subkey_fingerprints[0][-16:]
    assert encryption_subkey in info.value.message and "not to this site's key" in info.value.message
    assert not out.exists() and leftovers(plain.parent) == []


def test_tampered_armor(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    sealed = seal(hospital, PRACTICE, plain)
    lines = sealed.read_text().splitlines(keepends=True)
    middle = len(lines) // 2
    line = lines[middle]
    lines[middle] = line[:10] + ("A" if line[10] != "A" else "B") + line[11:]
    sealed.write_text("".join(lines))
    out = plain.with_name("out")
    with pytest.raises(DecryptionError):
        practice.decrypt_verify_file(sealed, out, max_output=MAX)
    assert not out.exists() and leftovers(plain.parent) == []


def _crc24(data: bytes) -> int:
    crc = 0xB704CE
    for byte in data:
        crc ^= byte << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
    return crc & 0xFFFFFF


def test_tampered_ciphertext_with_valid_armor(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    """A bit flipped inside the encrypted data, with a correct armor checksum:
    the MDC or the signature must catch it, and no plaintext may remain."""
    sealed = seal(hospital, PRACTICE, plain)
    body = "".join(
        line for line in sealed.read_text().splitlines()[1:-2] if line and ":" not in line
    )
    data = bytearray(base64.b64decode(body))
    data[len(data) // 2] ^= 0x01
    b64 = base64.b64encode(bytes(data)).decode()
    crc = base64.b64encode(_crc24(bytes(data)).to_bytes(3, "big")).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    sealed.write_text("-----BEGIN PGP MESSAGE-----\n\n" + "\n".join(lines) + f"\n={crc}\n-----END PGP MESSAGE-----\n")
    out = plain.with_name("out")
    out.write_bytes(b"an older file of the same name")
    with pytest.raises((DecryptionError, SignatureError)):
        practice.decrypt_verify_file(sealed, out, max_output=MAX)
    assert not out.exists() and leftovers(plain.parent) == []


def test_truncated_armor(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    sealed = seal(hospital, PRACTICE, plain)
    lines = sealed.read_text().splitlines(keepends=True)
    sealed.write_text("".join(lines[: len(lines) // 2]))
    out = plain.with_name("out")
    with pytest.raises(DecryptionError):
        practice.decrypt_verify_file(sealed, out, max_output=MAX)
    assert not out.exists() and leftovers(plain.parent) == []


def test_not_openpgp_at_all(practice: Keyring, tmp_path: Path) -> None:
    junk = tmp_path / "junk.asc"
    junk.write_text("Hello, this is not an OpenPGP message.\n")
    with pytest.raises(DecryptionError):
        practice.decrypt_verify_file(junk, tmp_path / "out", max_output=MAX)
    assert not (tmp_path / "out").exists()


def test_signed_but_not_encrypted(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    signed = plain.with_name("signed.asc")
    assert gpg(hospital, "--sign", "--armor", "-o", str(signed), str(plain)).returncode == 0
    out = plain.with_name("out")
    with pytest.raises(DecryptionError) as info:
        practice.decrypt_verify_file(signed, out, max_output=MAX)
    assert "not encrypted" in info.value.message
    assert not out.exists()


def test_parallel_use_of_one_keyring(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    """The packer signs several mails at once with one Keyring."""
    def one(number: int) -> str:
        sealed = seal(hospital, PRACTICE, plain, f"mail{number}.asc")
        return practice.decrypt_verify_file(sealed, plain.with_name(f"out{number}"), max_output=MAX).fingerprint

    with ThreadPoolExecutor(4) as pool:
        assert set(pool.map(one, range(8))) == {fpr(hospital)}
    assert all(plain.with_name(f"out{n}").read_bytes() == plain.read_bytes() for n in range(8))


def test_compression_bomb(hospital: Keyring, practice: Keyring, tmp_path: Path) -> None:
    zeros = tmp_path / "zeros"
    with zeros.open("wb") as handle:  # sparse: 200 MB that take no disk space
        handle.truncate(200 * 1024**2)
    bomb = tmp_path / "bomb.asc"
    hospital.sign_encrypt_file(zeros, bomb, recipient=PRACTICE, signer=fpr(hospital), passphrase=None,
                               compress_level=9)
    assert bomb.stat().st_size < 2 * 1024**2
    out = tmp_path / "out"
    with pytest.raises(DecryptionError) as info:
        practice.decrypt_verify_file(bomb, out, max_output=10 * 1024**2)
    assert "unpacking.max_decrypted_size" in info.value.message
    assert not out.exists() and leftovers(tmp_path) == []


# -- the trust rule ----------------------------------------------------------------


def test_unsigned_mail(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    sealed = plain.with_name("unsigned.asc")
    result = gpg(hospital, "--encrypt", "--armor", "-r", PRACTICE, "-o", str(sealed), str(plain))
    assert result.returncode == 0, result.stderr
    out = plain.with_name("out")
    with pytest.raises(SignatureError) as info:
        practice.decrypt_verify_file(sealed, out, max_output=MAX)
    assert "not signed" in info.value.message
    assert not out.exists() and leftovers(plain.parent) == []


def test_unknown_signer(new_keyring: NewKeyring, practice: Keyring, plain: Path) -> None:
    unknown, key = fresh_site(new_keyring, "unknown", expires="never")
    (peer,) = k.import_keys(unknown, k.export_key(practice, PRACTICE).encode())
    k.certify(unknown, peer.fingerprint)
    sealed = seal(unknown, PRACTICE, plain)
    out = plain.with_name("out")
    with pytest.raises(SignatureError) as info:
        practice.decrypt_verify_file(sealed, out, max_output=MAX)
    assert "unknown key" in info.value.message and key.fingerprint[-16:] in info.value.message
    assert "import" in info.value.hint and "certify" in info.value.hint
    assert not out.exists()


def test_uncertified_signer(stranger: Keyring, practice: Keyring, plain: Path) -> None:
    sealed = seal(stranger, PRACTICE, plain)
    out = plain.with_name("out")
    with pytest.raises(SignatureError) as info:
        practice.decrypt_verify_file(sealed, out, max_output=MAX)
    assert info.value.fingerprint == fpr(stranger)
    assert fpr(stranger) in info.value.message and "not certified" in info.value.message
    assert f"dicommail keys certify {fpr(stranger)}" in info.value.hint
    assert not out.exists() and leftovers(plain.parent) == []


def test_expired_signer_key(new_keyring: NewKeyring, plain: Path) -> None:
    """Signed in 2020 while the key was valid (gpg --faked-system-time), read now."""
    receiver, receiver_key = fresh_site(new_keyring, "receiver", expires="never", created=PAST)
    sender, sender_key = fresh_site(new_keyring, "oldsender", expires="30d", created=PAST)
    k.import_keys(sender, k.export_key(receiver, receiver_key.fingerprint).encode())
    k.import_keys(receiver, k.export_key(sender, sender_key.fingerprint).encode())
    # Both certified each other back then (an expired key can neither certify nor be certified now).
    for site, me, peer in ((receiver, receiver_key, sender_key), (sender, sender_key, receiver_key)):
        result = site.run(["--faked-system-time", "20200102T000000", "--local-user", me.fingerprint,
                           "--quick-lsign-key", peer.fingerprint])
        assert result.returncode == 0, result.log
    sealed = plain.with_name("old.asc")
    made = gpg(sender, "--faked-system-time", "20200103T000000", "--local-user", sender_key.fingerprint,
               "--sign", "--encrypt", "--armor", "-r", receiver_key.fingerprint, "-o", str(sealed), str(plain))
    assert made.returncode == 0, made.stderr
    assert k.find_key(receiver, sender_key.fingerprint).validity == "expired"
    out = plain.with_name("out")
    with pytest.raises(SignatureError) as info:
        receiver.decrypt_verify_file(sealed, out, max_output=MAX)
    assert "expired" in info.value.message and info.value.fingerprint == sender_key.fingerprint
    assert not out.exists() and leftovers(plain.parent) == []
    # ...and nobody can encrypt to an expired key.
    with pytest.raises(RecipientKeyError) as sent:
        seal(receiver, sender_key.fingerprint, plain, "to-expired.asc")
    assert "expired" in sent.value.message and sender_key.fingerprint in sent.value.message
    assert not plain.with_name("to-expired.asc").exists()


def test_revoked_signer_key(new_keyring: NewKeyring, plain: Path) -> None:
    receiver, _ = fresh_site(new_keyring, "receiver", expires="never")
    sender, sender_key = fresh_site(new_keyring, "sender", expires="never")
    befriend(receiver, sender)
    sealed = seal(sender, "receiver@receiver.test", plain)
    assert receiver.decrypt_verify_file(sealed, plain.with_name("ok"), max_output=MAX).trust == "full"
    change = k.revoke(sender, sender_key.fingerprint)
    assert change.changed and change.key.validity == "revoked"
    (updated,) = k.import_keys(receiver, k.export_key(sender, sender_key.fingerprint).encode())
    assert updated.validity == "revoked"
    out = plain.with_name("out")
    with pytest.raises(SignatureError) as info:
        receiver.decrypt_verify_file(sealed, out, max_output=MAX)
    assert "revoked" in info.value.message and info.value.fingerprint == sender_key.fingerprint
    assert not out.exists()
    with pytest.raises(RecipientKeyError) as sent:
        seal(receiver, "sender@sender.test", plain, "to-revoked.asc")
    assert "revoked" in sent.value.message
    assert not plain.with_name("to-revoked.asc").exists()


# -- encryption failures ----------------------------------------------------------


def test_recipient_not_certified(hospital: Keyring, stranger: Keyring, plain: Path) -> None:
    dst = plain.with_name("x.asc")
    dst.write_text("an older file of the same name")
    with pytest.raises(RecipientKeyError) as info:
        hospital.sign_encrypt_file(plain, dst, recipient=STRANGER, signer=fpr(hospital), passphrase=None)
    assert STRANGER in info.value.message and fpr(stranger) in info.value.message
    assert "not certified" in info.value.message
    assert f"dicommail keys certify {fpr(stranger)}" in info.value.hint
    assert not dst.exists() and leftovers(plain.parent) == []


def test_recipient_unknown(hospital: Keyring, plain: Path) -> None:
    dst = plain.with_name("x.asc")
    with pytest.raises(RecipientKeyError) as info:
        hospital.sign_encrypt_file(plain, dst, recipient="nobody@nowhere.test", signer=fpr(hospital),
                                   passphrase=None)
    assert "nobody@nowhere.test" in info.value.message and "import" in info.value.hint
    assert not dst.exists()


def test_signing_key_without_secret(hospital: Keyring, practice: Keyring, plain: Path) -> None:
    dst = plain.with_name("x.asc")
    with pytest.raises(CryptoError) as info:
        hospital.sign_encrypt_file(plain, dst, recipient=PRACTICE, signer=fpr(practice), passphrase=None)
    assert type(info.value) is CryptoError
    assert fpr(practice) in info.value.message and "identity.key" in info.value.hint
    assert not dst.exists()


def test_passphrases(new_keyring: NewKeyring, plain: Path) -> None:
    keyring = new_keyring()
    with (keyring.home / "gpg-agent.conf").open("a") as conf:
        conf.write("s2k-count 65536\n")  # fast key derivation: this is a test key
    key = k.generate(keyring, "Locked (TEST ONLY)", "locked@locked.test", algo="ed25519", passphrase="correct horse")
    dst = plain.with_name("x.asc")

    def send(passphrase: str | None) -> None:
        keyring.sign_encrypt_file(plain, dst, recipient=key.fingerprint, signer=key.fingerprint, passphrase=passphrase)

    # Everything wrong first: once unlocked, the agent briefly caches the key.
    unsigned = plain.with_name("unsigned.asc")
    assert gpg(keyring, "--encrypt", "--armor", "-r", key.fingerprint, "-o", str(unsigned), str(plain)).returncode == 0
    out = plain.with_name("out")
    with pytest.raises(PassphraseError) as missing:
        keyring.decrypt_verify_file(unsigned, out, max_output=MAX)
    assert "none was given" in missing.value.message and "passphrase_file" in missing.value.hint
    with pytest.raises(PassphraseError) as wrong:
        keyring.decrypt_verify_file(unsigned, out, max_output=MAX, passphrase="wrong")
    assert "wrong passphrase" in wrong.value.message
    assert not out.exists()
    with pytest.raises(PassphraseError) as missing:
        send(None)
    assert "none was given" in missing.value.message and key.fingerprint in missing.value.message
    with pytest.raises(PassphraseError) as wrong:
        send("wrong")
    assert "wrong passphrase" in wrong.value.message and key.fingerprint in wrong.value.message
    with pytest.raises(PassphraseError):
        send("line\nbreak")
    assert not dst.exists() and leftovers(plain.parent) == []
    send("correct horse")
    verification = keyring.decrypt_verify_file(dst, out, max_output=MAX, passphrase="correct horse")
    assert verification.trust == "ultimate" and out.read_bytes() == plain.read_bytes()


# -- key management ---------------------------------------------------------------


def test_keyring_home_is_private(new_keyring: NewKeyring) -> None:
    keyring = new_keyring()
    assert stat.S_IMODE(keyring.home.stat().st_mode) == 0o700
    assert "max-cache-ttl" in (keyring.home / "gpg-agent.conf").read_text()


def test_generate_ed25519(new_keyring: NewKeyring) -> None:
    keyring, key = fresh_site(new_keyring, "gen")
    assert key.algorithm == "ed25519" and key.has_secret and key.validity == "ultimate" and key.certified
    assert key.can_sign and key.can_encrypt and len(key.subkey_fingerprints) == 1
    assert key.email == "gen@gen.test" and key.user_ids == ("gen (TEST ONLY) <gen@gen.test>",)
    assert key.expires is not None and 700 < (key.expires - key.created).days < 740
    assert (keyring.home / "openpgp-revocs.d" / f"{key.fingerprint}.rev").exists()
    listing = gpg(keyring, "--with-colons", "--list-keys", key.fingerprint).stdout.decode()
    assert re.search(r"^sub:u:255:18:.*:e:", listing, re.M), listing  # a cv25519 encryption subkey


def test_generate_rsa3072(new_keyring: NewKeyring) -> None:
    keyring = new_keyring()
    key = k.generate(keyring, "RSA site (TEST ONLY)", "rsa@rsa.test", expires="never")
    assert key.algorithm == "rsa3072" and key.expires is None and key.can_encrypt and key.can_sign
    listing = gpg(keyring, "--with-colons", "--list-keys", key.fingerprint).stdout.decode()
    assert re.search(r"^pub:u:3072:1:.*:scES?C", listing, re.M) and re.search(r"^sub:u:3072:1:.*:e:", listing, re.M)


def test_generate_rejects_bad_input(new_keyring: NewKeyring) -> None:
    keyring = new_keyring()
    with pytest.raises(InputError):
        k.generate(keyring, "x", "not-an-address", algo="ed25519")
    with pytest.raises(InputError):
        k.generate(keyring, "Site", "a@b.test", algo="dsa1024")
    with pytest.raises(InputError):
        k.generate(keyring, "Site", "a@b.test", algo="ed25519", expires="soon")
    assert k.list_keys(keyring) == []


def test_demo_keys(hospital: Keyring, practice: Keyring) -> None:
    me, peer = k.own_key(hospital), k.find_key(hospital, PRACTICE)
    assert me.validity == "ultimate" and me.expires is None and me.algorithm == "rsa3072"
    assert peer.validity == "full" and not peer.has_secret and peer.certified
    assert k.find_key(practice, HOSPITAL).fingerprint == me.fingerprint
    readme = (Path(__file__).resolve().parents[2] / "keys" / "README.md").read_text()
    assert k.format_fingerprint(me.fingerprint) in readme and k.format_fingerprint(peer.fingerprint) in readme


def test_format_fingerprint() -> None:
    assert (
        k.format_fingerprint("d987f63be6eedada7c045b52b064be7de85bb33c")
        == "D987 F63B E6EE DADA 7C04  5B52 B064 BE7D E85B B33C"
    )


def test_find_key(hospital: Keyring, stranger: Keyring) -> None:
    key = k.find_key(hospital, PRACTICE)
    assert k.find_key(hospital, key.fingerprint) == key
    assert k.find_key(hospital, key.fingerprint.lower()) == key
    assert k.find_key(hospital, k.format_fingerprint(key.fingerprint)) == key
    assert k.find_key(hospital, "0x" + key.key_id) == key
    assert k.find_key(hospital, key.subkey_fingerprints[0]) == key
    assert k.find_key(hospital, PRACTICE.upper()) == key
    assert k.find_key(hospital, fpr(stranger)).validity not in ("full", "ultimate")
    with pytest.raises(KeyNotFoundError) as short:
        k.find_key(hospital, key.fingerprint[-8:])
    assert "short key id" in short.value.hint
    with pytest.raises(KeyNotFoundError):
        k.find_key(hospital, "nobody@nowhere.test")
    with pytest.raises(KeyNotFoundError):
        k.find_key(hospital, PRACTICE, secret=True)


def test_ambiguous_and_own_key(new_keyring: NewKeyring) -> None:
    keyring = new_keyring()
    with pytest.raises(KeyNotFoundError) as none:
        k.own_key(keyring)
    assert "dicommail keys generate" in none.value.hint
    first = k.generate(keyring, "Twin one", "twin@twin.test", algo="ed25519")
    assert k.own_key(keyring) == first
    second = k.generate(keyring, "Twin two", "twin@twin.test", algo="ed25519")
    with pytest.raises(AmbiguousKeyError) as ambiguous:
        k.find_key(keyring, "twin@twin.test")
    assert first.fingerprint in ambiguous.value.message and second.fingerprint in ambiguous.value.message
    with pytest.raises(AmbiguousKeyError) as several:
        k.own_key(keyring)
    assert "identity.key" in several.value.hint
    assert k.own_key(keyring, second.fingerprint) == second
    with pytest.raises(KeyNotFoundError) as configured:
        k.own_key(keyring, "0123456789ABCDEF0123456789ABCDEF01234567")
    assert "identity.key" in configured.value.hint
    # A revoked key of ours no longer counts as "the" key.
    k.revoke(keyring, first.fingerprint)
    assert k.own_key(keyring) == second


def test_certify_revoke_certify_again(new_keyring: NewKeyring, keys_dir: Path) -> None:
    keyring = new_keyring()
    me, peer = install_demo_site(keyring, "hospital", keys_dir)
    assert peer.certified
    assert not k.certify(keyring, peer.fingerprint).changed  # already certified
    assert not k.certify(keyring, me.fingerprint).changed  # our own key
    withdrawn = k.revoke(keyring, PRACTICE)
    assert withdrawn.changed and not withdrawn.key.certified and withdrawn.key.validity != "revoked"
    assert not k.revoke(keyring, PRACTICE).changed
    assert not k.find_key(keyring, PRACTICE).certified
    again = k.certify(keyring, PRACTICE)
    assert again.changed and again.key.certified
    # Local certifications are never exported.
    exported = k.export_key(keyring, PRACTICE)
    other = new_keyring()
    (imported,) = k.import_keys(other, exported.encode())
    sigs = gpg(other, "--with-colons", "--list-sigs", imported.fingerprint).stdout.decode()
    assert me.key_id not in sigs


def test_revoke_own_key_without_stored_certificate(new_keyring: NewKeyring) -> None:
    keyring, key = fresh_site(new_keyring, "norev")
    (keyring.home / "openpgp-revocs.d" / f"{key.fingerprint}.rev").unlink()
    change = k.revoke(keyring, key.fingerprint)
    assert change.changed and change.key.validity == "revoked"
    assert "REVOKED" in gpg(keyring, "--list-keys", key.fingerprint).stdout.decode().upper()


def test_import_export_delete(new_keyring: NewKeyring, hospital: Keyring) -> None:
    keyring = new_keyring()
    with pytest.raises(InputError):
        k.import_keys(keyring, b"")
    with pytest.raises(CryptoError):
        k.import_keys(
            keyring, b"-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nnonsense\n-----END PGP PUBLIC KEY BLOCK-----\n"
        )
    public = k.export_key(hospital, HOSPITAL)
    assert public.startswith("-----BEGIN PGP PUBLIC KEY BLOCK-----")
    (imported,) = k.import_keys(keyring, public.encode())
    assert imported.fingerprint == fpr(hospital) and not imported.has_secret and not imported.certified
    (again,) = k.import_keys(keyring, public.encode())  # unchanged: still reported
    assert again.fingerprint == imported.fingerprint
    secret = k.export_key(hospital, HOSPITAL, secret=True)
    assert secret.startswith("-----BEGIN PGP PRIVATE KEY BLOCK-----")
    with pytest.raises(InputError, match="SECRET") as refused_secret:
        k.import_keys(keyring, secret.encode())
    assert imported.fingerprint in refused_secret.value.message and "--secret" in refused_secret.value.hint
    assert k.list_keys(keyring, secret=True) == []  # nothing was imported
    (mine,) = k.import_keys(keyring, secret.encode(), allow_secret=True)
    assert mine.has_secret
    with pytest.raises(CryptoError) as refused:
        k.delete(keyring, mine.fingerprint)
    assert "--secret" in refused.value.hint
    k.delete(keyring, mine.fingerprint, secret=True)
    assert k.list_keys(keyring) == []
    with pytest.raises(KeyNotFoundError):
        k.delete(keyring, HOSPITAL)


def test_secret_key_file_is_refused_whole(new_keyring: NewKeyring) -> None:
    """A file with a public key and someone's secret key: nothing of it is imported without allow_secret."""
    theirs, their_key = fresh_site(new_keyring, "careless", expires="never")
    _other, other_key = fresh_site(new_keyring, "bystander", expires="never")
    bundle = k.export_key(_other, other_key.fingerprint) + k.export_key(theirs, their_key.fingerprint, secret=True)
    keyring = new_keyring()
    with pytest.raises(InputError) as refused:
        k.import_keys(keyring, bundle.encode())
    assert their_key.fingerprint in refused.value.message and other_key.fingerprint not in refused.value.message
    assert k.list_keys(keyring) == []
    # Secret subkeys alone are secret material too.
    subkeys = gpg(theirs, "--armor", "--export-secret-subkeys", their_key.fingerprint).stdout
    assert b"PRIVATE KEY" in subkeys
    with pytest.raises(InputError, match="SECRET"):
        k.import_keys(keyring, subkeys)
    assert k.list_keys(keyring) == []


def test_certify_never_makes_a_peers_secret_key_our_own(new_keyring: NewKeyring) -> None:
    """A peer's key file that holds its secret key: certified as a peer's key, with no ownertrust.

    With ultimate ownertrust every key the peer signed would be valid for us:
    a third key signed only by the peer must stay untrusted.
    """
    ours, me = fresh_site(new_keyring, "oursite", expires="never")
    peer, peer_key = fresh_site(new_keyring, "peersite", expires="never")
    third, third_key = fresh_site(new_keyring, "thirdsite", expires="never")
    # The peer certified the third key (exportable, so it travels with the key).
    k.import_keys(peer, k.export_key(third, third_key.fingerprint).encode())
    signed = gpg(peer, "--local-user", peer_key.fingerprint, "--quick-sign-key", third_key.fingerprint)
    assert signed.returncode == 0, signed.stderr
    third_signed = gpg(peer, "--armor", "--export", third_key.fingerprint).stdout

    k.import_keys(ours, k.export_key(peer, peer_key.fingerprint, secret=True).encode(), allow_secret=True)
    k.import_keys(ours, third_signed)
    # identity.key configured: the peer's key is certified with ours, as any peer's.
    change = k.certify(ours, peer_key.fingerprint, signer=me.fingerprint)
    assert change.changed and change.key.validity == "full" and "not this site's key" in change.message
    assert k.find_key(ours, third_key.fingerprint).validity not in ("full", "ultimate")
    assert k.find_key(ours, me.fingerprint).validity == "ultimate"
    # Without identity.key two secret keys are ambiguous: no guessing which is ours.
    with pytest.raises(AmbiguousKeyError):
        k.certify(ours, third_key.fingerprint)
    # Revoking the peer's key here would revoke it for good: refused.
    with pytest.raises(CryptoError, match="not this site's key"):
        k.revoke(ours, peer_key.fingerprint, own=me.fingerprint)
    assert k.find_key(ours, peer_key.fingerprint).validity == "full"


def test_certify_repairs_ultimate_trust_given_to_a_peer(new_keyring: NewKeyring) -> None:
    """An older dicommail made a peer's imported secret key ultimately trusted: certify undoes that."""
    ours, me = fresh_site(new_keyring, "oursite", expires="never")
    peer, peer_key = fresh_site(new_keyring, "peersite", expires="never")
    k.import_keys(ours, k.export_key(peer, peer_key.fingerprint, secret=True).encode(), allow_secret=True)
    gpg(ours, "--import-ownertrust", stdin=f"{peer_key.fingerprint}:6:\n".encode())
    assert k.find_key(ours, peer_key.fingerprint).validity == "ultimate"
    change = k.certify(ours, peer_key.fingerprint, signer=me.fingerprint)
    assert change.changed and change.key.validity == "full"
    ownertrust = gpg(ours, "--export-ownertrust").stdout.decode()
    assert f"{peer_key.fingerprint}:6:" not in ownertrust and f"{me.fingerprint}:6:" in ownertrust


def test_restored_own_key_is_trusted_as_our_own(new_keyring: NewKeyring) -> None:
    """A backup of this site's key: the only secret key, or the configured one, becomes ultimate."""
    original, me = fresh_site(new_keyring, "restored", expires="never")
    backup = k.export_key(original, me.fingerprint, secret=True).encode()
    for configured in ("", me.fingerprint):
        keyring = new_keyring()
        (key,) = k.import_keys(keyring, backup, allow_secret=True)
        assert key.validity != "ultimate"
        change = k.certify(keyring, key.fingerprint, signer=configured)
        assert change.changed and change.key.validity == "ultimate" and "own key" in change.message
