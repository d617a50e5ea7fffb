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

#: Tables added since schema 1 shipped, created where missing each time a
#: database is opened (so an existing state.db gains them without a migration).
ADDED_TABLES = """
-- The sending gateway (dicommail gateway): studies pushed by C-STORE.
CREATE TABLE IF NOT EXISTS gateway_studies (
    id               INTEGER PRIMARY KEY,
    route            TEXT NOT NULL,       -- the called AE title's route
    study_uid        TEXT NOT NULL,
    status           TEXT NOT NULL,       -- receiving, complete, packing, queued, sent, failed
    instances        INTEGER NOT NULL DEFAULT 0,
    bytes            INTEGER NOT NULL DEFAULT 0,
    calling_aet      TEXT NOT NULL,
    peer             TEXT NOT NULL,       -- IP address of the pushing node
    error            TEXT,
    first_received_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    completed_at     REAL,
    queued_at        REAL,
    updated_at       REAL NOT NULL
);
-- One study collects instances per route at a time; a later push opens a new one.
CREATE UNIQUE INDEX IF NOT EXISTS gateway_studies_receiving
    ON gateway_studies (route, study_uid) WHERE status = 'receiving';

CREATE TABLE IF NOT EXISTS gateway_instances (
    study_id         INTEGER NOT NULL REFERENCES gateway_studies(id) ON DELETE CASCADE,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid    TEXT NOT NULL,
    transfer_syntax  TEXT NOT NULL,
    path             TEXT NOT NULL,       -- the file as received, in the spool
    size             INTEGER NOT NULL,
    received_at      REAL NOT NULL,
    PRIMARY KEY (study_id, sop_instance_uid)
);

-- The set queued for each recipient of a study (recorded with queue_set's transaction).
CREATE TABLE IF NOT EXISTS gateway_transfers (
    study_id    INTEGER NOT NULL REFERENCES gateway_studies(id) ON DELETE CASCADE,
    recipient   TEXT NOT NULL,
    transfer_id INTEGER NOT NULL REFERENCES transfers(id),
    PRIMARY KEY (study_id, recipient)
);
"""

#: Acknowledgements and transfer tracking (also created where missing).
TRACKING_TABLES = """
-- Sending side: what the receiver reported about a transfer, and when.
CREATE TABLE IF NOT EXISTS transfer_tracking (
    transfer_id       INTEGER PRIMARY KEY REFERENCES transfers(id) ON DELETE CASCADE,
    images            INTEGER,            -- DICOM instances sent (local only)
    patient_name      TEXT,               -- local only, shown with --show-patient
    study_description TEXT,               -- local only, shown with --show-patient
    resends           INTEGER NOT NULL DEFAULT 0,  -- resend rounds after error reports
    reason            TEXT,               -- reason code of a failure or expiry
    finished_at       REAL,               -- final notification processed (sender's clock)
    transfer_seconds  REAL,               -- finished_at - transfers.first_sent_at
    final_report      TEXT                -- the receiver's status JSON
);

-- Sending side: every notification that arrived, acted on or ignored.
CREATE TABLE IF NOT EXISTS acknowledgements (
    id                  INTEGER PRIMARY KEY,
    inbound_id          INTEGER UNIQUE,   -- inbound_mails row: each mail is handled once
    transfer_id         INTEGER REFERENCES transfers(id) ON DELETE CASCADE,
    set_id              TEXT,
    set_part            INTEGER,          -- NULL: about the whole set
    scope               TEXT,             -- part, set
    outcome             TEXT,             -- success, warning, error, fatal
    disposition         TEXT,
    reason              TEXT,
    method              TEXT NOT NULL,    -- pgp, rfc
    signer              TEXT,             -- fingerprint (pgp)
    message_id          TEXT,
    original_message_id TEXT,
    accepted            INTEGER NOT NULL, -- 1: acted on; 0: ignored (see detail)
    detail              TEXT,
    received_at         REAL NOT NULL
);

-- Sending side: what happened to a transfer besides sending (resends, expiry, retry, cancel).
CREATE TABLE IF NOT EXISTS transfer_events (
    id          INTEGER PRIMARY KEY,
    transfer_id INTEGER NOT NULL REFERENCES transfers(id) ON DELETE CASCADE,
    at          REAL NOT NULL,
    event       TEXT NOT NULL,
    set_part    INTEGER,
    detail      TEXT
);

-- Receiving side: notifications to send back, one row per event and method (idempotent).
CREATE TABLE IF NOT EXISTS notifications (
    id                  INTEGER PRIMARY KEY,
    event               TEXT NOT NULL UNIQUE,
    set_id              TEXT NOT NULL,
    set_part            INTEGER,          -- NULL: about the whole set
    set_total           INTEGER,
    scope               TEXT NOT NULL,    -- part, set
    outcome             TEXT NOT NULL,    -- success, warning, error, fatal
    reason              TEXT,
    missing_parts       TEXT,             -- JSON list (parts missing after the timeout)
    report              TEXT,             -- the status JSON (set scope)
    recipient           TEXT,             -- NULL while held: no verified signer known yet
    method              TEXT,             -- pgp, rfc (NULL while held)
    original_message_id TEXT,
    message_id          TEXT NOT NULL,
    path                TEXT,             -- the built mail in the spool
    status              TEXT NOT NULL,    -- held, pending, sent, failed, superseded
    attempts            INTEGER NOT NULL DEFAULT 0,
    next_attempt_at     REAL NOT NULL DEFAULT 0,
    last_error          TEXT,
    created_at          REAL NOT NULL,
    sent_at             REAL
);

-- Receiving side: per-set times the final notification reports.
CREATE TABLE IF NOT EXISTS set_tracking (
    set_id              TEXT PRIMARY KEY,
    verified_at         REAL,
    missing_reported_at REAL              -- parts-missing report sent; the set waits once more
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
        self._conn.executescript(ADDED_TABLES)
        self._conn.executescript(TRACKING_TABLES)

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
