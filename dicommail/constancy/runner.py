"""The pieces of a constancy check's run that need no :class:`~dicommail.Site`: test set, mark, alert mail.

:meth:`dicommail.Site.constancy_run` puts them together: it finds (or makes)
the test data set, records the check, sends the set with its mark through
:meth:`~dicommail.Site.send`, and waits for the receipt.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

from dicommail.config import Config
from dicommail.constancy.store import ConstancyCheck
from dicommail.constancy.values import ConstancyMark, expected_values
from dicommail.dicom import DicomFile, scan
from dicommail.errors import InputError
from dicommail.transport.smtp import SmtpClient

__all__ = ["alert_admin", "alert_text", "build_mark", "load_test_set", "synthetic_dataset"]

#: Bytes of one slice of the synthetic CT (512 x 512 pixels of 16 bits).
_SLICE_BYTES = 512 * 512 * 2
_MARKER = "dataset.json"


def synthetic_dataset(config: Config) -> Path:
    """The synthetic CT of ``constancy.dataset_mib`` MiB in spool/constancy/dataset, generated once.

    Generated again only when the configured size changes; the same UIDs are
    sent every time, so a receiving PACS (of a foreign receiver) keeps one copy.
    """
    from dicommail.samples import write_ct_study

    folder = config.spool / "constancy" / "dataset"
    slices = max(1, math.ceil(config.constancy.dataset_mib * 1024**2 / _SLICE_BYTES))
    wanted = {"generator": "dicommail.samples.write_ct_study", "slices": slices, "size": 512}
    marker = folder / _MARKER
    try:
        if json.loads(marker.read_text(encoding="utf-8")) == wanted:
            return folder
    except (OSError, ValueError):
        pass
    # Made aside and renamed into place: a check running at the same time sees all of it or none.
    work = folder.with_name(f"dataset.{os.getpid()}.tmp")
    shutil.rmtree(work, ignore_errors=True)
    write_ct_study(work, slices, 512, seed=6868)
    (work / _MARKER).write_text(json.dumps(wanted) + "\n", encoding="utf-8")
    old = folder.with_name(f"dataset.{os.getpid()}.old")
    if folder.exists():
        folder.rename(old)
    try:
        work.rename(folder)
    except OSError:
        shutil.rmtree(work, ignore_errors=True)  # another check put its own in place first
    shutil.rmtree(old, ignore_errors=True)
    return folder


def load_test_set(config: Config, dataset: Path | None = None) -> list[DicomFile]:
    """The DICOM files of the test data set (``dataset``, else ``constancy.dataset``, else the synthetic CT).

    Raises :class:`~dicommail.errors.InputError` if it holds no DICOM file or
    more than one study (a check measures one transfer).
    """
    if dataset is None:
        dataset = config.resolve(config.constancy.dataset) if config.constancy.dataset else synthetic_dataset(config)
    if not dataset.is_dir():
        raise InputError(f"the constancy test data set {dataset} is not a folder",
                         "set [constancy] dataset to a folder with one study, or leave it empty for a synthetic CT")
    studies = scan([dataset]).studies()
    if len(studies) != 1:
        raise InputError(
            f"the constancy test data set {dataset} holds {len(studies)} studies",
            "a check sends exactly one study: point [constancy] dataset (or --dataset) at a folder with one",
        )
    return next(iter(studies.values()))


def build_mark(check_id: str, kind: str, files: Sequence[DicomFile], entries: Sequence[str]) -> ConstancyMark:
    """The mark of a test transfer: what the receiver must find in every instance of ``files``."""
    instances = {}
    for item in files:
        expectation = expected_values(item.path, entries)
        instances[expectation.sop_instance_uid] = expectation
    return ConstancyMark(check_id=check_id, kind=kind, entries=tuple(entries), instances=instances)


def _yes_no(value: bool | None) -> str:
    return "not checked" if value is None else ("yes" if value else "NO")


def alert_text(check: ConstancyCheck, site: str) -> tuple[str, str]:
    """(subject, body) of the mail about a failed check; no patient data (keywords and numbers only)."""
    subject = f"dicommail: constancy check to {check.peer} FAILED ({check.kind}, attempt {check.attempt})"
    shown = f"{check.transfer_time_s:.1f} s" if check.transfer_time_s is not None else "no receipt"
    body = "\n".join([
        f"A DIN 6868-159 constancy check of the teleradiology link from {site} failed.",
        "",
        f"Check:          {check.id} ({check.kind}, attempt {check.attempt})",
        f"Peer:           {check.peer}",
        f"Started:        {check.started_at.isoformat(timespec='seconds')}",
        f"Transfer time:  {shown} (limit {check.limit_s} s)",
        f"Complete:       {_yes_no(check.complete)}",
        f"Header entries: {_yes_no(check.headers_ok)}",
        f"Image quality:  {_yes_no(check.quality_ok)}",
        f"Reason:         {check.reason or '-'}",
        "",
        "Until a check passes again the link must not be used for teleradiology.",
        f"Details: dicommail constancy list --to {check.peer}",
        "",
    ])
    return subject, body


def alert_admin(config: Config, sender: str, check: ConstancyCheck) -> None:
    """Mail the failed ``check`` to ``constancy.admin_address`` through ``[smtp]`` (a plain, unencrypted mail).

    Raises :class:`~dicommail.errors.TransportError` (or ConfigError) if it cannot be sent.
    """
    admin = config.constancy.admin_address
    subject, body = alert_text(check, sender)
    message = EmailMessage(policy=SMTP.clone(linesep="\n"))  # mail files on disk have LF line ends
    message["From"] = sender
    message["To"] = admin
    message["Subject"] = subject
    message["Date"] = email.utils.formatdate(localtime=True)
    message["Message-ID"] = email.utils.make_msgid(domain=sender.rpartition("@")[2] or None)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(body)
    folder = config.spool / "constancy" / "alerts"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"check-{check.id}-{int(time.time())}.eml"
    path.write_bytes(message.as_bytes())
    client = SmtpClient.from_config(config)

    async def submit() -> None:
        async with client:
            await client.send(path, sender, [admin])

    try:
        asyncio.run(submit())
    finally:
        path.unlink(missing_ok=True)
