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

from dicommail.errors import StateError
from dicommail.store.files import make_private

SCHEMA_VERSION = 2

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
    set_ref         INTEGER,          -- inbound_sets.id once the mail's part was verified
    UNIQUE (account, server_uid)
);

CREATE TABLE inbound_sets (
    id              INTEGER PRIMARY KEY,
    set_id          TEXT NOT NULL,    -- X-TELEMEDICINE-SETID as the sender wrote it
    signer          TEXT NOT NULL,    -- fingerprint of the certified key that signed it
    sender          TEXT,
    set_total       INTEGER NOT NULL,
    study_uid       TEXT,
    status          TEXT NOT NULL,    -- collecting, complete, delivered, failed, expired
    error           TEXT,
    first_seen_at   REAL NOT NULL,
    updated_at      REAL NOT NULL,
    delivered_at    REAL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    emergency       INTEGER NOT NULL DEFAULT 0,  -- marked EMERGENCY by the sender (forwarded progressively)
    -- A set belongs to its signer: another peer reusing the ID makes another set.
    UNIQUE (signer, set_id)
);

CREATE TABLE inbound_parts (
    set_ref    INTEGER NOT NULL REFERENCES inbound_sets(id) ON DELETE CASCADE,
    set_part   INTEGER NOT NULL,
    inbound_id INTEGER,
    directory  TEXT NOT NULL,         -- decoded files and part.json in the spool
    forwarded_at REAL,                -- its instances went on ahead of the set (progressive forwarding)
    PRIMARY KEY (set_ref, set_part)
);

CREATE TABLE forwarded_instances (
    set_ref          INTEGER NOT NULL REFERENCES inbound_sets(id) ON DELETE CASCADE,
    sop_instance_uid TEXT NOT NULL,
    state            TEXT NOT NULL DEFAULT 'stored',  -- sending (C-STORE under way), stored (accepted)
    forwarded_at     REAL NOT NULL,
    PRIMARY KEY (set_ref, sop_instance_uid)
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
    sha256           TEXT,                -- of the data set as received (NULL: stored before it was recorded)
    PRIMARY KEY (study_id, sop_instance_uid)
);
-- A PACS repeating a C-STORE whose answer a crash lost is recognised by UID and content.
CREATE INDEX IF NOT EXISTS gateway_instances_sop ON gateway_instances (sop_instance_uid);

