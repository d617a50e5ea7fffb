"""Recording fetched mails: what arrived, from where, what kind, and what is left to do."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from email.message import Message
from pathlib import Path

from dicommail.errors import DicommailError
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database, now
from dicommail.wire import headers as h
from dicommail.wire.mime import LineReader, read_headers
from dicommail.wire.partial import FragmentInfo, fragment_info

#: The @GIT marker of a notification's outer header (see :mod:`dicommail.wire.notifications`).
REPORT_HEADER = "X-TELEMEDICINE-REPORT"

#: Kinds of fetched mail.
DICOM_MAIL = "dicom-mail"
FRAGMENT = "fragment"
OTHER = "other"
#: A disposition notification (acknowledgement): a plain multipart/report or a
#: PGP/MIME mail marked X-TELEMEDICINE-REPORT.
REPORT = "report"


@dataclass(frozen=True)
class InboundMail:
    id: int
    account: str
    server_uid: str
    kind: str
    status: str
    spool_path: Path
    server_done: bool


def classify(headers: Message) -> tuple[str, FragmentInfo | None]:
    """DICOM-Mail carries the @GIT set headers outside; fragments are taken as ours too.

    Everything else (including PGP mail without set headers) is "other" mail:
    it is left on the server, never deleted.
    """
    try:
        fragment = fragment_info(headers)
    except DicommailError:
        return FRAGMENT, None  # a malformed fragment: stored, then quarantined by the pipeline
    if fragment is not None:
        return FRAGMENT, fragment
    if headers.get(REPORT_HEADER) is not None or headers.get_content_type() == "multipart/report":
        return REPORT, None
    if headers.get(h.SETID) is not None:
        return DICOM_MAIL, None
    return OTHER, None


def _small_int(value: object) -> int | None:
    """A header's number if it is a plain, reasonably small one (SQLite and hostile input)."""
    text = str(value).strip() if value is not None else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 9 else None


def _row(row: sqlite3.Row) -> InboundMail:
    return InboundMail(
        id=row["id"],
        account=row["account"],
        server_uid=row["server_uid"],
        kind=row["kind"],
        status=row["status"],
        spool_path=Path(row["spool_path"]),
        server_done=bool(row["server_done"]),
    )


def known(db: Database, account: str, server_uid: str) -> InboundMail | None:
    rows = db.query("SELECT * FROM inbound_mails WHERE account = ? AND server_uid = ?", (account, server_uid))
    return _row(rows[0]) if rows else None


def store_fetched(db: Database, spool: Spool, account: str, server_uid: str, data: bytes) -> InboundMail:
    """Store a fetched mail durably and record it; only then may the server copy be touched.

    Idempotent: a mail already recorded for ``(account, server_uid)`` is not
    stored again (a rerun after a crash between store and server action).
    """
    existing = known(db, account, server_uid)
    if existing is not None:
        return existing
    path = spool.store_raw(data)
    try:
        with path.open("rb") as handle:
            headers = read_headers(LineReader(handle))
        kind, fragment = classify(headers)
    except (DicommailError, ValueError, UnicodeError):
        # Unreadable headers (e.g. a 64 KiB block): not ours to process, and it
        # must not stop the receiver; it stays on the server as other mail.
        headers, kind, fragment = Message(), OTHER, None
    set_part = _small_int(headers.get(h.SETPART))
    with db.transaction() as conn:
        cursor = conn.execute(
            """INSERT INTO inbound_mails (account, server_uid, message_id, size, spool_path, kind, status,
                   set_id, set_part, fragment_id, fragment_number, fragment_total, received_at)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                account,
                server_uid,
                str(headers.get("Message-ID", "")).strip()[:998],
                len(data),
                str(path),
                kind,
                OTHER if kind == OTHER else "stored",
                str(headers.get(h.SETID, "")).strip()[:128] or None,
                set_part,
                fragment.id if fragment else None,
                fragment.number if fragment else None,
                fragment.total if fragment else None,
                now(),
            ),
        )
        mail_id = cursor.lastrowid
    assert mail_id is not None
    if kind == OTHER:
        # Other mail stays on the server; no reason to keep a plaintext copy here.
        path.unlink(missing_ok=True)
    found = known(db, account, server_uid)
    assert found is not None and found.id == mail_id
    return found


def mark_server_done(db: Database, mail_id: int) -> None:
    with db.transaction() as conn:
        conn.execute("UPDATE inbound_mails SET server_done = 1 WHERE id = ?", (mail_id,))


def pending_server_actions(db: Database, account: str) -> list[InboundMail]:
    """Mails stored here whose server copy was not yet moved, deleted or left (after a crash)."""
    rows = db.query(
        "SELECT * FROM inbound_mails WHERE account = ? AND server_done = 0 ORDER BY id", (account,)
    )
    return [_row(r) for r in rows]
