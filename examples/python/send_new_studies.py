"""Send every study that lands in a folder (a modality's or PACS's export share) to one reader.

    python send_new_studies.py --home /var/lib/dicommail --to reading@practice.example /srv/export
    python send_new_studies.py --home ... --to ... /srv/export --once     # from cron

Each sub-folder of the watched folder is one delivery.  It is sent once
nothing in it changed for ``--settle`` seconds (the export is complete), and
then moved to ``.sent/`` (handed to the mail server, or queued for a retry by
``dicommail send --pending``) or ``.failed/`` (see the log line for why).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import dicommail

log = logging.getLogger("send_new_studies")


def settled(folder: Path, settle: float) -> bool:
    """True if no file in ``folder`` changed during the last ``settle`` seconds."""
    newest = max((p.stat().st_mtime for p in folder.rglob("*") if p.is_file()), default=None)
    return newest is not None and time.time() - newest >= settle


def send_ready(site: dicommail.Site, watched: Path, recipient: str, settle: float) -> int:
    """Send each settled sub-folder once; return how many failed."""
    failures = 0
    for folder in sorted(p for p in watched.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not settled(folder, settle):
            continue
        try:
            results = site.send([folder], recipient)
        except dicommail.DicommailError as exc:
            # Nothing usable in the folder, an uncertified recipient, a wrong [smtp] section ...
            log.error("%s was not sent: %s (%s)", folder.name, exc.message, exc.hint)
            outcome = ".failed"
            failures += 1
        else:
            outcome = ".failed" if any(r.status == "failed" for r in results) else ".sent"
            for result in results:
                log.info("%s: set %s %s (%d of %d mails sent)", folder.name, result.set_id, result.status,
                         result.mails_sent, result.mails)
        target = watched / outcome
        target.mkdir(exist_ok=True)
        shutil.move(str(folder), target / folder.name)
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="the folder whose sub-folders are studies to send")
    parser.add_argument("--to", required=True, help="the reader's mail address (a certified key)")
    parser.add_argument("--home", help="the dicommail home (default: $DICOMMAIL_HOME or ~/.dicommail)")
    parser.add_argument("--settle", type=float, default=60.0, help="seconds without change before sending")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between looks at the folder")
    parser.add_argument("--once", action="store_true", help="look once and exit (for cron)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    site = dicommail.Site.open(args.home)
    while True:
        failures = send_ready(site, args.folder, args.to, args.settle)
        if args.once:
            return 1 if failures else 0
        time.sleep(args.interval)


if __name__ == "__main__":
    sys.exit(main())