-- The set queued for each recipient of a study (recorded with queue_set's transaction).
CREATE TABLE IF NOT EXISTS gateway_transfers (
    study_id    INTEGER NOT NULL REFERENCES gateway_studies(id) ON DELETE CASCADE,
    recipient   TEXT NOT NULL,
    transfer_id INTEGER NOT NULL REFERENCES transfers(id),
    PRIMARY KEY (study_id, recipient)
);
"""

#: Columns added to the tables above since they first shipped: (table, column, declaration).
ADDED_COLUMNS = (
    ("gateway_instances", "sha256", "TEXT"),
    ("inbound_sets", "emergency", "INTEGER NOT NULL DEFAULT 0"),
    ("inbound_parts", "forwarded_at", "REAL"),
)


def add_missing_columns(conn: sqlite3.Connection) -> None:
    """Give an existing database the columns of :data:`ADDED_COLUMNS` it lacks (after ADDED_TABLES ran)."""
    for table, column, declaration in ADDED_COLUMNS:
        present = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
        if present and column not in present:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")


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
    set_id              TEXT NOT NULL,    -- as on the wire
    set_ref             INTEGER,          -- inbound_sets.id (NULL while held: no verified signer yet)
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
    set_ref             INTEGER PRIMARY KEY REFERENCES inbound_sets(id) ON DELETE CASCADE,
    verified_at         REAL,
    missing_reported_at REAL              -- parts-missing report sent; the set waits once more
);

-- Receiving side: message/partial fragments are grouped by (sender, id) until one
-- combination of candidates reassembles and verifies; tried_upto avoids retrying
-- the same candidates every cycle.
CREATE TABLE IF NOT EXISTS fragment_groups (
    sender        TEXT NOT NULL,
    fragment_id   TEXT NOT NULL,
    tried_upto    INTEGER NOT NULL DEFAULT 0,   -- highest inbound_mails.id already tried
    last_error    TEXT,
    PRIMARY KEY (sender, fragment_id)
);
"""

#: DIN 6868-159 constancy checks, sending side (also created where missing).  Kept for
#: ``constancy.retention_years``, independently of the transfers: a deleted transfer
#: leaves its check's record (transfer_id becomes NULL).
CONSTANCY_TABLES = """
CREATE TABLE IF NOT EXISTS constancy_checks (
    id               INTEGER PRIMARY KEY,
    kind             TEXT NOT NULL,       -- daily, monthly, acceptance
    peer             TEXT NOT NULL,       -- the receiver's mail address
    attempt          INTEGER NOT NULL,    -- 1, or 2 for the retry of a failed daily check
    mark_id          TEXT NOT NULL UNIQUE, -- the check ID in the mark on the wire
    transfer_id      INTEGER REFERENCES transfers(id) ON DELETE SET NULL,
    set_id           TEXT,
    images           INTEGER,             -- DICOM instances of the test set
    bytes            INTEGER,             -- their size
    started_at       REAL NOT NULL,
    finished_at      REAL,                -- result known (receipt, or failure)
    receipt_at       REAL,                -- the receipt was processed (sender's clock)
    transfer_time_s  REAL,                -- receipt_at - transfers.first_sent_at
    limit_s          INTEGER NOT NULL,
    complete         INTEGER,             -- 0/1; NULL: not known (yet)
    headers_ok       INTEGER,             -- 0/1; NULL: not checked by the receiver
    quality_ok       INTEGER,             -- 0/1; NULL: not checked by the receiver
    result           TEXT NOT NULL,       -- passed, failed, pending
    reason           TEXT,
    receiver_checked INTEGER              -- 1: the receiver knew the mark; 0: ordinary acknowledgements only
);
CREATE INDEX IF NOT EXISTS constancy_checks_transfer ON constancy_checks (transfer_id);
CREATE INDEX IF NOT EXISTS constancy_checks_started ON constancy_checks (started_at);
"""

#: Schema 1 keyed received sets by their set ID alone; schema 2 by (signer, set ID).
_MIGRATE_1_TO_2 = """
ALTER TABLE inbound_sets RENAME TO inbound_sets_v1;
ALTER TABLE inbound_parts RENAME TO inbound_parts_v1;
ALTER TABLE forwarded_instances RENAME TO forwarded_instances_v1;
{sets_parts_forwarded}
INSERT INTO inbound_sets (set_id, signer, sender, set_total, study_uid, status, error, first_seen_at, updated_at,
                          delivered_at, attempts, next_attempt_at)
    SELECT set_id, COALESCE(signer, ''), sender, set_total, study_uid, status, error, first_seen_at, updated_at,
           delivered_at, attempts, next_attempt_at FROM inbound_sets_v1;
INSERT INTO inbound_parts (set_ref, set_part, inbound_id, directory)
    SELECT s.id, p.set_part, p.inbound_id, p.directory FROM inbound_parts_v1 p JOIN inbound_sets s USING (set_id);
INSERT INTO forwarded_instances (set_ref, sop_instance_uid, state, forwarded_at)
    SELECT s.id, f.sop_instance_uid, 'stored', f.forwarded_at
    FROM forwarded_instances_v1 f JOIN inbound_sets s USING (set_id);
ALTER TABLE inbound_mails ADD COLUMN set_ref INTEGER;
UPDATE inbound_mails SET set_ref = (SELECT id FROM inbound_sets s WHERE s.set_id = inbound_mails.set_id)
    WHERE set_id IS NOT NULL AND status = 'processed';
DROP TABLE inbound_sets_v1;
DROP TABLE inbound_parts_v1;
DROP TABLE forwarded_instances_v1;
"""

_MIGRATE_TRACKING_1_TO_2 = """
ALTER TABLE notifications ADD COLUMN set_ref INTEGER;
UPDATE notifications SET set_ref = (SELECT id FROM inbound_sets s WHERE s.set_id = notifications.set_id)
    WHERE status != 'held';
ALTER TABLE set_tracking RENAME TO set_tracking_v1;
CREATE TABLE set_tracking (
    set_ref             INTEGER PRIMARY KEY REFERENCES inbound_sets(id) ON DELETE CASCADE,
    verified_at         REAL,
    missing_reported_at REAL
);
INSERT INTO set_tracking (set_ref, verified_at, missing_reported_at)
    SELECT s.id, t.verified_at, t.missing_reported_at FROM set_tracking_v1 t JOIN inbound_sets s USING (set_id);
DROP TABLE set_tracking_v1;
"""


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
            for suffix in ("", "-wal", "-shm"):  # patient and study details: this site's eyes only
                make_private(path.with_name(path.name + suffix))
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
        elif version == 1:
            self._migrate_from_1()
        elif version > SCHEMA_VERSION:
            raise StateError(
                f"the state database was written by a newer dicommail (schema {version})",
                "upgrade dicommail on this machine",
            )
        self._conn.executescript(ADDED_TABLES)
        add_missing_columns(self._conn)
        self._conn.executescript(TRACKING_TABLES)
        self._conn.executescript(CONSTANCY_TABLES)

    def _migrate_from_1(self) -> None:
        start = SCHEMA.index("CREATE TABLE inbound_sets (")
        end = SCHEMA.index("CREATE TABLE forwarded_instances (")
        end = SCHEMA.index(");", end) + 2
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        script = _MIGRATE_1_TO_2.format(sets_parts_forwarded=SCHEMA[start:end])
        if "notifications" in tables and "set_tracking" in tables:
            script += _MIGRATE_TRACKING_1_TO_2
        self._conn.executescript(f"BEGIN; {script} PRAGMA user_version = 2; COMMIT;")

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
