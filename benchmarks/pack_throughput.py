"""Pack throughput and memory against plain gpg on the same bytes.

    python benchmarks/pack_throughput.py [--study-mib 100] [--workers 1 2] [--rounds 3]

Makes a synthetic CT (512x512 16-bit slices, air around a noisy body disc),
then in each round: pushes the concatenated files through plain
``gpg --sign --encrypt --armor -z 1`` and packs the study with dicommail with
each worker count; each ratio is against the same round's plain gpg, so a
machine shared with other work skews both alike.  Each measurement runs in a
fresh child process so that its peak RSS (ours and gpg's) is its own.
Prints rates, ratios, mails, bytes on the wire and peak RSS per round, then
the range of each ratio over the rounds.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicommail.crypto.demo import install_demo_site  # noqa: E402
from dicommail.crypto.gpg import Keyring  # noqa: E402
from dicommail.crypto.keys import own_key  # noqa: E402
from dicommail.dicom import scan  # noqa: E402
from dicommail.samples import write_ct_study  # noqa: E402
from dicommail.wire.pack import Packer, PackOptions  # noqa: E402

MIB = 1024 * 1024


def child_plain_gpg(study: Path, home: Path) -> dict[str, float]:
    files = sorted(study.iterdir())
    start = time.perf_counter()
    gpg = subprocess.Popen(
        [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--quiet",
            "--sign",
            "--encrypt",
            "--armor",
            "-z",
            "1",
            "--recipient",
            "practice@practice.test",
            "--output",
            "-",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
    )
    assert gpg.stdin is not None
    for path in files:
        with path.open("rb") as handle:
            shutil.copyfileobj(handle, gpg.stdin, MIB)
    gpg.stdin.close()
    gpg.wait()
    elapsed = time.perf_counter() - start
    return {"seconds": elapsed, "rss_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}


def child_pack(study: Path, home: Path, workers: int, out: Path) -> dict[str, float]:
    keyring = Keyring(home)
    files = scan([study]).files
    options = PackOptions(
        sender="hospital@hospital.test",
        recipient="practice@practice.test",
        signer=own_key(keyring).fingerprint,
        max_mail_size=10 * MIB,
        compression_level=1,
        workers=workers,
    )
    start = time.perf_counter()
    packed = Packer(keyring, options).pack(files, out)
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "mails": len(packed.mails),
        "wire_bytes": sum(m.size for m in packed.mails),
        "rss_self_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "rss_children_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
    }


def run_child(*args: str) -> dict[str, float]:
    result = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-mib", type=int, default=100, help="study size in MiB (512 KiB per slice)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=3, help="measurements of each (ranges are printed)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, study, home, *rest = args.child
        if kind == "gpg":
            print(json.dumps(child_plain_gpg(Path(study), Path(home))))
        else:
            print(json.dumps(child_pack(Path(study), Path(home), int(rest[0]), Path(rest[1]))))
        return

    work = Path(tempfile.mkdtemp(prefix="dmbench"))
    try:
        slices = max(1, args.study_mib * 2)
        study = work / "study"
        print(f"making a synthetic CT of {slices} slices ...", flush=True)
        write_ct_study(study, slices)
        size = sum(p.stat().st_size for p in study.iterdir())
        home = work / "g"
        keyring = Keyring(home)
        install_demo_site(keyring, "hospital")
        keyring.close()
        mib = size / MIB
        version = subprocess.run(["gpg", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        print(f"study: {mib:.1f} MiB in {slices} files; {version}")
        ratios: dict[int, list[float]] = {workers: [] for workers in args.workers}
        for number in range(1, args.rounds + 1):
            plain = run_child("gpg", str(study), str(home))
            plain_rate = mib / plain["seconds"]
            print(
                f"round {number}: plain gpg -z 1 {plain['seconds']:5.2f} s {plain_rate:6.1f} MiB/s"
                f"  gpg peak RSS {plain['rss_children_kib'] / 1024:.0f} MiB"
            )
            for workers in args.workers:
                out = work / f"out{workers}"
                result = run_child("pack", str(study), str(home), str(workers), str(out))
                rate = mib / result["seconds"]
                ratios[workers].append(rate / plain_rate)
                print(
                    f"  pack, {workers} worker(s): {result['seconds']:5.2f} s {rate / plain_rate:4.2f}x"
                    f"  {int(result['mails'])} mails {result['wire_bytes'] / MIB:6.1f} MiB wire"
                    f"  RSS {result['rss_self_kib'] / 1024:.0f} MiB (gpg {result['rss_children_kib'] / 1024:.0f})"
                )
                shutil.rmtree(out, ignore_errors=True)
        summary = ", ".join(f"{w} worker(s) {min(r):.2f}-{max(r):.2f}x" for w, r in ratios.items())
        print(f"pack vs plain gpg over {args.rounds} round(s): {summary}")
    finally:
        subprocess.run(["gpgconf", "--homedir", str(work / "g"), "--kill", "all"], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
