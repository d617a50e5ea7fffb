"""Packing as a pipeline (issue 11): the inner MIME streams into gpg, gpg writes into the mail.

No plaintext reaches the disk, at most ``workers`` mails are written into
gpg at once (one more gpg may be starting or finishing), a failure or a
Ctrl-C stops every mail and leaves nothing behind, and what a killed
packing left is removed by the next one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from dicommail.crypto import keys as k
from dicommail.crypto.gpg import Keyring
from dicommail.dicom import scan
from dicommail.errors import CryptoError, InputError, PassphraseError, RecipientKeyError
from dicommail.wire import pack
from dicommail.wire.mime import wire_size
from dicommail.wire.unpack import unpack_files
from tests.wire.conftest import PRACTICE, Site

MAX = 1024**3
SMALL = 512 * 1024  # a mail per slice or two of the CT: many mails in flight


def _children() -> set[int]:
    """PIDs of this process's living child processes (gpg), from /proc."""
    found: set[int] = set()
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        try:
            with open(task / "children") as handle:
                found.update(int(pid) for pid in handle.read().split())
        except FileNotFoundError:
            pass  # a thread that ended meanwhile
    return found


class Spy:
    """Wraps ``Keyring.sign_encrypt_stream``: counts gpg runs at once, looks at the scratch dir.

    :meth:`watch` also counts the inner entities being written at once.
    """

    def __init__(self, keyring: Keyring, monkeypatch: pytest.MonkeyPatch) -> None:
        self.monkeypatch = monkeypatch
        self.real = keyring.sign_encrypt_stream
        self.lock = threading.Lock()
        self.running = self.feeding = self.most_running = self.most_feeding = 0
        self.scratch_seen: set[str] = set()
        self.on_feed: Callable[[], None] = lambda: None
        monkeypatch.setattr(keyring, "sign_encrypt_stream", self)

    def _count(self, name: str, step: int) -> None:
        with self.lock:
            value = getattr(self, name) + step
            setattr(self, name, value)
            most = "most_" + name
            setattr(self, most, max(getattr(self, most), value))

    def watch(self, packer: pack.Packer) -> pack.Packer:
        real = packer._write_inner

        def write_inner(*args: Any) -> None:
            self._count("feeding", 1)
            try:
                real(*args)
            finally:
                self._count("feeding", -1)

        self.monkeypatch.setattr(packer, "_write_inner", write_inner)
        return packer

    def __call__(self, write: Callable[[BinaryIO], None], out: BinaryIO, **kwargs: Any) -> None:
        def feed(stdin: BinaryIO) -> None:
            self.on_feed()
            scratch = Path(out.name).parent
            self.scratch_seen.update(p.name.rpartition(".")[2] for p in scratch.iterdir())
            write(stdin)

        self._count("running", 1)
        try:
            self.real(feed, out, **kwargs)
        finally:
            self._count("running", -1)


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir()) if out.exists() else []


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_many_mails_round_trip_with_bounded_gpg_processes(
    hospital_site: Site, practice_site: Site, ct_study: list[Path], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch, workers: int,
) -> None:
    spy = Spy(hospital_site.keyring, monkeypatch)
    packer = spy.watch(hospital_site.packer(PRACTICE, max_mail_size=SMALL, workers=workers))
    packed = packer.pack(scan(ct_study).files, tmp_path / "out")
    assert packed.set_total >= 8 and len(packed.mails) == packed.set_total
    assert [m.set_part for m in packed.mails] == list(range(1, packed.set_total + 1))
    assert all(m.size == wire_size(m.path) <= SMALL for m in packed.mails)
    # At most `workers` mails are written into gpg at once; one more gpg starts or finishes meanwhile.
    assert spy.most_feeding <= workers and 2 <= spy.most_running <= workers + 1
    # The scratch directory only ever holds mails (ciphertext): no inner MIME, no armor file.
    assert spy.scratch_seen <= {"eml"}
    assert _leftovers(tmp_path / "out") == sorted(m.path.name for m in packed.mails)

    report = unpack_files([m.path for m in packed.mails], practice_site.keyring, tmp_path / "in", max_output=MAX)
    assert report.ok, (report.rejected, report.sets)
    [outcome] = report.sets
    assert outcome.directory is not None and outcome.dicom_files == len(ct_study)
    for path in ct_study:
        assert (outcome.directory / path.name).read_bytes() == path.read_bytes()


