"""Exactly once through crashes: kill -9 the gateway or the receiver at a random moment, count what went wrong.

    python benchmarks/crash_trials.py [--trials 50] [--slices 6] [--max-delay 6] [--seed N]

Starts the throwaway mail system (Postfix, Dovecot) on loopback, a hospital
``dicommail gateway`` and a practice ``dicommail receive`` as child processes,
and as the practice's PACS a recording SCP (:mod:`testbed.recording_pacs`)
that writes every C-STORE it receives to a file of its own -- Orthanc would
keep one copy of an instance however often it came, so duplicates would go
unseen -- and answers the receiver's C-FIND in-flight check.

Each trial pushes a new small CT study with dcmtk ``storescu`` to the gateway,
one association per instance with ``--push-pause`` between them (the whole
study again, until every instance was accepted, as a PACS retries), kills the
gateway or the receiver (random choice) with SIGKILL after a random delay
within that one's busy time (measured by a first trial without a kill, or
``--gateway-window``, ``--receiver-window``), restarts it, and waits until
the PACS has every instance and both sides are done, or ``--trial-timeout``.
The recording PACS answers each C-STORE ``--pacs-delay`` seconds after
storing it, so that a kill of the receiver often lands between an instance
being stored and its answer.  Counted per trial:

* lost: instances the PACS never received;
* duplicated: receptions of an instance beyond its first;
* stuck: gateway studies not "sent" and receiver sets not "delivered" at the end.

Prints the totals and exits 1 if any is not zero.  Not part of the test suite.
``--in-flight-check none`` and ``--duplicate-window 0`` turn the two defences
off, to see what they prevent.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from dicommail.samples import write_ct_study  # noqa: E402
from testbed import MailServers, dcmtk_tool, ensure_installed  # noqa: E402
from testbed.ports import free_ports, port_listening  # noqa: E402
from testbed.recording_pacs import RecordingPacs  # noqa: E402
from testbed.sites import HOSPITAL, PRACTICE, Home, gateway_config, make_home, remove_home  # noqa: E402

ROUTE = "PRACTICE_DR"
STORESCU_ENV = {**os.environ, "TCP_NODELAY": "1"}


class Daemon:
    """``dicommail gateway`` or ``dicommail receive`` of one home, killed and restarted at will."""

    def __init__(self, name: str, home: Home, log: Path, port: int | None = None) -> None:
        self.name, self.home, self.log, self.port = name, home, log, port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = self.home.daemon("gateway" if self.name == "gateway" else "receive", log=self.log)
        deadline = time.monotonic() + 60
        while self.port is not None and not port_listening(self.port):
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the {self.name} did not start; see {self.log}")
            time.sleep(0.05)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
        self.process = None

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@dataclass
class Outcome:
    lost: int = 0
    duplicated: int = 0
    stuck: int = 0
    seconds: float = 0.0


def _rows(home: Home, sql: str, params: tuple[str, ...]) -> list[str]:
    try:
        with contextlib.closing(sqlite3.connect(f"file:{home.path / 'state.db'}?mode=ro", uri=True,
                                                timeout=10)) as db:
            return [str(status) for (status,) in db.execute(sql, params)]
    except sqlite3.OperationalError:  # not created yet, or its table not yet there
        return []


def unfinished(hospital: Home, practice: Home, study_uid: str) -> int:
    """Gateway studies not sent and receiver sets not delivered, for this study."""
    studies = _rows(hospital, "SELECT status FROM gateway_studies WHERE study_uid = ?", (study_uid,))
    sets = _rows(practice, "SELECT status FROM inbound_sets WHERE study_uid = ?", (study_uid,))
    if not studies:
        return 1  # not even received: stuck before the gateway
    return sum(s != "sent" for s in studies) + sum(s != "delivered" for s in sets)


class Pusher(threading.Thread):
    """The hospital PACS: storescu the study, instance by instance, until one round is accepted completely."""

    def __init__(self, port: int, files: list[Path], deadline: float, pause: float) -> None:
        super().__init__(daemon=True)
        self.port, self.files, self.deadline, self.pause = port, files, deadline, pause
        self.attempts = 0
        self.accepted = False

    def _store(self, path: Path) -> bool:
        try:
            result = subprocess.run(
                [dcmtk_tool("storescu"), "-aet", "HOSPPACS", "-aec", ROUTE, "127.0.0.1", str(self.port), str(path)],
                capture_output=True, timeout=60, env=STORESCU_ENV,
            )
        except subprocess.TimeoutExpired:
            return False
        return result.returncode == 0

    def run(self) -> None:
        while time.monotonic() < self.deadline:
            self.attempts += 1
            if port_listening(self.port):
                for number, path in enumerate(self.files):
                    if number:
                        time.sleep(self.pause)
                    if not self._store(path):
                        break
                else:
                    self.accepted = True
                    return
            time.sleep(1.0)  # a PACS retries after a while, not at once


def calibrate(args: argparse.Namespace, work: Path, pacs: RecordingPacs, hospital: Home, practice: Home,
              gateway_port: int) -> None:
    """A trial without a kill: when the gateway is busy with a study, and when the receiver forwards it."""
    files = write_ct_study(work / "study-000", args.slices, size=32)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    started = time.monotonic()
    pusher = Pusher(gateway_port, files, started + args.trial_timeout, args.push_pause)
    pusher.start()
    sent = first = last = None
    while time.monotonic() < started + args.trial_timeout:
        now = time.monotonic() - started
        if sent is None and _rows(hospital, "SELECT status FROM gateway_studies WHERE study_uid = ?",
                                  (study_uid,)) == ["sent"]:
            sent = now
        received = sum(1 for uid in uids if pacs.receptions().get(uid))
        if first is None and received:
            first = now
        if last is None and received == len(uids):
            last = now
        if last is not None and sent is not None and not unfinished(hospital, practice, study_uid):
            break
        time.sleep(0.05)
    pusher.join(timeout=10)
    if sent is None or first is None or last is None or unfinished(hospital, practice, study_uid):
        raise SystemExit(f"the trial without a kill did not finish in {args.trial_timeout:.0f} s; see {work}")
    if args.gateway_window is None:
        args.gateway_window = [0.0, sent]
    if args.receiver_window is None:
        # From a little before the first instance reaches the PACS (decryption) to the last.
        args.receiver_window = [max(0.0, first - 0.5), last]
    print(f"without a kill: gateway busy 0-{sent:.1f} s, the receiver forwarding {first:.1f}-{last:.1f} s; "
          f"killing the gateway within {args.gateway_window[0]:.1f}-{args.gateway_window[1]:.1f} s, "
          f"the receiver within {args.receiver_window[0]:.1f}-{args.receiver_window[1]:.1f} s", flush=True)


def trial(number: int, rng: random.Random, args: argparse.Namespace, work: Path, pacs: RecordingPacs,
          daemons: dict[str, Daemon], hospital: Home, practice: Home, gateway_port: int) -> Outcome:
    files = write_ct_study(work / f"study-{number:03d}", args.slices, size=32, seed=number)
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    victim = rng.choice(sorted(daemons))
    delay = rng.uniform(*(args.gateway_window if victim == "gateway" else args.receiver_window))
    started = time.monotonic()
    deadline = started + args.trial_timeout
    pusher = Pusher(gateway_port, files, deadline, args.push_pause)
    pusher.start()
    time.sleep(delay)
    # Where the study was when the kill came (as far as the databases tell).
    where = "/".join(_rows(hospital, "SELECT status FROM gateway_studies WHERE study_uid = ?", (study_uid,))
                     ) or "-"
    where += ", sets " + ("/".join(_rows(practice, "SELECT status FROM inbound_sets WHERE study_uid = ?",
                                         (study_uid,))) or "-")
    where += f", {sum(1 for uid in uids if pacs.receptions().get(uid))} in the PACS"
    daemons[victim].kill()
    time.sleep(rng.uniform(0, 1))
    daemons[victim].start()

    def counts() -> dict[str, int]:
        received = pacs.receptions()
        return {uid: received.get(uid, 0) for uid in uids}

    while time.monotonic() < deadline:
        if all(counts().values()) and unfinished(hospital, practice, study_uid) == 0:
            break
        time.sleep(0.5)
    pusher.join(timeout=max(0.0, deadline - time.monotonic()))
    time.sleep(args.settle)  # a late duplicate still counts
    received = counts()
    outcome = Outcome(
        lost=sum(1 for n in received.values() if n == 0),
        duplicated=sum(n - 1 for n in received.values() if n > 1),
        stuck=unfinished(hospital, practice, study_uid),
        seconds=time.monotonic() - started,
    )
    for name, daemon in daemons.items():
        if not daemon.alive():  # died on its own: worth knowing, and the next trial needs it
            print(f"  the {name} exited by itself (see {daemon.log}); restarting it")
            daemon.start()
    print(f"trial {number:3d}: killed the {victim:8s} after {delay:4.1f} s (study {where}), "
          f"{pusher.attempts} push(es): lost {outcome.lost}, duplicated {outcome.duplicated}, stuck {outcome.stuck}"
          f" ({outcome.seconds:.1f} s)", flush=True)
    return outcome


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--slices", type=int, default=6, help="instances per study")
    parser.add_argument("--gateway-window", type=float, nargs=2, metavar=("FROM", "TO"),
                        help="seconds after the push starts within which the gateway is killed (default: measured)")
    parser.add_argument("--receiver-window", type=float, nargs=2, metavar=("FROM", "TO"),
                        help="seconds after the push starts within which the receiver is killed (default: measured)")
    parser.add_argument("--push-pause", type=float, default=0.2, help="seconds between the pushed instances")
    parser.add_argument("--trial-timeout", type=float, default=120.0, help="seconds one trial may take")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds to wait for late duplicates")
    parser.add_argument("--pacs-delay", type=float, default=0.2,
                        help="seconds the PACS waits between storing and answering (widens the window)")
    parser.add_argument("--in-flight-check", choices=("c-find", "none"), default="c-find",
                        help="the receiver's pacs.in_flight_check")
    parser.add_argument("--duplicate-window", type=int, default=None, help="the gateway's gateway.duplicate_window")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="keep the homes, logs and received files")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    rng = random.Random(seed)
    print(f"{args.trials} trial(s), {args.slices} instances each, seed {seed}")
    ensure_installed()
    work = Path(tempfile.mkdtemp(prefix="dmcrash"))
    totals = Outcome()
    failures = 0
    with MailServers() as servers, RecordingPacs(work / "pacs", aet="TRIALPACS", delay=args.pacs_delay) as pacs:
        gateway_port = free_ports(1)[0]
        window = "" if args.duplicate_window is None else f"duplicate_window = {args.duplicate_window}"
        hospital = make_home("hospital", HOSPITAL, servers, pacs,
                             extra=gateway_config(gateway_port, {ROUTE: PRACTICE}, idle_seconds=1, send_interval=2,
                                                  extra=window))
        # (extra ends the [pacs] table)
        practice = make_home("practice", PRACTICE, servers, pacs, extra=f'in_flight_check = "{args.in_flight_check}"')
        daemons = {
            "gateway": Daemon("gateway", hospital, work / "gateway.log", gateway_port),
            "receiver": Daemon("receiver", practice, work / "receiver.log"),
        }
        try:
            for daemon in daemons.values():
                daemon.start()
            time.sleep(2)  # the receiver's first poll and IDLE
            calibrate(args, work, pacs, hospital, practice, gateway_port)
            for number in range(1, args.trials + 1):
                outcome = trial(number, rng, args, work, pacs, daemons, hospital, practice, gateway_port)
                totals.lost += outcome.lost
                totals.duplicated += outcome.duplicated
                totals.stuck += outcome.stuck
                totals.seconds += outcome.seconds
                failures += bool(outcome.lost or outcome.duplicated or outcome.stuck)
        finally:
            for daemon in daemons.values():
                daemon.stop()
            for home in (hospital, practice):
                if args.keep or failures:  # kept to be looked at; its gpg-agent need not run on
                    subprocess.run(["gpgconf", "--homedir", str(home.path / "gnupg"), "--kill", "all"], check=False)
                else:
                    remove_home(home)
    print(f"\n{args.trials} trial(s) in {totals.seconds:.0f} s, {failures} with a fault: lost {totals.lost}, "
          f"duplicated {totals.duplicated}, stuck {totals.stuck} (seed {seed})")
    if args.keep or failures:
        print(f"logs and received files: {work}; homes: {hospital.path}, {practice.path}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
