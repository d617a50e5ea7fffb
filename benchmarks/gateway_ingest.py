"""Ingest speed of ``dicommail gateway`` against dcmtk's own storescp, with the same files and sender.

    python benchmarks/gateway_ingest.py [--instances 200] [--size 512] [--repeat 3]

Sends a synthetic CT study (``--instances`` images of ``--size``² 16-bit
pixels) with dcmtk ``storescu`` to

1. a ``dicommail gateway`` (a child process, as in production: every
   instance written through a temporary file, fsynced, renamed, the directory
   fsynced and a row committed to SQLite before the success status), and
2. dcmtk ``storescp -od DIR`` (writes each file, no fsync) as the baseline,

and prints instances/s and MiB/s of both and their ratio (best of
``--repeat`` runs each).  The gateway's study idle time is set to a day, so
packing and sending do not run during the measurement.

Both storescu runs get ``TCP_NODELAY=1`` (dcmtk's switch to turn off Nagle's
algorithm, as PACSs do): without it every C-STORE of a small object waits
for a delayed ACK (about 40 ms on Linux) whatever the receiver.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicommail.crypto.demo import install_demo_site  # noqa: E402
from dicommail.crypto.gpg import Keyring  # noqa: E402
from dicommail.samples import write_ct_study  # noqa: E402
from testbed import dcmtk_tool  # noqa: E402
from testbed.ports import free_ports, port_listening  # noqa: E402

ENV = {**os.environ, "TCP_NODELAY": "1"}


def storescu(port: int, called: str, files: list[Path]) -> float:
    started = time.perf_counter()
    subprocess.run([dcmtk_tool("storescu"), "-aet", "BENCHPACS", "-aec", called, "127.0.0.1", str(port),
                    *map(str, files)], check=True, env=ENV, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


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


def run_gateway(work: Path, files: list[Path]) -> float:
    port = free_ports(1)[0]
    home = gateway_home(work, port)
    log = work / "gateway.log"
    with log.open("wb") as handle:
        process = subprocess.Popen([sys.executable, "-m", "dicommail", "--home", str(home), "gateway"],
                                   stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_listening(port, process, log)
        return storescu(port, "BENCH", files)
    finally:
        stop(process)
        subprocess.run(["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "all"], check=False)
        shutil.rmtree(home, ignore_errors=True)


def run_storescp(work: Path, files: list[Path]) -> float:
    port = free_ports(1)[0]
    out = work / "storescp"
    out.mkdir()
    log = work / "storescp.log"
    with log.open("wb") as handle:
        process = subprocess.Popen([dcmtk_tool("storescp"), "-od", str(out), str(port)], stdout=handle,
                                   stderr=subprocess.STDOUT, env=ENV)
    try:
        wait_listening(port, process, log)
        return storescu(port, "STORESCP", files)
    finally:
        stop(process)
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--instances", type=int, default=200)
    parser.add_argument("--size", type=int, default=512, help="image width and height in pixels")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dmgwb"))
    try:
        files = write_ct_study(work / "study", args.instances, args.size)
        mib = sum(p.stat().st_size for p in files) / 2**20
        print(f"study: {len(files)} CT images, {mib:.1f} MiB ({mib * 1024 / len(files):.0f} KiB each)")
        gateway = min(run_gateway(work, files) for _ in range(args.repeat))
        baseline = min(run_storescp(work, files) for _ in range(args.repeat))
        for name, seconds in (("dicommail gateway (fsync)", gateway), ("dcmtk storescp (no fsync)", baseline)):
            print(f"{name:27s} {seconds:7.2f} s  {len(files) / seconds:8.1f} instances/s  {mib / seconds:7.1f} MiB/s")
        print(f"ratio gateway/storescp: {baseline / gateway:.2f}x")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
