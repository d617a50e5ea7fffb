"""End-to-end time as a site sees it: a PACS push to the gateway until the receiving PACS has every image.

    python benchmarks/end_to_end.py [--study-mib 100] [--runs 3] [--forward complete progressive]
                                    [--idle 3] [--via gateway|send]

Starts the throwaway test bed (Postfix, Dovecot, Orthanc) on loopback, a
sending site (hospital) and a receiving site (practice, ``dicommail
receive`` as a daemon with IMAP IDLE).  For each ``receiver.forward`` mode
and run it measures, with ``--via gateway`` (the default):

    dcmtk storescu -> dicommail gateway (study complete after --idle s without
    a new image) -> SMTP -> IMAP -> dicommail receive -> C-STORE -> Orthanc

from the first C-STORE of the push until Orthanc lists every SOP Instance
UID; with ``--via send``, from the start of ``dicommail send`` instead.  In
the same run it sends the same files with ``storescu`` straight into the
same (emptied) Orthanc, and prints both times, their ratio and the peak RSS
of the gateway and the receiver.  The study-completion idle time is part of
the dicommail figure (it is what a site waits), and is printed with it.
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
import threading
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from dicommail.samples import write_ct_study  # noqa: E402
from testbed import MailServers, Pacs, dcmtk_tool, ensure_installed  # noqa: E402
from testbed.ports import free_ports, port_listening  # noqa: E402
from testbed.sites import HOSPITAL, PRACTICE, Home, empty_mailbox, gateway_config, make_home, remove_home  # noqa: E402

ROUTE_AET = "PRACTICE_DR"


def wait_for(pacs: Pacs, uids: set[str], timeout: float = 1800) -> float:
    deadline = time.monotonic() + timeout
    while not uids <= set(pacs.list_sop_instance_uids()):
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the study in Orthanc")
        time.sleep(0.1)
    return time.perf_counter()


def peak_rss_mib(process: subprocess.Popen[bytes]) -> float:
    """The process's peak resident set so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{process.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def set_receiver_forward(home: Home, mode: str) -> None:
    config = home.path / "dicommail.toml"
    text = config.read_text()
    lines = [line for line in text.splitlines() if not line.startswith("forward = ")]
    index = lines.index("[receiver]")
    lines.insert(index + 1, f'forward = "{mode}"')
    config.write_text("\n".join(lines) + "\n")


def daemon(home: Home, log: Path, *args: str) -> subprocess.Popen[bytes]:
    """A dicommail daemon whose log lines are written to ``log`` with the benchmark's clock in front."""
    process = subprocess.Popen(
        [sys.executable, "-m", "dicommail", "--home", str(home.path), *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )

    def copy(stream: IO[bytes], out: IO[str]) -> None:
        with out:
            for line in stream:
                out.write(f"{time.perf_counter():12.3f} {line.decode(errors='replace')}")

    threading.Thread(target=copy, args=(process.stderr, log.open("a")), daemon=True).start()
    return process


def stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=120)


def one_transfer(args: argparse.Namespace, work: Path, servers: MailServers, pacs: Pacs, hospital: Home,
                 practice: Home, study: list[Path], uids: set[str], port: int, mode: str) -> dict[str, float]:
    pacs.delete_all_instances()
    set_receiver_forward(practice, mode)
    receiver = daemon(practice, work / "receiver.log", "receive", "--interval", "30")
    gateway = daemon(hospital, work / "gateway.log", "gateway") if args.via == "gateway" else None
    try:
        deadline = time.monotonic() + 60
        while gateway is not None and not port_listening(port):
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit(f"the gateway did not start; see {work / 'gateway.log'}")
            time.sleep(0.1)
        time.sleep(3)  # the receiver's first poll, then IDLE
        start = time.perf_counter()
        print(f"{start:12.3f} push starts", file=(work / "receiver.log").open("a"))
        if gateway is not None:
            subprocess.run(
                [dcmtk_tool("storescu"), "-aet", "HOSPITALPACS", "-aec", ROUTE_AET, "127.0.0.1", str(port),
                 *map(str, study)],
                check=True, env={**os.environ, "TCP_NODELAY": "1"},
            )
        else:
            subprocess.run(
                [sys.executable, "-m", "dicommail", "--home", str(hospital.path), "send", str(work / "study"),
                 "--to", PRACTICE], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
            )
        pushed = time.perf_counter()
        arrived = wait_for(pacs, uids)
        return {
            "seconds": arrived - start,
            "push": pushed - start,
            "gateway_rss": peak_rss_mib(gateway) if gateway is not None else float("nan"),
            "receiver_rss": peak_rss_mib(receiver),
        }
    finally:
        stop(gateway)
        stop(receiver)
        empty_mailbox(servers, PRACTICE)


