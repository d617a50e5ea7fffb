"""Unpack throughput and memory against plain ``gpg --decrypt`` of the same mails.

    python benchmarks/unpack_throughput.py [--study-mib 100] [--runs 3] [--cache DIR]

Makes, once, two demo homes (hospital, practice), a synthetic CT of 512 KiB
slices (``dicommail testdata``) and its set of mails (``dicommail pack``);
they stay in the cache directory (default: ``dmunpack-<MiB>`` in the temp
directory) for the next invocation.  Each run times ``gpg --decrypt`` of
every mail to /dev/null with the practice's keyring, one gpg after the other,
then ``dicommail unpack`` of the same mails: the CLI in a fresh process, so
start-up and imports count.  It prints both rates in MiB of study per second,
their ratio and the peak RSS of dicommail's own process and of gpg (gpg's
through GNU time, when /usr/bin/time exists); with several runs, the median
and range of each figure.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MIB = 1024 * 1024
HOSPITAL = "hospital@hospital.test"
PRACTICE = "practice@practice.test"
GNU_TIME = Path("/usr/bin/time")
DICOMMAIL = [sys.executable, "-m", "dicommail"]

#: Runs the CLI in this child process and then reports the child's own peak RSS on stderr.
CLI_CHILD = """\
import json, resource, sys
from dicommail.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="dicommail")
except SystemExit as exc:
    status = exc.code or 0
else:
    status = 0
usage = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"status": status, "rss_kib": usage.ru_maxrss}), file=sys.stderr)
"""


@dataclass
class Bench:
    root: Path

    @property
    def hospital(self) -> Path:
        return self.root / "hospital"

    @property
    def practice(self) -> Path:
        return self.root / "practice"

    @property
    def study(self) -> Path:
        return self.root / "study"

    @property
    def mails(self) -> list[Path]:
        return sorted((self.root / "mails").glob("*.eml"))


def prepare(bench: Bench, study_mib: int) -> None:
    """Homes, study and mails, unless an earlier invocation left them complete."""
    ready = bench.root / "ready"
    if ready.exists():
        return
    shutil.rmtree(bench.root, ignore_errors=True)
    bench.root.mkdir(parents=True)
    from dicommail.crypto.demo import install_demo_site
    from dicommail.crypto.gpg import Keyring

    for home, site, address in ((bench.hospital, "hospital", HOSPITAL), (bench.practice, "practice", PRACTICE)):
        subprocess.run([*DICOMMAIL, "--home", str(home), "init", "--address", address], check=True,
                       capture_output=True)
        keyring = Keyring(home / "gnupg")
        install_demo_site(keyring, site)  # type: ignore[arg-type]
        keyring.close()
    slices = max(1, study_mib * 2)
    print(f"making a synthetic CT of {slices} slices and packing it ...", flush=True)
    subprocess.run([*DICOMMAIL, "testdata", str(bench.study), "--slices", str(slices)], check=True,
                   capture_output=True)
    subprocess.run([*DICOMMAIL, "--home", str(bench.hospital), "pack", str(bench.study), "--to", PRACTICE,
                    "-o", str(bench.root / "mails")], check=True, capture_output=True)
    ready.touch()


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


@dataclass
class Side:
    seconds: float
    cpu_seconds: float
    rss_kib: int | None


def gpg_side(bench: Bench) -> Side:
    """``gpg --decrypt`` of every mail, one after the other; peak RSS ``None`` without GNU time."""
    peak: int | None = None
    elapsed = 0.0
    cpu = children_cpu()
    for mail in bench.mails:
        command = ["gpg", "--homedir", str(bench.practice / "gnupg"), "--batch", "--quiet", "--yes",
                   "--pinentry-mode", "error", "--output", "/dev/null", "--decrypt", str(mail)]
        if GNU_TIME.exists():
            # GNU time forks gpg from its own small process: the figure is gpg's alone.
            command = [str(GNU_TIME), "-f", "rss_kib=%M", *command]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        elapsed += time.perf_counter() - start
        if result.returncode != 0:
            raise SystemExit(f"gpg --decrypt {mail.name} failed:\n{result.stderr}")
        for line in result.stderr.splitlines():
            if line.startswith("rss_kib="):
                peak = max(peak or 0, int(line.partition("=")[2]))
    return Side(elapsed, children_cpu() - cpu, peak)


def dicommail_side(bench: Bench) -> Side:
    """``dicommail unpack`` of every mail in a fresh process; the peak RSS is that process's own."""
    out = bench.root / "unpacked"
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-c", CLI_CHILD, "--home", str(bench.practice), "unpack", "--json",
               "-o", str(out), *map(str, bench.mails)]
    cpu = children_cpu()
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    cpu = children_cpu() - cpu
    shutil.rmtree(out, ignore_errors=True)
    report = json.loads(result.stdout)
    usage = json.loads(result.stderr.strip().splitlines()[-1])
    if usage["status"] != 0 or not report["ok"]:
        raise SystemExit(f"dicommail unpack failed:\n{result.stdout}\n{result.stderr}")
    return Side(elapsed, cpu, int(usage["rss_kib"]))


