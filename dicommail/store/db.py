"""The embedded state database (SQLite in WAL mode) and its schema.

One file, ``state.db`` in the home directory, holds what a crash must not
forget: transfers and their mails on the sending side; fetched mails, set
parts, sets and forwarded instances on the receiving side.  The modules that
own a stage keep their SQL next to their logic; the schema lives here so it
can be read in one place.  Commits are synchronous (``synchronous=FULL``):
a row that says "stored" or "sent" is on disk before anyone acts on it.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from dicommail.errors import DicommailError

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE transfers (
    id            INTEGER PRIMARY KEY,
    set_id        TEXT NOT NULL UNIQUE,
    recipient     TEXT NOT NULL,
    study_uid     TEXT NOT NULL,
    files         INTEGER NOT NULL,
    bytes         INTEGER NOT NULL,
    set_total     INTEGER NOT NULL,
    status        TEXT NOT NULL,      -- queued, sending, sent, failed
    error         TEXT,
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    first_sent_at REAL,               -- first mail accepted by the SMTP server
    sent_at       REAL                -- last mail accepted
);

CREATE TABLE outbound_mails (
    id              INTEGER PRIMARY KEY,
    transfer_id     INTEGER NOT NULL REFERENCES transfers(id) ON DELETE CASCADE,
    set_part        INTEGER NOT NULL,
    fragment        INTEGER NOT NULL DEFAULT 0,
    fragments       INTEGER NOT NULL DEFAULT 0,
    message_id      TEXT NOT NULL,
    path            TEXT NOT NULL,
    size            INTEGER NOT NULL,
    status          TEXT NOT NULL,    -- queued, sent, failed
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error      TEXT,
    sent_at         REAL,
    UNIQUE (transfer_id, set_part, fragment)
);

CREATE TABLE inbound_mails (
    id              INTEGER PRIMARY KEY,
    account         TEXT NOT NULL,    -- e.g. imap://user@host:993/INBOX
    server_uid      TEXT NOT NULL,    -- IMAP "<uidvalidity>:<uid>", POP3 UIDL
    message_id      TEXT,
    size            INTEGER NOT NULL,
    spool_path      TEXT NOT NULL,
    kind            TEXT NOT NULL,    -- dicom-mail, fragment, other
    status          TEXT NOT NULL,    -- stored, processed, quarantined, other
    server_done     INTEGER NOT NULL DEFAULT 0,  -- moved/deleted/left on the server
    set_id          TEXT,
    set_part        INTEGER,
    fragment_id     TEXT,
    fragment_number INTEGER,
    fragment_total  INTEGER,
    error           TEXT,
    received_at     REAL NOT NULL,
    processed_at    REAL,
    UNIQUE (account, server_uid)
);

CREATE TABLE inbound_sets (
    set_id          TEXT PRIMARY KEY,
    sender          TEXT,
    signer          TEXT,
    set_total       INTEGER NOT NULL,
    study_uid       TEXT,
    status          TEXT NOT NULL,    -- collecting, complete, delivered, failed, expired
    error           TEXT,
    first_seen_at   REAL NOT NULL,
    updated_at      REAL NOT NULL,
    delivered_at    REAL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0
);

CREATE TABLE inbound_parts (
    set_id     TEXT NOT NULL,
    set_part   INTEGER NOT NULL,
    inbound_id INTEGER,
    directory  TEXT NOT NULL,         -- decoded files and part.json in the spool
    PRIMARY KEY (set_id, set_part)
);

CREATE TABLE forwarded_instances (
    set_id           TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    forwarded_at     REAL NOT NULL,
    PRIMARY KEY (set_id, sop_instance_uid)
);
"""


class StateError(DicommailError):
    code = "state"


class Database:
    """A connection to ``state.db``; safe to share between threads (one lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.execute("PRAGMA foreign_keys=ON")
            self._migrate()
        except sqlite3.DatabaseError as exc:
            raise StateError(
                f"cannot open the state database {path}: {exc}",
                "check the disk and the file's permissions; restore it from a backup if it is damaged",
            ) from exc
        self._lock = threading.RLock()

    def _migrate(self) -> None:
        version = self._conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            self._conn.executescript(f"BEGIN; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
        elif version > SCHEMA_VERSION:
            raise StateError(
                f"the state database was written by a newer dicommail (schema {version})",
                "upgrade dicommail on this machine",
            )

    def close(self) -> None:
        self._conn.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic, durable unit of work (``BEGIN IMMEDIATE`` … ``COMMIT``)."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def query(self, sql: str, params: tuple[object, ...] | dict[str, object] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, params).fetchall()


def now() -> float:
    return time.time()
