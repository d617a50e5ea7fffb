"""``Site.check`` and ``dicommail check``: every row always there, the mistakes an admin makes found before a study.

Real gpg and real sockets; no mail servers or PACS (their logins are tested
against the test bed in tests/integration/test_gateway.py).
"""

from __future__ import annotations

import json
import re
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

import dicommail
from dicommail import CheckResult, checks
from dicommail.cli import cli
from dicommail.config import parse_config
from dicommail.crypto.demo import install_demo_site
from dicommail.crypto.gpg import Keyring
from dicommail.crypto.keys import generate
from dicommail.errors import ConfigError, DicommailError
from dicommail.gateway.service import gateway_lock
from dicommail.store.db import Database
from testbed.ports import free_ports
from tests.conftest import HOSPITAL, PRACTICE, short_tempdir

HOSPITAL_FPR = "D987F63BE6EEDADA7C045B52B064BE7DE85BB33C"
PRACTICE_FPR = "CED3BF8052951E39C4F657EB8FEA58087B8988DF"
#: Every row, in order, of a home that names no peer.
ALL_IDS = ["config", "file-modes", "own-key", "signing", "peer-key", "smtp", "mailbox", "pacs", "spool-space",
           "gateway", "acknowledgements"]


@pytest.fixture
def hospital_home(short_tmp: Path) -> Path:
    """A home holding the demo hospital's key (no passphrase) and the practice's, certified."""
    keyring = Keyring(short_tmp / "gnupg")
    install_demo_site(keyring, "hospital")
    keyring.close()
    return short_tmp


def _write(home: Path, text: str) -> None:
    (home / "dicommail.toml").write_text(text, encoding="utf-8")


def _closed_smtp() -> str:
    return f'[smtp]\nhost = "127.0.0.1"\nport = {free_ports(1)[0]}\nsecurity = "none"\ntimeout = 5\n'


def _closed_mailbox() -> str:
    """A [mailbox] and [pacs] on closed ports: their checks fail at once."""
    mailbox, pacs = free_ports(2)
    return (f'[mailbox]\nhost = "127.0.0.1"\nport = {mailbox}\nsecurity = "none"\nusername = "{HOSPITAL}"\n'
            f'timeout = 5\n[pacs]\nhost = "127.0.0.1"\nport = {pacs}\n')


def _by_id(home: Path) -> dict[str, CheckResult]:
    return {r.id: r for r in dicommail.Site.open(home).check()}


