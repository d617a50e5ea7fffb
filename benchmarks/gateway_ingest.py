"""Ingest speed of ``dicommail gateway`` against dcmtk's own storescp, with the same files and sender.

    python benchmarks/gateway_ingest.py [--case large|small|both|none] [--repeat 3] [--floor] [--idle 5]

Two cases, each sent with dcmtk ``storescu`` (``TCP_NODELAY=1``, as PACSs
send: without it every C-STORE of a small object waits for a delayed ACK):

``large``
    100 MiB of 513 KiB CT images (200 of 512² 16-bit pixels) over one
    association; baseline ``storescp -pdu 131072``.
``small``
    1000 images of 9 KiB (64² pixels) over 4 concurrent associations (250
    each); baseline ``storescp -pdu 131072 --fork``.

The receivers:

1. a ``dicommail gateway`` (a child process, as in production: every
   instance fsynced in the spool and its row committed to SQLite before
   the success status);
2. dcmtk ``storescp -od DIR`` (writes each file, no fsync) announcing a
   maximum PDU of 128 KiB, so that storescu sends it PDUs as large as it
   sends the gateway (which accepts any size); with dcmtk's default of
   16 KiB the baseline would be handicapped.

Each receiver runs ``--repeat`` times, alternating, in the same run; the
report gives the median and the range (min-max) of the wall time from
starting the sender(s) to their exit, the ratio of the medians, the
gateway's CPU time per instance and its peak RSS.  The gateway's study
idle time is a day, so packing and sending do not run during the
measurement.

``--floor`` adds a third receiver: pynetdicom with the gateway's settings
(:func:`dicommail.gateway.scp.storage_server`) and a C-STORE handler that
stores nothing -- what pynetdicom alone costs, the bound for the gateway.

``--idle SECONDS`` also measures the gateway's CPU use while one
association is open and nothing is sent (pynetdicom polls its sockets and
queues while an association is open; with none open it uses no CPU).
``--case none --idle 5`` measures only that.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicommail.crypto.demo import install_demo_site  # noqa: E402
from dicommail.crypto.gpg import Keyring  # noqa: E402
from dicommail.samples import write_ct_study  # noqa: E402
from testbed import dcmtk_tool  # noqa: E402
from testbed.ports import free_ports, port_listening  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}
#: The baseline's maximum PDU size: what PACSs commonly negotiate.
BASELINE_PDU = 131072
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Case:
    name: str
    instances: int
    size: int  # pixels per side
    associations: int


CASES = {
    "large": Case("large", 200, 512, 1),
    "small": Case("small", 1000, 64, 4),
}


@dataclass(frozen=True)
class Cpu:
    user: float
    system: float

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(self.user - other.user, self.system - other.system)


@dataclass(frozen=True)
class Run:
    seconds: float
    cpu: Cpu | None  # the receiver's CPU time during the run
    peak_rss: int | None  # bytes


def send(port: int, called: str, batches: list[list[Path]]) -> float:
    """Wall time of sending every batch over its own association, all at once."""
    started = time.perf_counter()
    senders = [
        subprocess.Popen([dcmtk_tool("storescu"), "-aet", "BENCHPACS", "-aec", called, "127.0.0.1", str(port),
                          *map(str, files)], env=ENV, stdout=subprocess.DEVNULL)
        for files in batches
    ]
    codes = [sender.wait() for sender in senders]
    seconds = time.perf_counter() - started
    if any(codes):
        raise SystemExit(f"storescu failed (exit codes {codes})")
    return seconds


def cpu_seconds(pid: int) -> Cpu:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return Cpu(int(fields[11]) / TICKS, int(fields[12]) / TICKS)  # utime, stime


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_listening(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while not port_listening(port):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the receiver did not start:\n{log.read_text()}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def gateway_home(work: Path, port: int) -> Path:
    home = work / "gw"
    home.mkdir()
    (home / "dicommail.toml").write_text(f"""
[identity]
address = "hospital@hospital.test"

[smtp]
host = "localhost"

[gateway]
host = "127.0.0.1"
port = {port}
study_idle_seconds = 86400