def test_the_mail_frame_is_unchanged(hospital_site: Site, ct_study: list[Path], tmp_path: Path) -> None:
    packed = hospital_site.packer(PRACTICE).pack(scan(ct_study[:2]).files, tmp_path / "out")
    text = packed.mails[0].path.read_bytes()
    head, _, body = text.partition(b"\n\n")
    boundary = head.split(b'boundary="', 1)[1].split(b'"', 1)[0]
    assert body.startswith(b"This is an OpenPGP/MIME encrypted message (RFC 3156).\n--" + boundary + b"\n"
                           b"Content-Type: application/pgp-encrypted\n\nVersion: 1\n\n--" + boundary + b"\n"
                           b'Content-Type: application/octet-stream; name="encrypted.asc"\n'
                           b'Content-Disposition: inline; filename="encrypted.asc"\n\n'
                           b"-----BEGIN PGP MESSAGE-----\n")
    assert body.endswith(b"-----END PGP MESSAGE-----\n\n--" + boundary + b"--\n")
    assert b"\r" not in text


def test_a_failing_mail_stops_the_others_and_leaves_nothing(
    hospital_site: Site, ct_study: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = scan(ct_study).files
    spy = Spy(hospital_site.keyring, monkeypatch)
    started = threading.Event()
    grows = files[-1].path.with_name("grows.dcm")
    grows.write_bytes(files[-1].path.read_bytes())
    files[-1] = dataclasses.replace(files[-1], path=grows)

    def feed_started() -> None:
        started.set()
        with grows.open("ab") as handle:  # changes under the packer: that mail must fail
            handle.write(b"\0" * 16)

    spy.on_feed = feed_started
    before = _children()
    with pytest.raises(InputError, match="changed while it was being packed"):
        hospital_site.packer(PRACTICE, max_mail_size=SMALL, workers=2).pack(files, tmp_path / "out")
    assert started.is_set()
    assert _leftovers(tmp_path / "out") == []  # no mail, no scratch directory
    assert _children() <= before  # every gpg was waited for


def test_ctrl_c_stops_the_packing_and_leaves_nothing(
    hospital_site: Site, ct_study: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy(hospital_site.keyring, monkeypatch)
    interrupted = threading.Event()

    def interrupt_once() -> None:
        with spy.lock:
            if interrupted.is_set() or spy.most_running < 2:
                return
            interrupted.set()
        # Mails in flight: now Ctrl-C arrives, in the main thread as a real one does.
        signal.pthread_kill(threading.main_thread().ident or 0, signal.SIGINT)

    spy.on_feed = interrupt_once
    before = _children()
    with pytest.raises(KeyboardInterrupt):
        hospital_site.packer(PRACTICE, max_mail_size=SMALL, workers=2).pack(scan(ct_study).files, tmp_path / "out")
    assert _leftovers(tmp_path / "out") == []
    assert _children() <= before  # every gpg was waited for, also one started as Ctrl-C came


def test_stale_scratch_of_a_killed_packing_is_removed(
    hospital_site: Site, ct_study: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    old = pack.STALE_AFTER + 10

    def scratch(name: str, age: float) -> Path:
        path = out / f"{pack.SCRATCH_PREFIX}{name}"
        path.mkdir()
        (path / "x-0001.inner").write_bytes(b"plaintext a killed run of an older version left")
        stamp = os.stat(path).st_mtime - age
        os.utime(path, (stamp, stamp))
        return path

    killed, just_made, in_use = scratch("killed", old), scratch("new", 0), scratch("busy", old)
    (out / "other").mkdir()
    handle = os.open(in_use, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX)
        packed = hospital_site.packer(PRACTICE).pack(scan(ct_study[:1]).files, out)
        assert not killed.exists() and just_made.exists() and in_use.exists() and (out / "other").exists()
    finally:
        os.close(handle)
    assert pack.remove_stale_scratch(out) == [in_use]
    assert pack.remove_stale_scratch(out, now=lambda: os.stat(just_made).st_mtime + old) == [just_made]
    assert sorted(p.name for p in out.iterdir()) == sorted(["other", *(m.path.name for m in packed.mails)])


# -- gpg's failures come out as before ---------------------------------------------------


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[BinaryIO]:
    with (tmp_path / "sink").open("wb") as handle:
        yield handle


def _feed(data: bytes) -> Callable[[BinaryIO], None]:
    def write(stdin: BinaryIO) -> None:
        stdin.write(data)

    return write


def test_stream_errors_name_the_key(hospital: Keyring, practice: Keyring, sink: BinaryIO) -> None:
    fingerprint = k.own_key(hospital).fingerprint
    with pytest.raises(RecipientKeyError) as unknown:
        hospital.sign_encrypt_stream(_feed(b"x" * 100_000), sink, recipient="nobody@nowhere.test",
                                     signer=fingerprint, passphrase=None)
    assert "nobody@nowhere.test" in unknown.value.message and "import" in unknown.value.hint
    other = k.own_key(practice).fingerprint
    with pytest.raises(CryptoError) as signer:
        hospital.sign_encrypt_stream(_feed(b"x"), sink, recipient=PRACTICE, signer=other, passphrase=None)
    assert type(signer.value) is CryptoError and "identity.key" in signer.value.hint


def test_stream_passphrases(new_keyring: Callable[[], Keyring], tmp_path: Path) -> None:
    keyring = new_keyring()
    with (keyring.home / "gpg-agent.conf").open("a") as conf:
        conf.write("s2k-count 65536\n")  # fast key derivation: this is a test key
    key = k.generate(keyring, "Locked (TEST ONLY)", "locked@locked.test", algo="ed25519", passphrase="correct horse")
    out = tmp_path / "x.asc"

    def send(passphrase: str | None) -> None:
        with out.open("wb") as handle:
            handle.write(b"frame\n")
            keyring.sign_encrypt_stream(_feed(b"inner entity\n" * 1000), handle, recipient=key.fingerprint,
                                        signer=key.fingerprint, passphrase=passphrase)

    with pytest.raises(PassphraseError, match="none was given"):
        send(None)
    with pytest.raises(PassphraseError, match="wrong passphrase"):
        send("wrong")
    with pytest.raises(PassphraseError):
        send("line\nbreak")
    send("correct horse")
    text = out.read_bytes()
    assert text.startswith(b"frame\n-----BEGIN PGP MESSAGE-----\n")  # after what was there, not over it
    plain = tmp_path / "plain"
    armored = tmp_path / "only.asc"
    armored.write_bytes(text.removeprefix(b"frame\n"))
    keyring.decrypt_verify_file(armored, plain, max_output=MAX, passphrase="correct horse")
    assert plain.read_bytes() == b"inner entity\n" * 1000


# -- mails sized so that every worker has one to the end ----------------------------------


def _items(*sizes: int) -> list[pack._Item]:
    return [pack._Item(Path(f"/f{i}"), s, "dicom", f"f{i}", f"f{i}", "application/dicom") for i, s in enumerate(sizes)]


def test_parts_come_in_multiples_of_the_workers_evenly_sized() -> None:
    items = _items(*([500_000] * 41))
    limit = 5 * 1024**2
    alone = pack.plan_parts(items, limit)
    assert [len(p) for p in alone] == [5] * 8 + [1]  # the ninth mail would be encrypted alone
    two = pack.plan_parts(items, limit, workers=2)
    assert len(two) == 10 and {len(p) for p in two} == {4, 5}
    four = pack.plan_parts(items, limit, workers=4)
    assert len(four) <= 12 and max(map(len, four)) == 4  # as near as whole files allow
    assert pack.plan_parts(items, limit, workers=3) == alone  # 9 mails: 3 rounds of 3 already
    for parts in (two, four):
        assert [i for p in parts for i in p] == items
        assert all(pack.estimate_wire_size(p) <= limit for p in parts)
    # One mail stays one mail; files are never split to make up the count.
    assert len(pack.plan_parts(_items(1000, 2000), limit, workers=2)) == 1
    assert [len(p) for p in pack.plan_parts(_items(100, 50 * 1024**2, 100), 10 * 1024**2, workers=2)] == [1, 1, 1]
    assert pack.plan_parts([], limit, workers=2) == [[]]
