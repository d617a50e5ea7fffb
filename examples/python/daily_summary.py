"""A daily summary for the teleradiology log: what was sent and received in the last 24 hours.

    python daily_summary.py --home /var/lib/dicommail            # text, e.g. for cron mail
    python daily_summary.py --home /var/lib/dicommail --json     # one JSON document

Names no patient: set IDs, peers, states, counts and times only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import Counter
from datetime import datetime, timedelta

import dicommail


def summary(site: dicommail.Site, since: datetime) -> dict[str, object]:
    sent = site.transfers(since=since)
    times = [t.transfer_seconds for t in sent if t.transfer_seconds is not None]
    received = [s for s in site.received_sets() if s.first_seen_at >= since.astimezone()]
    quarantined = [q for q in site.quarantine() if q.quarantined_at >= since.astimezone()]
    return {
        "since": since.astimezone().isoformat(timespec="seconds"),
        "sent": dict(Counter(t.status for t in sent)),
        "median_transfer_seconds": statistics.median(times) if times else None,
        "slowest_transfer_seconds": max(times) if times else None,
        "failed": [{"set_id": t.set_id, "recipient": t.recipient, "error": t.error}
                   for t in sent if t.status in ("failed", "expired")],
        "received": dict(Counter(s.status for s in received)),
        "quarantined": len(quarantined),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", help="the dicommail home (default: $DICOMMAIL_HOME or ~/.dicommail)")
    parser.add_argument("--hours", type=float, default=24.0, help="how far back (default 24)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)
    try:
        site = dicommail.Site.open(args.home)
        report = summary(site, datetime.now() - timedelta(hours=args.hours))
    except dicommail.DicommailError as exc:
        if args.json:
            print(json.dumps({"ok": False, "error": {"code": exc.code, "message": exc.message, "hint": exc.hint}}))
        else:
            print(f"error: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"ok": True, **report}))
        return 0
    print(f"dicommail summary since {report['since']}")
    print(f"  sent:        {report['sent'] or 'nothing'}")
    if report["median_transfer_seconds"] is not None:
        print(f"  transfer time: median {report['median_transfer_seconds']:.0f} s, "
              f"slowest {report['slowest_transfer_seconds']:.0f} s")
    for failed in report["failed"]:  # type: ignore[attr-defined]
        print(f"  FAILED {failed['set_id']} to {failed['recipient']}: {failed['error']}")
    print(f"  received:    {report['received'] or 'nothing'}")
    print(f"  quarantined: {report['quarantined']}")
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
