"""Recording fetched mails: what arrived, from where, what kind, and what is left to do."""

from __future__ import annotations

import contextlib
import sqlite3
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from types import TracebackType
from typing import Self

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

#: Status of a mail not fetched because it is over ``mailbox.max_message_size``
#: (kind "other", no spool file): it stays on the server.
TOO_LARGE = "too-large"


@dataclass(frozen=True)
class InboundMail:
    id: int
    account: str
    server_uid: str
    kind: str
    status: str
    spool_path: Path
    server_done: bool
    #: Size in bytes: of the stored file, or as the server reported it (too large).
    size: int = 0


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
        size=row["size"],
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
    return record_stored(db, account, server_uid, spool.store_raw(data))


class IncomingMail:
    """A fetched mail written to the spool piece by piece, then recorded.

    ``with IncomingMail(spool) as mail: mail.write(...); mail.record(...)``:
    memory stays bounded by the pieces, not the mail.  Leaving the block
    without :meth:`record` (an error, or :meth:`discard`) leaves no file.
    """

    def __init__(self, spool: Spool) -> None:
        self._stack = contextlib.ExitStack()
        self.path, self._handle = self._stack.enter_context(spool.raw_writer())
        #: Bytes written so far.
        self.size = 0
        self._open = True

    def write(self, data: bytes | bytearray) -> None:
        self._handle.write(data)
        self.size += len(data)

    def discard(self) -> None:
        """Remove what was written (the temporary file); no-op once closed."""
        if self._open:
            self._open = False
            # Raising into the writer is what makes atomic_writer remove its temporary file.
            self._stack.__exit__(_Discarded, _Discarded(), None)

    def record(self, db: Database, account: str, server_uid: str) -> InboundMail:
        """Make the file durable under its name, then classify and record it (see :func:`record_stored`)."""
        if not self._open:
            raise ValueError("this incoming mail was already recorded or discarded")
        self._open = False
        self._stack.close()  # rename into place and fsync
        return record_stored(db, account, server_uid, self.path)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.discard()


class _Discarded(Exception):
    """Thrown into the spool writer to drop an incoming mail."""


def record_stored(db: Database, account: str, server_uid: str, path: Path) -> InboundMail:
    """Record a mail already stored durably at ``path``; classification reads only its header.

    A mail already recorded for ``(account, server_uid)`` is kept as it is
    and ``path`` removed.
    """
    existing = known(db, account, server_uid)
    if existing is not None:
        path.unlink(missing_ok=True)
        return existing
    size = path.stat().st_size
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
                size,
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


def record_too_large(db: Database, account: str, server_uid: str, size: int) -> InboundMail:
    """Record a mail left on the server for its size, so that it is reported once, not every poll.

    Kind "other" and status :data:`TOO_LARGE`, no spool file (``spool_path``
    empty), ``size`` as the server reported it (or as far as it was read),
    and nothing left to do on the server.
    """
    with db.transaction() as conn:
        conn.execute(
            """INSERT OR IGNORE INTO inbound_mails (account, server_uid, message_id, size, spool_path, kind, status,
                   server_done, error, received_at)
               VALUES (?, ?, '', ?, '', ?, ?, 1, ?, ?)""",
            (account, server_uid, size, OTHER, TOO_LARGE, "over mailbox.max_message_size; left on the server", now()),
        )
    found = known(db, account, server_uid)
    assert found is not None
    return found


def forget(db: Database, mail_id: int) -> None:
    """Drop the record of a mail that was not stored (too large), so that it is fetched again."""
    with db.transaction() as conn:
        conn.execute("DELETE FROM inbound_mails WHERE id = ? AND status = ?", (mail_id, TOO_LARGE))


def mark_server_done(db: Database, mail_id: int) -> None:
    with db.transaction() as conn:
        conn.execute("UPDATE inbound_mails SET server_done = 1 WHERE id = ?", (mail_id,))


def pending_server_actions(db: Database, account: str) -> list[InboundMail]:
    """Mails stored here whose server copy was not yet moved, deleted or left (after a crash)."""
    rows = db.query(
        "SELECT * FROM inbound_mails WHERE account = ? AND server_done = 0 ORDER BY id", (account,)
    )
    return [_row(r) for r in rows]