def direct(pacs: Pacs, study: list[Path], uids: set[str]) -> float:
    pacs.delete_all_instances()
    start = time.perf_counter()
    subprocess.run(
        [dcmtk_tool("storescu"), "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), *map(str, study)],
        check=True, env={**os.environ, "TCP_NODELAY": "1"},
    )
    return wait_for(pacs, uids) - start


def summary(values: list[float]) -> str:
    return f"median {statistics.median(values):6.2f} (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-mib", type=int, default=100)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--forward", nargs="+", choices=("complete", "progressive"),
                        default=["complete", "progressive"])
    parser.add_argument("--idle", type=int, default=3, help="gateway.study_idle_seconds (default 3)")
    parser.add_argument("--via", choices=("gateway", "send"), default="gateway")
    parser.add_argument("--keep", action="store_true", help="keep the logs (gateway.log, receiver.log) and say where")
    args = parser.parse_args()
    ensure_installed()
    work = Path(tempfile.mkdtemp(prefix="dme2e"))
    [port] = free_ports(1)
    with MailServers() as servers, Pacs() as pacs:
        routes = gateway_config(port, {ROUTE_AET: PRACTICE}, idle_seconds=args.idle, send_interval=2,
                                extra="duplicate_window = 0")  # the same study is pushed once per run
        hospital = make_home("hospital", HOSPITAL, servers, pacs, extra=routes)
        practice = make_home("practice", PRACTICE, servers, pacs)
        try:
            study = write_ct_study(work / "study", args.study_mib * 2)
            mib = sum(p.stat().st_size for p in study) / 2**20
            uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study}
            via = f"storescu -> gateway (idle {args.idle} s)" if args.via == "gateway" else "dicommail send"
            print(f"study: {len(study)} CT images, {mib:.1f} MiB; {via} -> mail -> receive -> Orthanc")
            results: dict[str, list[dict[str, float]]] = {mode: [] for mode in args.forward}
            baseline: list[float] = []
            for run in range(1, args.runs + 1):
                for mode in args.forward:
                    result = one_transfer(args, work, servers, pacs, hospital, practice, study, uids, port, mode)
                    results[mode].append(result)
                    print(f"run {run} {mode:<11}: {result['seconds']:6.2f} s (push {result['push']:.2f} s; "
                          f"peak RSS gateway {result['gateway_rss']:.0f} MiB, "
                          f"receiver {result['receiver_rss']:.0f} MiB)", flush=True)
                baseline.append(direct(pacs, study, uids))
                print(f"run {run} storescu -> Orthanc: {baseline[-1]:6.2f} s", flush=True)
            print()
            print(f"storescu straight into Orthanc: {summary(baseline)} s")
            for mode, runs in results.items():
                seconds = [r["seconds"] for r in runs]
                ratios = [r["seconds"] / b for r, b in zip(runs, baseline, strict=True)]
                print(f"dicommail, forward = {mode:<11}: {summary(seconds)} s; "
                      f"ratio {summary(ratios)}x; peak RSS gateway "
                      f"{max(r['gateway_rss'] for r in runs):.0f} MiB, receiver "
                      f"{max(r['receiver_rss'] for r in runs):.0f} MiB")
        finally:
            remove_home(hospital)
            remove_home(practice)
            if args.keep:
                print(f"logs kept in {work}")
            else:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