def _run_cli(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(cli, ["--home", str(home), "check", *args])
    return result.exit_code, result.stdout


# -- the rows ------------------------------------------------------------------------------------------------


def test_every_check_has_a_row_even_when_nothing_is_configured(hospital_home: Path) -> None:
    (hospital_home / "dicommail.toml").touch()
    results = dicommail.Site.open(hospital_home).check()
    assert [r.id for r in results] == ALL_IDS
    status = {r.id: r.status for r in results}
    assert status == {"config": "ok", "file-modes": "skipped", "own-key": "ok", "signing": "ok", "peer-key": "skipped",
                      "smtp": "skipped", "mailbox": "skipped", "pacs": "skipped", "spool-space": "ok",
                      "gateway": "skipped",
                      "acknowledgements": "skipped"}
    assert all(r.ok for r in results)
    skipped = [r for r in results if r.status == "skipped"]
    # Each says what is missing and which setting would enable it.
    assert all(r.detail and r.hint for r in skipped)
    by_id = {r.id: r for r in results}
    assert by_id["smtp"].detail == "not configured" and "[smtp]" in by_id["smtp"].hint
    assert by_id["gateway"].detail == "not configured" and "[gateway]" in by_id["gateway"].hint
    assert "[mailbox]" in by_id["mailbox"].hint
    code, output = _run_cli(hospital_home)
    assert code == 0
    assert re.search(r"^gateway +skipped +not configured", output, re.MULTILINE)
    assert "all checks passed (7 skipped)" in output


def test_json_is_one_document_with_stable_ids_and_both_states(hospital_home: Path) -> None:
    _write(hospital_home, _closed_smtp() + f'[routes."CT"]\nrecipients = ["{PRACTICE}", "nobody@example.org"]\n')
    code, output = _run_cli(hospital_home, "--json")
    assert code == 1
    document = json.loads(output)  # exactly one document
    assert (document["ok"], document["status"]) == (False, "failed")
    entries = document["checks"]
    assert [e["id"] for e in entries] == [
        "config", "file-modes", "own-key", "signing", "peer-key:nobody@example.org", f"peer-key:{PRACTICE}",
        "smtp", "mailbox", "pacs", "spool-space", "gateway", "acknowledgements"]
    assert all(set(e) == {"id", "check", "status", "ok", "detail", "hint"} for e in entries)
    assert all(e["ok"] == (e["status"] != "failed") for e in entries)
    keys = {e["id"]: e for e in entries}
    assert keys[f"peer-key:{PRACTICE}"]["detail"].startswith(PRACTICE_FPR)
    assert keys["own-key"]["detail"].startswith(HOSPITAL_FPR)
    assert keys["mailbox"]["status"] == "skipped" and keys["mailbox"]["hint"]
    assert keys["config"]["hint"] is None


def test_check_reports_every_problem_without_raising(short_tmp: Path) -> None:
    _write(short_tmp, _closed_smtp() + '[routes."CT"]\nrecipients = ["nobody@example.org"]\n')
    results = dicommail.Site.open(short_tmp).check()
    assert [(r.id, r.name, r.status) for r in results] == [
        ("config", "config", "ok"),
        ("file-modes", "file modes", "skipped"),
        ("own-key", "own key", "failed"),
        ("signing", "test signature", "skipped"),  # no key to sign with: the own key's row says why
        ("peer-key:nobody@example.org", "key of nobody@example.org", "failed"),
        ("smtp", "SMTP login", "failed"),
        ("mailbox", "IMAP login", "skipped"),
        ("pacs", "PACS C-ECHO", "skipped"),
        ("spool-space", "spool free space", "ok"),
        ("gateway", "gateway", "failed"),
        ("acknowledgements", "acknowledgements", "failed"),
    ]
    assert all(r.detail for r in results) and all(r.hint for r in results if not r.ok)
    assert results[0].to_json() == {"id": "config", "check": "config", "status": "ok", "ok": True,
                                    "detail": results[0].detail, "hint": None}


def test_check_when_the_checks_cannot_start(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (short_tmp / "dicommail.toml").touch()
    site = dicommail.Site.open(short_tmp)
    monkeypatch.setenv("PATH", str(short_tmp / "no-gpg-here"))  # the keyring cannot run gpg
    [result] = site.check()
    assert (result.name, result.ok, result.status) == ("config", False, "failed")
    assert "cannot run gpg" in result.detail and "GnuPG" in result.hint


def test_a_broken_config(short_tmp: Path) -> None:
    (short_tmp / "dicommail.toml").write_text("[smtp\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid TOML"):
        dicommail.Site.open(short_tmp)
    # The CLI turns it into a failed "config" check, as before.
    code, output = _run_cli(short_tmp, "--json")
    assert code == 1
    [config] = json.loads(output)["checks"]
    assert config["check"] == config["id"] == "config" and not config["ok"] and "not valid TOML" in config["detail"]
    assert config["status"] == "failed"


class _NoKeyring:
    def __init__(self, home: Path) -> None:
        self.home = home

    def close(self) -> None:
        pass


def test_a_failed_login_among_passing_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config({
        "routes": {"CT": {"recipients": ["b@peer.example", "a@peer.example"]}},
        "mailbox": {"username": "hospital", "host": "imap.example", "protocol": "imap"},
        "smtp": {"host": "smtp.example"},
        "gateway": {"port": free_ports(1)[0]},
        "receiver": {"destination": "pacs"},
    }, tmp_path)
    monkeypatch.setattr(checks, "Keyring", _NoKeyring)
    monkeypatch.setattr(checks, "_check_own_key", lambda *_: "fine")
    monkeypatch.setattr(checks, "_check_signing", lambda *_: "fine")
    monkeypatch.setattr(checks, "_check_recipient", lambda _k, address, _n: f"key of {address} fine")
    monkeypatch.setattr(checks, "_check_smtp", lambda _c: "fine")

    def no_imap(_config: object) -> str:
        raise DicommailError("login refused", "check the password")

    monkeypatch.setattr(checks, "_check_mailbox", no_imap)
    monkeypatch.setattr(checks, "_check_pacs", lambda _c: "fine")
    results = [r.to_json() for r in checks.run_checks(config)]
    assert [(r["id"], r["check"], r["status"]) for r in results] == [
        ("config", "config", "ok"),
        ("file-modes", "file modes", "skipped"),  # no secret files named
        ("own-key", "own key", "ok"),
        ("signing", "test signature", "ok"),
        ("peer-key:a@peer.example", "key of a@peer.example", "ok"),
        ("peer-key:b@peer.example", "key of b@peer.example", "ok"),
        ("smtp", "SMTP login", "ok"),
        ("mailbox", "IMAP login", "failed"),
        ("pacs", "PACS C-ECHO", "ok"),
        ("spool-space", "spool free space", "ok"),
        ("gateway", "gateway", "ok"),
        ("acknowledgements", "acknowledgements", "ok"),
    ]
    failed = results[7]
    assert (failed["ok"], failed["detail"], failed["hint"]) == (False, "login refused", "check the password")
    # A result made without an id (the CLI's "config cannot be read") is named by its name, and failed.
    made = checks.CheckResult("config", False, "bad")
    assert (made.id, made.status) == ("config", "failed")
    with pytest.raises(ValueError, match="cannot have the status"):
        checks.CheckResult("x", False, "bad", status="warning")


# -- the test signature --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protected_keyring() -> Iterator[Path]:
    """A keyring whose only key has the passphrase "right" (made once: a protected key takes seconds)."""
    base = short_tempdir()
    keyring = Keyring(base / "gnupg")
    generate(keyring, "Check Site", "site@check.test", algo="ed25519", expires="never", passphrase="right")
    keyring.close()
    yield base / "gnupg"
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def protected_home(short_tmp: Path, protected_keyring: Path) -> Path:
    """A home with a copy of that keyring, and its gpg-agent holding the passphrase, as after a day's work."""
    shutil.copytree(protected_keyring, short_tmp / "gnupg", ignore=shutil.ignore_patterns("S.*"))
    keyring = Keyring(short_tmp / "gnupg")
    # A signature with the right passphrase leaves it in the agent's cache: the check must not be fooled by it.
    (short_tmp / "any").write_bytes(b"x")
    keyring.detach_sign_file(short_tmp / "any", short_tmp / "any.asc", signer="site@check.test", passphrase="right")
    return short_tmp


def test_a_wrong_passphrase_is_found_now(protected_home: Path) -> None:
    passphrase = protected_home / "passphrase"
    passphrase.write_text("wrong\n", encoding="utf-8")
    passphrase.chmod(0o600)
    _write(protected_home, '[identity]\npassphrase_file = "passphrase"\n')
    signing = _by_id(protected_home)["signing"]
    assert signing.status == "failed"
    assert "wrong passphrase" in signing.detail
    assert "identity.passphrase_file" in signing.hint and str(passphrase) in signing.hint
    passphrase.write_text("right\n", encoding="utf-8")
    signing = _by_id(protected_home)["signing"]
    assert signing.status == "ok" and str(passphrase) in signing.detail


def test_a_missing_passphrase_is_found_now(protected_home: Path) -> None:
    (protected_home / "dicommail.toml").touch()
    signing = _by_id(protected_home)["signing"]
    assert signing.status == "failed" and "none was given" in signing.detail
    assert "set identity.passphrase_file" in signing.hint
    # An empty passphrase file is no passphrase either.
    (protected_home / "passphrase").touch(mode=0o600)
    _write(protected_home, '[identity]\npassphrase_file = "passphrase"\n')
    signing = _by_id(protected_home)["signing"]
    assert signing.status == "failed" and "identity.passphrase_file names" in signing.hint


# -- file modes ----------------------------------------------------------------------------------------------


def test_secret_files_open_to_others_are_a_warning(hospital_home: Path) -> None:
    passphrase = hospital_home / "pass"
    passphrase.write_text("unused by an unprotected key\n", encoding="utf-8")
    passphrase.chmod(0o644)
    _write(hospital_home, '[identity]\npassphrase_file = "pass"\n')
    rows = _by_id(hospital_home)
    modes = rows["file-modes"]
    assert (modes.status, modes.ok) == ("warning", True)
    assert modes.detail == f"{passphrase} is open to its group and others (mode 0644)"
    assert modes.hint == f"chmod 600 {passphrase}"
    assert rows["signing"].status == "ok"
    code, output = _run_cli(hospital_home)
    assert code == 0  # a warning is no failure
    assert re.search(r"^file modes +warning ", output, re.MULTILINE) and "1 warning" in output
    code, output = _run_cli(hospital_home, "--json")
    assert code == 0 and json.loads(output)["status"] == "warning"
    # One password file for SMTP and mailbox, open to its group: both files in one chmod.
    password = hospital_home / "mail pass"
    password.write_text("secret\n", encoding="utf-8")
    password.chmod(0o640)
    _write(hospital_home, '[identity]\npassphrase_file = "pass"\n[smtp]\npassword_file = "mail pass"\n'
                          '[mailbox]\npassword_file = "mail pass"\n')
    modes = _by_id(hospital_home)["file-modes"]
    assert modes.status == "warning" and f"{password} is open to its group (mode 0640)" in modes.detail
    assert modes.hint == f"chmod 600 {passphrase} '{password}'"
    passphrase.chmod(0o600)
    password.chmod(0o600)
    modes = _by_id(hospital_home)["file-modes"]
    assert (modes.status, modes.hint) == ("ok", "")
    assert modes.detail == ("only the owner can read the files of identity.passphrase_file, smtp.password_file, "
                            "mailbox.password_file")


# -- the gateway ---------------------------------------------------------------------------------------------


def _gateway_home(home: Path, port: int, host: str = "127.0.0.1") -> None:
    _write(home, _closed_smtp() + _closed_mailbox() + f'[gateway]\nhost = "{host}"\nport = {port}\n'
           f'[routes."CT"]\nrecipients = ["{PRACTICE}"]\n')


def test_gateway_port_taken_by_another_program_or_by_this_homes_gateway(hospital_home: Path) -> None:
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        _gateway_home(hospital_home, port)
        gateway = _by_id(hospital_home)["gateway"]
        assert gateway.status == "failed"
        assert f"127.0.0.1:{port} is in use by another program" in gateway.detail
        assert "gateway.port" in gateway.hint and f"sport = :{port}" in gateway.hint
        with gateway_lock(hospital_home):  # as a running `dicommail gateway` holds it
            gateway = _by_id(hospital_home)["gateway"]
            assert gateway.status == "ok"
            assert re.search(rf"127\.0\.0\.1:{port} in use by this home's gateway \(PID \d+\)", gateway.detail)
            assert "routes CT" in gateway.detail
    # The port is free again, but this home's gateway runs: on some other port, from an older config.
    with gateway_lock(hospital_home):
        gateway = _by_id(hospital_home)["gateway"]
        assert gateway.status == "warning" and "restart" in gateway.hint
    gateway = _by_id(hospital_home)["gateway"]
    assert (gateway.status, gateway.detail) == ("ok", f"127.0.0.1:{port} is free; AE DICOMMAIL, routes CT")


def test_gateway_host_that_is_not_this_machine(hospital_home: Path) -> None:
    _gateway_home(hospital_home, free_ports(1)[0], host="192.0.2.1")  # TEST-NET-1: nobody's address
    gateway = _by_id(hospital_home)["gateway"]
    assert gateway.status == "failed" and "gateway.host 192.0.2.1 is no address of this machine" in gateway.detail


def test_gateway_route_to_a_peer_without_a_usable_key(hospital_home: Path) -> None:
    _write(hospital_home, _closed_smtp() + _closed_mailbox() + f"[gateway]\nport = {free_ports(1)[0]}\n"
           f'[routes."CT"]\nrecipients = ["{PRACTICE}"]\n[routes."MR"]\nrecipients = ["nobody@example.org"]\n')
    rows = _by_id(hospital_home)
    assert rows["peer-key:nobody@example.org"].status == "failed"
    gateway = rows["gateway"]
    assert gateway.status == "failed"
    assert gateway.detail == "route MR: no usable key for nobody@example.org"


# -- acknowledgements ----------------------------------------------------------------------------------------


def test_a_sending_site_needs_a_mailbox_for_the_acknowledgements(hospital_home: Path) -> None:
    _write(hospital_home, _closed_smtp() + f'[routes."CT"]\nrecipients = ["{PRACTICE}"]\n')
    acks = _by_id(hospital_home)["acknowledgements"]
    assert acks.status == "failed" and "routes CT" in acks.detail and "no [mailbox]" in acks.detail
    assert "[mailbox]" in acks.hint
    # Past transfers in the outbox make a site a sending one too.
    _write(hospital_home, _closed_smtp())
    assert _by_id(hospital_home)["acknowledgements"].status == "skipped"
    db = Database(hospital_home / "state.db")
    try:
        with db.transaction() as conn:
            conn.execute("INSERT INTO transfers (id, set_id, recipient, study_uid, files, bytes, set_total, status, "
                         "created_at, updated_at) VALUES (1, '2.25.1', ?, '1.2.3', 1, 100, 1, 'sent', 0, 0)",
                         (PRACTICE,))
    finally:
        db.close()
    acks = _by_id(hospital_home)["acknowledgements"]
    assert acks.status == "failed" and "transfers in its outbox" in acks.detail


def test_a_receiving_site_needs_smtp_to_send_acknowledgements(hospital_home: Path) -> None:
    _write(hospital_home, _closed_mailbox())
    rows = _by_id(hospital_home)
    acks = rows["acknowledgements"]
    assert acks.status == "failed" and "no [smtp]" in acks.detail and "[smtp]" in acks.hint
    assert rows["smtp"].status == "skipped" and rows["mailbox"].status == "failed"
    _write(hospital_home, _closed_mailbox() + _closed_smtp())
    acks = _by_id(hospital_home)["acknowledgements"]
    assert (acks.status, acks.detail) == ("ok", "acknowledgements sent through [smtp]")
    _write(hospital_home, _closed_mailbox() + _closed_smtp() + "[tracking]\nnotifications = false\n")
    acks = _by_id(hospital_home)["acknowledgements"]
    assert acks.status == "warning" and "tracking.notifications" in acks.detail


def test_both_ways_open(hospital_home: Path) -> None:
    _write(hospital_home, f'[identity]\naddress = "{HOSPITAL}"\n' + _closed_smtp() + _closed_mailbox()
           + f'[routes."CT"]\nrecipients = ["{PRACTICE}"]\n')
    acks = _by_id(hospital_home)["acknowledgements"]
    assert (acks.status, acks.detail) == (
        "ok", "acknowledgements received through [mailbox] and sent through [smtp]")


# -- the table -----------------------------------------------------------------------------------------------


def test_fingerprints_are_whole_in_80_columns(hospital_home: Path) -> None:
    long_address = "reading-room-night-shift@radiologie-example-town.de"
    _write(hospital_home, _closed_smtp() + _closed_mailbox()
           + f'[routes."CT_READING_ROOM1"]\nrecipients = ["{PRACTICE}", "{long_address}"]\n')
    code, output = _run_cli(hospital_home)
    assert code == 1
    lines = output.splitlines()
    assert max(len(line) for line in lines) <= 80, output
    # Both fingerprints on one line each, never cut or broken.
    assert any(HOSPITAL_FPR in line for line in lines) and any(PRACTICE_FPR in line for line in lines)
    assert re.search(r"^key of +ok +" + PRACTICE_FPR, output, re.MULTILINE), output
    # The long address is folded within its column, not cut off.
    header = lines[0]
    check_column = [line[:header.index("status")].strip() for line in lines]
    row = next(i for i, line in enumerate(lines) if check_column[i] == "key of" and "FAILED" in line)
    assert "".join(check_column[row + 1:row + 3]) == long_address, output


def test_the_gateway_defaults_that_init_writes_do_not_fail_a_receiving_site(tmp_path: Path) -> None:
    home = tmp_path / "practice"
    dicommail.Site.init(home, PRACTICE)
    by_id = {r.id: r for r in dicommail.Site.open(home).check()}
    assert by_id["gateway"].status == "skipped" and "[routes" in by_id["gateway"].hint
    # A gateway setting of its own says the site means to run one: then missing routes fail.
    text = (home / "dicommail.toml").read_text().replace("port = 11112", "port = 11113")
    (home / "dicommail.toml").write_text(text)
    by_id = {r.id: r for r in dicommail.Site.open(home).check()}
    assert by_id["gateway"].status == "failed" and "no routes are configured" in by_id["gateway"].detail