[routes."BENCH"]
recipients = ["practice@practice.test"]
""")
    keyring = Keyring(home / "gnupg")
    install_demo_site(keyring, "hospital")
    keyring.close()
    return home


def start_gateway(work: Path) -> tuple[subprocess.Popen[bytes], Path, int]:
    port = free_ports(1)[0]
    home = gateway_home(work, port)
    log = work / "gateway.log"
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "dicommail", "--home", str(home), "gateway"],
                                   stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    wait_listening(port, process, log)
    return process, home, port


def stop_gateway(process: subprocess.Popen[bytes], home: Path) -> None:
    stop(process)
    subprocess.run(["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "all"], check=False)
    shutil.rmtree(home, ignore_errors=True)


def run_gateway(work: Path, batches: list[list[Path]]) -> Run:
    process, home, port = start_gateway(work)
    try:
        cpu_before = cpu_seconds(process.pid)
        seconds = send(port, "BENCH", batches)
        return Run(seconds, cpu_seconds(process.pid) - cpu_before, peak_rss(process.pid))
    finally:
        stop_gateway(process, home)


def run_storescp(work: Path, batches: list[list[Path]], fork: bool) -> Run:
    port = free_ports(1)[0]
    out = work / "storescp"
    out.mkdir()
    log = work / "storescp.log"
    command = [dcmtk_tool("storescp"), "-pdu", str(BASELINE_PDU), *(["--fork"] if fork else []), "-od", str(out),
               str(port)]
    with log.open("wb") as handle:
        process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_listening(port, process, log)
        cpu_before = cpu_seconds(process.pid)
        seconds = send(port, "STORESCP", batches)
        # With --fork the work is done by children this does not see: no CPU figure then.
        return Run(seconds, None if fork else cpu_seconds(process.pid) - cpu_before, peak_rss(process.pid))
    finally:
        stop(process)
        shutil.rmtree(out, ignore_errors=True)


def serve_noop(port: int) -> None:
    """The floor: pynetdicom as the gateway sets it up, answering every C-STORE "success" at once."""
    import threading

    from pynetdicom import evt

    from dicommail.gateway.scp import storage_server

    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    _ae, server = storage_server("NOOP", ("127.0.0.1", port), [(evt.EVT_C_STORE, lambda _event: 0x0000)])
    stopped.wait()
    server.shutdown()


def run_floor(work: Path, batches: list[list[Path]]) -> Run:
    port = free_ports(1)[0]
    log = work / "floor.log"
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, __file__, "--serve-noop", str(port)], stdout=handle,
                                   stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_listening(port, process, log)
        cpu_before = cpu_seconds(process.pid)
        seconds = send(port, "NOOP", batches)
        return Run(seconds, cpu_seconds(process.pid) - cpu_before, peak_rss(process.pid))
    finally:
        stop(process)


def idle_cpu(work: Path, seconds: float) -> float:
    """The gateway's CPU use (share of one core) while one association is open and idle."""
    from pynetdicom import AE

    process, home, port = start_gateway(work)
    try:
        ae = AE(ae_title="BENCHPACS")
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="BENCH")
        if not assoc.is_established:
            raise SystemExit("the gateway did not accept the association")
        try:
            time.sleep(0.5)  # negotiation settled
            before = cpu_seconds(process.pid)
            time.sleep(seconds)
            used = cpu_seconds(process.pid) - before
            return (used.user + used.system) / seconds
        finally:
            assoc.release()
    finally:
        stop_gateway(process, home)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):6.2f} s ({min(values):.2f}-{max(values):.2f})"


def run_case(work: Path, case: Case, repeat: int, floor: bool) -> None:
    files = write_ct_study(work / f"study-{case.name}", case.instances, case.size)
    mib = sum(p.stat().st_size for p in files) / 2**20
    batches = [files[i::case.associations] for i in range(case.associations)]
    print(f"{case.name}: {len(files)} CT images, {mib:.1f} MiB ({mib * 1024 / len(files):.0f} KiB each), "
          f"{case.associations} association(s)")
    fork = " --fork" if case.associations > 1 else ""
    receivers: dict[str, list[Run]] = {"dicommail gateway (fsync)": [], f"storescp -pdu {BASELINE_PDU}{fork}": []}
    if floor:
        receivers["pynetdicom, no-op handler"] = []
    gateway, baseline, *rest = receivers.values()
    for _ in range(repeat):  # alternating, so that a busy moment of the machine hits all alike
        gateway.append(run_gateway(work, batches))
        baseline.append(run_storescp(work, batches, fork=case.associations > 1))
        if floor:
            rest[0].append(run_floor(work, batches))
    for name, runs in receivers.items():
        median = statistics.median(r.seconds for r in runs)
        cpu = [r.cpu for r in runs if r.cpu is not None]
        cpu_text = ""
        if cpu:
            user, system = (statistics.median(getattr(c, kind) for c in cpu) * 1000 / len(files)
                            for kind in ("user", "system"))
            cpu_text = f"  CPU/instance {user + system:.2f} ms (user {user:.2f}, system {system:.2f})"
        rss = max(r.peak_rss or 0 for r in runs) / 2**20
        print(f"  {name:34s} {spread([r.seconds for r in runs])}  {len(files) / median:7.1f} inst/s  "
              f"{mib / median:6.1f} MiB/s")
        print(f"  {'':34s} peak RSS {rss:.0f} MiB{cpu_text}")
    for name, runs in list(receivers.items())[::2]:
        ratios = [b.seconds / r.seconds for r, b in zip(runs, baseline, strict=True)]
        median_ratio = statistics.median(r.seconds for r in baseline) / statistics.median(r.seconds for r in runs)
        print(f"  ratio {name.split(' (')[0].split(',')[0]}/storescp (medians): {median_ratio:.2f}x  "
              f"(per run {min(ratios):.2f}-{max(ratios):.2f}x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", choices=[*CASES, "both", "none"], default="both")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--floor", action="store_true", help="also run pynetdicom with a no-op C-STORE handler")
    parser.add_argument("--idle", type=float, default=0.0, metavar="SECONDS",
                        help="also measure the gateway's CPU use with one idle association open")
    parser.add_argument("--serve-noop", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_noop:
        serve_noop(args.serve_noop)
        return
    work = Path(tempfile.mkdtemp(prefix="dmgwb"))
    try:
        for name in CASES if args.case == "both" else [] if args.case == "none" else [args.case]:
            run_case(work, CASES[name], args.repeat, args.floor)
        if args.idle > 0:
            share = idle_cpu(work, args.idle)
            print(f"idle: one open association, nothing sent: gateway CPU {share * 100:.1f}% of a core")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