def spread(values: list[float], unit: str) -> str:
    return f"{statistics.median(values):.2f} {unit} (range {min(values):.2f}-{max(values):.2f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-mib", type=int, default=100, help="study size in MiB (512 KiB per slice)")
    parser.add_argument("--runs", type=int, default=1, help="measurements (each: gpg, then dicommail)")
    parser.add_argument("--cache", type=Path, help="where the homes, study and mails are kept")
    args = parser.parse_args()
    # Short default path: gpg-agent's socket path must stay under 108 characters.
    bench = Bench(args.cache or Path(tempfile.gettempdir()) / f"dmunpack-{args.study_mib}")
    try:
        prepare(bench, args.study_mib)
        mib = sum(p.stat().st_size for p in bench.study.iterdir()) / MIB
        wire = sum(m.stat().st_size for m in bench.mails) / MIB
        version = subprocess.run(["gpg", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        print(f"study {mib:.1f} MiB in {len(bench.mails)} mails ({wire:.1f} MiB); {version}")
        gpg_rates: list[float] = []
        ours_rates: list[float] = []
        ratios: list[float] = []
        for run in range(1, args.runs + 1):
            gpg = gpg_side(bench)
            ours = dicommail_side(bench)
            gpg_rates.append(mib / gpg.seconds)
            ours_rates.append(mib / ours.seconds)
            ratios.append(gpg.seconds / ours.seconds)
            gpg_peak = f"{gpg.rss_kib / 1024:.0f} MiB" if gpg.rss_kib else "n/a"
            ours_peak = f"{(ours.rss_kib or 0) / 1024:.0f} MiB"
            # CPU time (all processes, all cores) shows the work apart from a busy machine's waits.
            print(f"run {run}: gpg --decrypt {gpg.seconds:5.2f} s {gpg_rates[-1]:6.1f} MiB/s "
                  f"CPU {gpg.cpu_seconds:4.2f} s RSS {gpg_peak}")
            print(f"       unpack      {ours.seconds:5.2f} s {ours_rates[-1]:6.1f} MiB/s "
                  f"CPU {ours.cpu_seconds:4.2f} s RSS {ours_peak}")
            print(f"       ratio {ratios[-1]:.2f}x")
        if args.runs > 1:
            print(f"median of {args.runs}: gpg {spread(gpg_rates, 'MiB/s')}")
            print(f"  unpack {spread(ours_rates, 'MiB/s')}")
            print(f"  ratio {spread(ratios, 'x')}")
    finally:
        for home in (bench.hospital, bench.practice):
            subprocess.run(["gpgconf", "--homedir", str(home / "gnupg"), "--kill", "all"], check=False,
                           capture_output=True)


if __name__ == "__main__":
    main()
