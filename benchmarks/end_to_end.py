"""End-to-end time: ``dicommail send`` to arrival in the receiving PACS, against plain C-STORE.

    python benchmarks/end_to_end.py [--study-mib 100]

Starts the throwaway test bed (Postfix, Dovecot, Orthanc) on loopback, a
receiving site running ``dicommail receive`` as a daemon (IMAP IDLE), and a
sending site.  Measures from the start of ``dicommail send`` until Orthanc
lists every SOP Instance UID of the study; then, in the same run, sends the
same files to the same (emptied) Orthanc with dcmtk ``storescu`` and prints
both times and their ratio.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pydicom  # noqa: E402

from dicommail.samples import write_ct_study  # noqa: E402
from testbed import MailServers, Pacs, dcmtk_tool, ensure_installed  # noqa: E402
from testbed.sites import HOSPITAL, PRACTICE, make_home, remove_home  # noqa: E402


def wait_for(pacs: Pacs, uids: set[str], timeout: float = 1800) -> float:
    deadline = time.monotonic() + timeout
    while not uids <= set(pacs.list_sop_instance_uids()):
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for the study in Orthanc")
        time.sleep(0.2)
    return time.perf_counter()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study-mib", type=int, default=100)
    args = parser.parse_args()
    ensure_installed()
    work = Path(tempfile.mkdtemp(prefix="dme2e"))
    with MailServers() as servers, Pacs() as pacs:
        hospital = make_home("hospital", HOSPITAL, servers, pacs)
        practice = make_home("practice", PRACTICE, servers, pacs)
        daemon = None
        try:
            study = write_ct_study(work / "study", args.study_mib * 2)
            mib = sum(p.stat().st_size for p in study) / 2**20
            uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study}
            print(f"study: {len(study)} CT images, {mib:.1f} MiB")
            daemon = subprocess.Popen(
                [sys.executable, "-m", "dicommail", "--home", str(practice.path), "receive", "--interval", "30"],
                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(work / "receiver.log").open("w"),
            )
            time.sleep(3)  # the daemon's first poll and IDLE
            start = time.perf_counter()
            subprocess.run(
                [sys.executable, "-m", "dicommail", "--home", str(hospital.path), "send", str(work / "study"),
                 "--to", PRACTICE], cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
            )
            sent = time.perf_counter()
            arrived = wait_for(pacs, uids)
            mail_seconds = arrived - start
            print(f"dicommail send -> Orthanc: {mail_seconds:6.2f} s (send {sent - start:.2f} s)")

            pacs.delete_all_instances()
            start = time.perf_counter()
            subprocess.run(
                [dcmtk_tool("storescu"), "-aec", pacs.aet, "127.0.0.1", str(pacs.dicom_port), *map(str, study)],
                check=True,
            )
            direct = wait_for(pacs, uids) - start
            print(f"storescu -> Orthanc:       {direct:6.2f} s")
            print(f"ratio: {mail_seconds / direct:.2f}x the direct DICOM transfer")
        finally:
            if daemon is not None:
                daemon.send_signal(signal.SIGTERM)
                daemon.wait(timeout=60)
            remove_home(hospital)
            remove_home(practice)
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
