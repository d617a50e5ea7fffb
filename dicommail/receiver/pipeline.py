"""From stored mails to forwarded studies, one durable step at a time.

Each step reads its input from the state database and the spool, and records
its result in one transaction after its files are in place; a crash between
steps repeats at most the interrupted step, and every step tolerates being
repeated (a part that exists already, an instance already forwarded).

    stored mail --(join fragments)--> whole mail --(decrypt, check signer)-->
    set part --(all parts there, manifest checks)--> complete set
    --(destination)--> delivered set

With progressive forwarding (``receiver.forward``, by default for emergency
sets) each verified part's instances also go to the destination while the
set is still collecting; the set is still checked, delivered and
acknowledged as a whole, and instances already stored are not sent again.

Every mail is hostile until verified.  Whatever goes wrong with one item (a
mail, a fragment group, a set, an instance), whatever the exception, ends
with that item quarantined with its reason and its plaintext removed; the
next item is processed as usual.  Only failures of the machine itself (disk
full, the state database locked or damaged) stop a round, and the round is
repeated next cycle.

A set belongs to its signer: sets are keyed by (signer fingerprint, set ID),
so a certified peer that reuses another peer's set ID makes a set of its own.
"""

from __future__ import annotations

import contextlib
import email.utils
import errno
import hashlib
import json
import logging
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict
from datetime import datetime
from functools import partial
from itertools import chain, product
from pathlib import Path
from typing import Any, Protocol, TypeVar

from dicommail.constancy.values import ConstancyMark, compare
from dicommail.crypto.gpg import Keyring, Verification
from dicommail.crypto.keys import find_key
from dicommail.dicom import DicomFile
from dicommail.errors import (
    ConfigError,
    DestinationError,
    DicommailError,
    IncompleteSetError,
    MisaddressedError,
    PassphraseError,
    StateError,
    UnexpectedError,
    WireFormatError,
)
from dicommail.receiver.inbox import DICOM_MAIL, FRAGMENT, REPORT
from dicommail.receiver.notify import Notifier, iso
from dicommail.receiver.spool import Spool
from dicommail.store.db import Database, now
from dicommail.store.files import atomic_writer, fsync_dir
from dicommail.wire.manifest import Manifest
from dicommail.wire.notifications import ReceivedReport, open_report
from dicommail.wire.partial import FragmentInfo, format_ranges, join_fragments
from dicommail.wire.unpack import (
    ReceivedFile,
    ReceivedPart,
    VerifiedSet,
    open_mail,
    read_envelope,
    verify_part,
    verify_set,
)

log = logging.getLogger("dicommail.receiver")

T = TypeVar("T")

#: Backoff between forwarding attempts: doubles up to this many seconds.
MAX_BACKOFF = 1800.0
#: Most "<keyword> (instance <n>)" entries a constancy receipt lists (the peer's parser accepts no more).
MAX_MISMATCHED = 1000
#: Combinations of fragment candidates tried per group and cycle (forged duplicates make more).
MAX_FRAGMENT_COMBINATIONS = 16
#: Combinations looked at (tried or skipped as tried before) in one round: a bound on its work.
MAX_FRAGMENT_LOOKS = 4096
#: ``receiver.forward`` values: the whole verified set at once, or each verified part as it comes.
FORWARD_COMPLETE = "complete"
FORWARD_PROGRESSIVE = "progressive"
#: errno values that mean the machine, not the mail, is at fault: the round stops and is repeated.
_MACHINE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS, errno.ENOMEM, errno.EMFILE,
                             errno.ENFILE})


class Destination(Protocol):
    """Where verified studies go (the PACS, or a folder)."""

    def deliver(
        self,
        verified: VerifiedSet,
        done: set[str],
        on_stored: Callable[[str], None],
        on_sending: Callable[[str], None] | None = None,
    ) -> None:
        """Deliver the DICOM files of ``verified`` whose SOP Instance UID is not in ``done``.

        Calls ``on_sending(uid)`` right before an instance goes out and
        ``on_stored(uid)`` after the destination accepted it, so that a rerun
        neither loses nor repeats it.  Raises :class:`DestinationError`
        (``temporary`` or not) on failure.
        """
        ...

    def has_instance(self, study_uid: str, series_uid: str | None, sop_instance_uid: str) -> bool | None:
        """Whether the destination holds the instance already; ``None`` if it cannot tell."""
        ...


class ReportHandler(Protocol):
    """Where notifications (acknowledgements) that arrive go: the sending side's tracking."""

    def on_report(self, mail_id: int, received: ReceivedReport) -> None:
        """Act on (or ignore) one notification; must be idempotent per ``mail_id``."""
        ...


def is_machine_failure(exc: BaseException) -> bool:
    """True for failures of this site (disk full, database locked, a wrong passphrase), not of one item.

    They stop the round, which is repeated next cycle: quarantining every
    mail because our own passphrase file is wrong would cost studies.
    """
    if isinstance(exc, PassphraseError | ConfigError):
        return True
    if isinstance(exc, OSError):
        return exc.errno in _MACHINE_ERRNOS
    return isinstance(exc, sqlite3.OperationalError | sqlite3.DatabaseError | StateError) and not isinstance(
        exc, sqlite3.IntegrityError
    )


def as_item_error(exc: BaseException) -> DicommailError:
    """The error an item is quarantined with: dicommail's own, or a generic one naming only the exception type.

    The text of a foreign exception may quote content from the mail (a file
    name, a DICOM value), so it goes into the private quarantine record only.
    """
    if isinstance(exc, DicommailError):
        return exc
    error = UnexpectedError(
        f"processing failed unexpectedly ({type(exc).__name__})",
        "the item is kept in the quarantine; report it to the dicommail maintainers if it recurs",
    )
    error.detail = f"{type(exc).__name__}: {str(exc)[:2000]}"
    return error


def set_key(signer: str, set_id: str) -> str:
    """The spool directory name of one signer's set: path-safe whatever the set ID holds."""
    return hashlib.sha256(f"{signer}\0{set_id}".encode()).hexdigest()[:32]


#: The stages as the log and ``receive --once`` name them.
_STAGE_NAMES = {
    "recover": "tidying up after a restart",
    "process_stored": "decrypting fetched mail",
    "complete_sets": "completing sets",
    "expire_sets": "expiring incomplete sets",
    "expire_fragments": "expiring incomplete fragments",
    "expire_quarantine": "removing old quarantine",
    "forward_parts": "forwarding verified parts",
    "forward_ready": "forwarding complete sets",
}


def _distinct_fragments(members: list[Any]) -> list[Any]:
    """The fragments of a group without byte-identical copies (a resend, a mail server's duplicate).

    Copies would multiply the combinations to try without adding one that could verify.
    """
    seen: set[tuple[int, str]] = set()
    distinct = []
    for member in sorted(members, key=lambda m: m["id"]):
        try:
            with Path(member["spool_path"]).open("rb") as handle:  # a mail each: hashed in chunks, not read whole
                digest = hashlib.file_digest(handle, "sha256").hexdigest()
        except OSError:
            digest = f"unreadable-{member['id']}"  # tried as it is: opening it says what is wrong
        if (member["fragment_number"], digest) not in seen:
            seen.add((member["fragment_number"], digest))
            distinct.append(member)
    return distinct


def _fragment_combinations(choices: list[list[Any]], tried_before: int) -> Iterator[tuple[Any, ...]]:
    """At most :data:`MAX_FRAGMENT_COMBINATIONS` ways to pick one candidate per fragment number.

    Only combinations with a fragment newer than ``tried_before`` (the last
    round's newest) are new.  The fragments of one mail arrive together, so
    each copy of fragment 1, newest first, anchors the combination of the
    copies that came right after it, then each candidate the combination
    nearest to it in arrival: the genuine mail is found whether forgeries came
    before it, after it or both.  Then other combinations, newest first; the
    work of a round is bounded however many candidates there are.
    """
    newest_first = [sorted(candidates, key=lambda m: -m["id"]) for candidates in choices]

    def after(at: int) -> tuple[Any, ...]:
        # For each number the first copy that came at or after ``at`` (else the nearest before it).
        return tuple(min((m for m in candidates if m["id"] >= at), key=lambda m: m["id"],
                         default=min(candidates, key=lambda m: at - m["id"])) for candidates in newest_first)

    def nearest(at: int) -> tuple[Any, ...]:
        return tuple(min(candidates, key=lambda m: (abs(m["id"] - at), -m["id"])) for candidates in newest_first)

    # Anchored on each copy of the first fragment (a mail's wave starts with it, as a rule),
    # then on every copy of any number: the waves of the genuine mail and of forgeries.
    firsts = [m["id"] for m in newest_first[0]]
    anchors = sorted({m["id"] for candidates in choices for m in candidates}, reverse=True)
    by_time = chain((after(at) for at in firsts), (nearest(at) for at in anchors))
    seen: set[tuple[int, ...]] = set()
    yielded = looked = 0
    for combination in chain(by_time, product(*newest_first)):
        looked += 1
        if looked > MAX_FRAGMENT_LOOKS:
            return
        key = tuple(m["id"] for m in combination)
        if key in seen or max(key) <= tried_before:
            continue
        seen.add(key)
        yield combination
        yielded += 1
        if yielded >= MAX_FRAGMENT_COMBINATIONS:
            return


class Pipeline:
    def __init__(
        self,
        db: Database,
        spool: Spool,
        keyring: Keyring,
        destination: Destination,
        *,
        max_output: int,
        passphrase: str | None = None,
        set_timeout: float = 86400.0,
        retry_interval: float = 60.0,
        retry_limit: int = 0,
        crash_hook: Callable[[str], None] | None = None,
        notifier: Notifier | None = None,
        report_handler: ReportHandler | None = None,
        own_addresses: Iterable[str] = (),
        quarantine_days: float = 30.0,
        in_flight_check: bool = True,
        test_destination: Destination | None = None,
        forward: str = FORWARD_COMPLETE,
        forward_emergency: str = FORWARD_PROGRESSIVE,
    ) -> None:
        self.db = db
        # Acknowledgements back to senders (None: none are recorded), and notifications that arrive here.
        self.notifier = notifier
        self.report_handler = report_handler
        self.spool = spool
        self.keyring = keyring
        self.destination = destination
        #: Where constancy check test sets go instead of ``destination`` (``None``: nowhere, they are discarded).
        self.test_destination = test_destination
        self.max_output = max_output
        self.passphrase = passphrase
        self.set_timeout = set_timeout
        self.retry_interval = retry_interval
        self.retry_limit = retry_limit
        #: This site's addresses: a set whose signed inner To names none of them was meant for someone else.
        self.own_addresses = frozenset(a.lower() for a in own_addresses if a)
        self.quarantine_days = quarantine_days
        self.in_flight_check = in_flight_check
        self.forward = forward
        self.forward_emergency = forward_emergency
        # Fault-injection point for the crash tests: called with a step name.
        self._crash_hook = crash_hook or (lambda _step: None)
        self._recovered = False
        #: Asked between items: a daemon that is stopping finishes the current mail, part or set only.
        self.should_stop: Callable[[], bool] = lambda: False
        self._forward_attempts = 0  # parts and sets tried (delivered, failed or put off)
        #: Stages that stopped for a reason outside any one mail (see :meth:`take_stage_errors`).
        self.stage_errors: list[DicommailError] = []
        self._errors_lock = threading.Lock()  # intake and forwarding run in two threads
        #: Called (from the intake thread) when a part or set is ready to forward: the daemon starts forwarding.
        self.on_ready: Callable[[], None] = lambda: None

    def run_once(self) -> None:
        """Do all work that is ready: decrypt stored mails, complete sets, forward, expire.

        A failure of the machine (disk full, database locked) stops this round
        but loses nothing: the interrupted step is repeated next time.
        """
        self.run_intake()
        self.run_forwarding()

    def run_intake(self) -> None:
        """Everything but forwarding: decrypt stored mails, complete sets, expire.

        The daemon runs :meth:`run_forwarding` beside it in a second thread, so
        that the next mails are fetched and decrypted while the PACS takes the
        first ones.  Both share the database (its lock serialises them) and
        touch different rows: intake makes parts and sets, forwarding sends
        them on; neither removes what the other is working on, except a
        failed or expired set, which stays failed (see :meth:`_fail_set`).
        """
        # A stop between stages or mails loses nothing: each leaves the database consistent, and
        # what is left is the next start's work (a backlog of large mails takes minutes, longer
        # than systemd waits before it kills the unit).
        self._run_stages((self.recover, self.process_stored, self.complete_sets, self.expire_sets,
                          self.expire_fragments, self.expire_quarantine))

    def run_forwarding(self) -> bool:
        """Send verified parts (progressive) and complete sets to the destination; True if it tried any."""
        before = self._forward_attempts
        self._run_stages((self.forward_parts, self.forward_ready))
        return self._forward_attempts != before

    def _run_stages(self, stages: tuple[Callable[[], None], ...]) -> None:
        for stage in stages:
            if self.should_stop():
                return
            what = _STAGE_NAMES.get(stage.__name__, stage.__name__.replace("_", " "))
            try:
                stage()
            except OSError as exc:
                log.error("%s stopped: %s%s; it is retried in the next cycle", what,
                          exc.strerror or exc, f" ({exc.filename})" if exc.filename else "")
                self._stopped(StateError(f"{what} stopped: {exc.strerror or exc}",
                                         "check the spool's disk; retried in the next cycle"))
                return
            except (sqlite3.Error, StateError) as exc:
                log.error("%s stopped: state database error %s; it is retried in the next cycle", what, exc)
                self._stopped(StateError(f"{what} stopped: state database error {exc}",
                                         "retried in the next cycle"))
                return
            except (PassphraseError, ConfigError) as exc:
                log.error("%s stopped: %s (%s); mails wait and are retried in the next cycle", what,
                          exc.message, exc.hint)
                self._stopped(exc)
                return
            except Exception as exc:
                # A fault outside any one item (a bug): the other stages still run, the daemon lives on.
                log.error("%s failed unexpectedly (%s); it is retried in the next cycle", what,
                          type(exc).__name__)
                log.debug("%s failed", what, exc_info=exc)
                self._stopped(StateError(f"{what} failed unexpectedly ({type(exc).__name__})",
                                         "see the log; retried in the next cycle"))

    def _stopped(self, error: DicommailError) -> None:
        with self._errors_lock:
            self.stage_errors.append(error)

    def take_stage_errors(self) -> list[DicommailError]:
        """The stages that stopped since the last call (a wrong passphrase, a full disk): ``receive --once`` fails."""
        with self._errors_lock:
            errors, self.stage_errors = self.stage_errors, []
        return errors

    def _guarded(self, action: Callable[[], T], on_error: Callable[[DicommailError], None], what: str) -> T | None:
        """Run one item's step, returning its result; any failure but the machine's quarantines the item
        (through ``on_error``) and returns ``None``."""
        try:
            return action()
        except Exception as exc:
            if is_machine_failure(exc):
                raise
            error = as_item_error(exc)
            if not isinstance(exc, DicommailError):
                log.debug("%s failed", what, exc_info=exc)
            on_error(error)
            return None

    # -- restart: orphans of a crash ---------------------------------------------------------

    def recover(self) -> None:
        """Once per process: remove what a crash left (work directories, temporary files, loose parts).

        Work directories hold decrypted DICOM: patient data must not stay in
        plaintext where nothing will ever process it.
        """
        if self._recovered:
            return
        removed = self.spool.sweep_orphans()
        known = {r["directory"] for r in self.db.query("SELECT directory FROM inbound_parts")}
        for set_dir in list(self.spool.parts.iterdir()):
            if not set_dir.is_dir():
                continue
            for part_dir in list(set_dir.iterdir()):
                if str(part_dir) not in known:
                    shutil.rmtree(part_dir, ignore_errors=True)
                    removed += 1
            if not any(set_dir.iterdir()):
                set_dir.rmdir()
        if removed:
            log.info("removed %d item(s) a crash left in the spool", removed)
        self._recovered = True

    # -- stored mails -> parts -----------------------------------------------------

    def process_stored(self) -> None:
        rows = self.db.query(
            "SELECT * FROM inbound_mails WHERE status = 'stored' AND kind IN (?, ?) ORDER BY id", (DICOM_MAIL, FRAGMENT)
        )
        fragments: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            if self.should_stop():
                return
            if row["kind"] == FRAGMENT:
                self._guarded(partial(self._group_fragment, row, fragments), partial(self._quarantine_mails, [row]),
                              f"mail {row['id']}")
                continue
            self._guarded(partial(self._open, Path(row["spool_path"]), [row]), partial(self._quarantine_mails, [row]),
                          f"mail {row['id']}")
        for (sender, fragment_id), members in fragments.items():
            if self.should_stop():
                return
            self._guarded(partial(self._join, sender, fragment_id, members), partial(self._quarantine_mails, members),
                          f"fragments of mail {members[0]['id']}")
        if self.report_handler is not None:
            for row in self.db.query(
                "SELECT * FROM inbound_mails WHERE status = 'stored' AND kind = ? ORDER BY id", (REPORT,)
            ):
                if self.should_stop():
                    return
                self._guarded(partial(self._report, row), partial(self._quarantine_mails, [row]), f"mail {row['id']}")

    def _group_fragment(self, row: Any, groups: dict[tuple[str, str], list[Any]]) -> None:
        if row["fragment_id"] is None:
            raise WireFormatError("a message/partial fragment with a malformed header")
        # Fragments are unauthenticated: two senders may use the same id (a TeWePo id is a
        # millisecond timestamp), so they are grouped by the (unverified) sender address too.
        sender = read_envelope(Path(row["spool_path"])).sender_address
        groups.setdefault((sender, row["fragment_id"]), []).append(row)

    def _report(self, row: Any) -> None:
        """A notification: decrypt and check it (PGP/MIME) or parse it (plain MDN), then hand it on."""
        assert self.report_handler is not None
        work = self.spool.work / uuid.uuid4().hex
        try:
            received = open_report(Path(row["spool_path"]), self.keyring, work, passphrase=self.passphrase)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        self.report_handler.on_report(row["id"], received)
        with self.db.transaction() as conn:
            conn.execute("UPDATE inbound_mails SET status = 'processed', processed_at = ?, set_id = ? WHERE id = ?",
                         (now(), received.notification.set_id[:128] or None, row["id"]))

    def _join(self, sender: str, fragment_id: str, members: list[Any]) -> None:
        """Reassemble one group of fragments; forged candidates must not block the genuine mail.

        Each number may have several candidates (a forgery, a resend).  The
        combinations are tried until one reassembles, decrypts and verifies;
        the group waits for more fragments (or expires) if none does.
        """
        group = self.db.query("SELECT * FROM fragment_groups WHERE sender = ? AND fragment_id = ?",
                              (sender, fragment_id))
        newest = max(m["id"] for m in members)
        tried_before = int(group[0]["tried_upto"]) if group else 0
        if tried_before >= newest:
            return  # these candidates failed before; wait for new ones
        by_number: dict[int, list[Any]] = {}
        for member in _distinct_fragments(members):
            by_number.setdefault(member["fragment_number"], []).append(member)
        totals = sorted({m["fragment_total"] for m in members if m["fragment_total"]})
        last_error: DicommailError | None = None
        tried = complete = False
        for total in totals:
            if any(n not in by_number for n in range(1, total + 1)):
                continue
            complete = True
            choices = [by_number[n] for n in range(1, total + 1)]
            for combination in _fragment_combinations(choices, tried_before):
                if self.should_stop():
                    return
                tried = True
                error = self._try_fragments(fragment_id, list(combination))
                if error is None:
                    used = {m["id"] for m in combination}
                    self._discard_candidates([m for m in members if m["id"] not in used])
                    with self.db.transaction() as conn:
                        conn.execute("DELETE FROM fragment_groups WHERE sender = ? AND fragment_id = ?",
                                     (sender, fragment_id))
                    return
                last_error = error
        if not tried:
            if complete:  # nothing new to try (a byte-identical copy, say): not looked at again
                with self.db.transaction() as conn:
                    conn.execute("INSERT INTO fragment_groups (sender, fragment_id, tried_upto, last_error) "
                                 "VALUES (?, ?, ?, '') ON CONFLICT (sender, fragment_id) DO UPDATE SET "
                                 "tried_upto = excluded.tried_upto", (sender, fragment_id, newest))
            return  # wait for the rest; expiry reports it if it never comes
        assert last_error is not None
        with self.db.transaction() as conn:
            conn.execute(
                "INSERT INTO fragment_groups (sender, fragment_id, tried_upto, last_error) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (sender, fragment_id) DO UPDATE SET tried_upto = excluded.tried_upto, "
                "last_error = excluded.last_error",
                (sender, fragment_id, newest, f"{last_error.code}: {last_error.message}"),
            )
        log.warning("fragments of mail %d did not reassemble into a verified mail (%s); waiting for more "
                    "fragments until they expire", members[0]["id"], last_error.message)

    def _try_fragments(self, fragment_id: str, chosen: list[Any]) -> DicommailError | None:
        """Join and open one combination of fragments; the error if it does not verify."""
        joined = self.spool.work / f"joined-{uuid.uuid4().hex}.eml"
        try:
            join_fragments(
                [(FragmentInfo(fragment_id, m["fragment_number"], m["fragment_total"]), Path(m["spool_path"]))
                 for m in chosen],
                joined,
            )
            self._open(joined, chosen)
        except Exception as exc:
            if is_machine_failure(exc):
                raise
            return as_item_error(exc)
        finally:
            joined.unlink(missing_ok=True)
        log.info("joined %d fragments of one mail", len(chosen))
        return None

    def _discard_candidates(self, rows: list[Any]) -> None:
        """Fragments of a group that reassembled without them: forgeries or duplicates."""
        if not rows:
            return
        self._quarantine_mails(rows, WireFormatError(
            "a message/partial fragment was not needed: the mail reassembled and verified without it",
            "nothing to do unless it recurs: it is a duplicate or a forgery",
        ), notify=False)

    def _open(self, path: Path, rows: list[Any]) -> None:
        """Decrypt, verify and decode one whole mail; record it as a part of its signer's set."""
        work = self.spool.work / uuid.uuid4().hex
        try:
            part = open_mail(path, self.keyring, work, max_output=self.max_output, passphrase=self.passphrase)
            self._check_recipient(part)
            self._crash_hook("after-decrypt")
            self._store_part(part, work, rows)
        finally:
            # Decrypted files stay only inside the part directory a committed row points to.
            shutil.rmtree(work, ignore_errors=True)

    def _check_recipient(self, part: ReceivedPart) -> None:
        if part.recipients is None or not self.own_addresses:
            return
        if not self.own_addresses.intersection(part.recipients):
            raise MisaddressedError(
                f"set {part.set_id} part {part.set_part} was signed for another recipient, not for this site",
                "someone re-encrypted another site's set to us; nothing is forwarded or acknowledged",
            )

    def _store_part(self, part: ReceivedPart, work: Path, rows: list[Any]) -> None:
        signer = part.signer.fingerprint
        existing = self.db.query(
            "SELECT 1 FROM inbound_parts p JOIN inbound_sets s ON s.id = p.set_ref "
            "WHERE s.signer = ? AND s.set_id = ? AND p.set_part = ?",
            (signer, part.set_id, part.set_part),
        )
        target = self.spool.part_dir(set_key(signer, part.set_id), part.set_part)
        if existing:
            log.info("set %s part %d arrived again; the duplicate is ignored", part.set_id, part.set_part)
        else:
            _save_part(part, work)
            if target.exists():  # left by a crash before the database row was written
                shutil.rmtree(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            work.rename(target)
            fsync_dir(target.parent)
        reply_to = self._reply_address(part)
        with self.db.transaction() as conn:
            conn.execute(
                """INSERT INTO inbound_sets (set_id, signer, sender, set_total, study_uid, status,
                       first_seen_at, updated_at, emergency) VALUES (?, ?, ?, ?, ?, 'collecting', ?, ?, ?)
                   ON CONFLICT (signer, set_id) DO UPDATE SET updated_at = excluded.updated_at,
                       emergency = MAX(emergency, excluded.emergency)""",
                (part.set_id, signer, reply_to, part.set_total, part.study_uid, now(), now(), int(part.emergency)),
            )
            set_ref = conn.execute("SELECT id FROM inbound_sets WHERE signer = ? AND set_id = ?",
                                   (signer, part.set_id)).fetchone()[0]
            if not existing:
                conn.execute(
                    "INSERT INTO inbound_parts (set_ref, set_part, inbound_id, directory) VALUES (?, ?, ?, ?)",
                    (set_ref, part.set_part, rows[0]["id"], str(target)),
                )
                if self.notifier is not None:
                    self.notifier.on_part_verified(conn, part, set_ref, reply_to)
            for row in rows:
                conn.execute(
                    "UPDATE inbound_mails SET status = 'processed', processed_at = ?, set_id = ?, set_part = ?, "
                    "set_ref = ? WHERE id = ?",
                    (now(), part.set_id, part.set_part, set_ref, row["id"]),
                )
        log.info("set %s: part %d of %d verified (signer %s)", part.set_id, part.set_part, part.set_total, signer)
        self.on_ready()

    def _reply_address(self, part: ReceivedPart) -> str | None:
        """Where acknowledgements go: a certified user ID of the signing key, never a header.

        The key's primary user ID may have been added after we certified the
        key; only user IDs with full validity count.
        """
        try:
            key = find_key(self.keyring, part.signer.fingerprint)
        except DicommailError:
            return None
        certified = [_address_of(u) for u in key.certified_user_ids]
        certified = [a for a in certified if a]
        if not certified:
            return None
        primary = _address_of(part.signer.user_id)
        return primary if primary in certified else certified[0]

    def _quarantine_mails(self, rows: list[Any], error: DicommailError, *, notify: bool = True) -> None:
        """Keep the mails as they arrived (encrypted) with the reason; mark them, once and for all."""
        # inbound_ids: what ``dicommail quarantine retry`` stores again.
        details: dict[str, object] = {"mails": [r["server_uid"] for r in rows], "account": rows[0]["account"],
                                      "inbound_ids": [r["id"] for r in rows]}
        detail = getattr(error, "detail", None)
        if detail:
            details["detail"] = detail
        try:
            place: Path | str = self.spool.quarantine_files(
                [Path(r["spool_path"]) for r in rows], error, f"mail-{rows[0]['id']}", details
            )
        except OSError as exc:
            if is_machine_failure(exc):
                raise
            place = f"nowhere ({exc.strerror or exc})"
        with self.db.transaction() as conn:
            for row in rows:
                conn.execute(
                    "UPDATE inbound_mails SET status = 'quarantined', error = ?, processed_at = ? WHERE id = ?",
                    (f"{error.code}: {error.message}", now(), row["id"]),
                )
            if notify and self.notifier is not None and not isinstance(error, MisaddressedError):
                self.notifier.on_mail_failed(conn, rows, error)
        log.warning("mail %s quarantined in %s: %s", rows[0]["id"], place, error.message)

    # -- parts -> complete sets -----------------------------------------------------------

    def complete_sets(self) -> None:
        rows = self.db.query(
            """SELECT s.id, s.set_id, s.set_total, COUNT(p.set_part) AS parts FROM inbound_sets s
               JOIN inbound_parts p ON p.set_ref = s.id WHERE s.status = 'collecting'
               GROUP BY s.id HAVING parts >= s.set_total"""
        )
        for row in rows:
            self._guarded(partial(self._complete, row), partial(self._fail_set, row["id"]),
                          f"set {row['set_id']}")

    def _complete(self, row: Any) -> None:
        verified = self.load_set(row["id"])
        with self.db.transaction() as conn:
            # Only from "collecting": forwarding (the other thread) may have failed the set meanwhile.
            changed = conn.execute("UPDATE inbound_sets SET status = 'complete', updated_at = ? "
                                   "WHERE id = ? AND status = 'collecting'", (now(), row["id"])).rowcount
            if changed and self.notifier is not None:
                self.notifier.on_set_verified(conn, row["id"])
        if not changed:
            return
        log.info("set %s complete: %d DICOM files verified against the manifest", verified.set_id,
                 len(verified.dicom_files))
        self.on_ready()

    def load_set(self, set_ref: int) -> VerifiedSet:
        rows = self.db.query("SELECT directory FROM inbound_parts WHERE set_ref = ? ORDER BY set_part", (set_ref,))
        return verify_set([_load_part(Path(r["directory"])) for r in rows])

    def _fail_set(self, set_ref: int, error: DicommailError, status: str = "failed") -> None:
        """The set cannot be delivered: keep its mails (encrypted) and the reason; remove the decrypted parts."""
        [info] = self.db.query("SELECT set_id, status FROM inbound_sets WHERE id = ?", (set_ref,))
        set_id = info["set_id"]
        if info["status"] in ("failed", "expired", "delivered"):
            # Forwarding and intake run side by side: the other one ended this set already.
            log.debug("set %s is %s already; %s is not recorded", set_id, info["status"], error.code)
            return
        mails = [Path(r["spool_path"]) for r in self.db.query(
            "SELECT spool_path FROM inbound_mails WHERE set_ref = ? ORDER BY set_part, id", (set_ref,))]
        details: dict[str, object] = {"set_id": set_id, "set_ref": set_ref}
        detail = getattr(error, "detail", None)
        if detail:
            details["detail"] = detail
        try:
            place: Path | str = self.spool.quarantine_files(mails, error, f"set-{set_ref}", details)
        except OSError as exc:
            if is_machine_failure(exc):
                raise
            place = f"nowhere ({exc.strerror or exc})"
        self._remove_parts(set_ref)
        with self.db.transaction() as conn:
            conn.execute(
                "UPDATE inbound_sets SET status = ?, error = ?, updated_at = ? WHERE id = ?",
                (status, f"{error.code}: {error.message}", now(), set_ref),
            )
            if self.notifier is not None and not isinstance(error, MisaddressedError):
                self.notifier.on_set_finished(conn, set_ref, status, error)
        log.error("set %s %s: %s (kept in %s)", set_id, status, error.message, place)

    def _remove_parts(self, set_ref: int) -> None:
        for row in self.db.query("SELECT directory FROM inbound_parts WHERE set_ref = ?", (set_ref,)):
            directory = Path(row["directory"])
            shutil.rmtree(directory, ignore_errors=True)
            # Intake may store another part of the set meanwhile (it runs beside forwarding): then it stays.
            with contextlib.suppress(OSError):
                directory.parent.rmdir()

    # -- complete sets -> destination ---------------------------------------------------------

    def forward_ready(self) -> None:
        rows = self.db.query(
            "SELECT * FROM inbound_sets WHERE status = 'complete' AND next_attempt_at <= ? ORDER BY first_seen_at",
            (now(),),
        )
        for row in rows:
            if self.should_stop():
                return
            self._forward_attempts += 1
            self._guarded(partial(self._forward, row), partial(self._fail_set, row["id"]),
                          f"set {row['set_id']}")

    def forward_parts(self) -> None:
        """Progressive forwarding: the instances of each verified part of a set still collecting go on now."""
        if not getattr(self.destination, "accepts_parts", False):
            return  # a folder gets each set whole, renamed into place when complete
        rows = self.db.query(
            """SELECT p.set_ref, p.set_part, p.directory, s.set_id, s.set_total, s.attempts, s.emergency
               FROM inbound_parts p JOIN inbound_sets s ON s.id = p.set_ref
               WHERE s.status = 'collecting' AND p.forwarded_at IS NULL AND s.next_attempt_at <= ?
               ORDER BY s.first_seen_at, p.set_part""",
            (now(),),
        )
        waiting: set[int] = set()
        for row in rows:
            if self.should_stop():
                return
            mode = self.forward_emergency if row["emergency"] else self.forward
            if mode != FORWARD_PROGRESSIVE or row["set_ref"] in waiting:
                continue
            self._forward_attempts += 1
            sent = self._guarded(partial(self._send_part, row), partial(self._fail_set, row["set_ref"]),
                                 f"set {row['set_id']} part {row['set_part']}")
            if not sent:
                # The destination is down for now, or the set failed: its later parts wait (or are gone).
                waiting.add(row["set_ref"])

    def _send_part(self, row: Any) -> bool:
        """Send one verified part's instances; False if the destination failed for now (retried later)."""
        set_ref, set_id = row["set_ref"], row["set_id"]
        part = _load_part(Path(row["directory"]))
        if part.constancy is None:
            verified = verify_part(part)
            self._settle_in_flight(set_ref, verified, self.destination)
            if not self._deliver(set_ref, row["attempts"], set_id, verified, self.destination):
                return False
            log.info("set %s: part %d of %d forwarded ahead of the whole set (%d DICOM files)", set_id,
                     row["set_part"], row["set_total"], len(verified.dicom_files))
        # A constancy test set never goes to the clinical destination: it waits for the whole set.
        with self.db.transaction() as conn:
            conn.execute("UPDATE inbound_parts SET forwarded_at = ? WHERE set_ref = ? AND set_part = ?",
                         (now(), set_ref, row["set_part"]))
        return True

    def _deliver(self, set_ref: int, attempts: int, set_id: str, verified: VerifiedSet,
                 destination: Destination) -> bool:
        """Send what of ``verified`` is not stored yet, recording each instance; False after a temporary failure.

        A temporary failure schedules the set's next attempt (doubling up to
        :data:`MAX_BACKOFF`); any other failure, or one past ``retry_limit``, is raised.
        """
        done = {r["sop_instance_uid"] for r in self.db.query(
            "SELECT sop_instance_uid FROM forwarded_instances WHERE set_ref = ? AND state = 'stored'", (set_ref,))}

        def on_sending(sop_instance_uid: str) -> None:
            # The intent, durable before the C-STORE: after a crash we know what may be in the PACS already.
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT OR IGNORE INTO forwarded_instances (set_ref, sop_instance_uid, state, forwarded_at) "
                    "VALUES (?, ?, 'sending', ?)",
                    (set_ref, sop_instance_uid, now()),
                )

        def on_stored(sop_instance_uid: str) -> None:
            self._crash_hook("before-forward-record")
            with self.db.transaction() as conn:
                conn.execute(
                    "INSERT INTO forwarded_instances (set_ref, sop_instance_uid, state, forwarded_at) "
                    "VALUES (?, ?, 'stored', ?) ON CONFLICT (set_ref, sop_instance_uid) DO UPDATE "
                    "SET state = 'stored', forwarded_at = excluded.forwarded_at",
                    (set_ref, sop_instance_uid, now()),
                )
            self._crash_hook("during-forward")

        try:
            destination.deliver(verified, done, on_stored, on_sending)
        except DestinationError as exc:
            attempts += 1
            if not exc.temporary or (self.retry_limit and attempts >= self.retry_limit):
                raise
            delay = min(MAX_BACKOFF, self.retry_interval * 2 ** min(attempts - 1, 10))
            with self.db.transaction() as conn:
                conn.execute(
                    "UPDATE inbound_sets SET attempts = ?, next_attempt_at = ?, error = ?, updated_at = ? "
                    "WHERE id = ? AND status IN ('collecting', 'complete')",
                    (attempts, now() + delay, f"{exc.code}: {exc.message}", now(), set_ref),
                )
            log.warning("set %s not forwarded yet (attempt %d): %s; next try in %.0f s", set_id, attempts,
                        exc.message, delay)
            return False
        return True

    def _forward(self, row: Any) -> None:
        set_ref, set_id = row["id"], row["set_id"]
        verified = self.load_set(set_ref)
        # A constancy check's test set never reaches the clinical destination, whatever happens.
        constancy: dict[str, object] | None = None
        destination: Destination = self.destination
        if verified.constancy is not None:
            constancy = self._check_constancy(set_ref, verified, verified.constancy)
            destination = self.test_destination if self.test_destination is not None else _Nowhere()
        self._settle_in_flight(set_ref, verified, destination)
        if not self._deliver(set_ref, row["attempts"], set_id, verified, destination):
            return
        with self.db.transaction() as conn:
            delivered = conn.execute(
                "UPDATE inbound_sets SET status = 'delivered', delivered_at = ?, error = NULL, updated_at = ? "
                "WHERE id = ? AND status = 'complete'",
                (now(), now(), set_ref),
            ).rowcount
            if delivered and self.notifier is not None:
                self.notifier.on_set_finished(conn, set_ref, "delivered", files=len(verified.files),
                                              dicom_instances=len(verified.dicom_files),
                                              warnings=len(verified.warnings), constancy=constancy)
        self._remove_parts(set_ref)
        if constancy is not None:
            where = "the test destination" if self.test_destination is not None else "nowhere (discarded)"
            log.info("set %s (constancy check test set) delivered to %s: %d DICOM files", set_id, where,
                     len(verified.dicom_files))
        else:
            log.info("set %s delivered: %d DICOM files", set_id, len(verified.dicom_files))

    def _check_constancy(self, set_ref: int, verified: VerifiedSet, mark: ConstancyMark) -> dict[str, object]:
        """Compare every instance of a test set with the sender's expectations: the receipt's results.

        Instances are named by their position in the set (1-based), header
        entries by keyword: no value of the files appears in the result.
        """
        dicom = [f for f in verified.dicom_files if f.dicom is not None]
        received = [f.dicom.sop_instance_uid for f in dicom if f.dicom is not None]
        missing = len(set(mark.instances) - set(received))
        unexpected = len(set(received) - set(mark.instances))
        mismatched: list[str] = []
        headers_ok = quality_ok = bool(dicom) and not unexpected
        reasons = []
        bad_headers = bad_quality = 0
        for number, (item, uid) in enumerate(zip(dicom, received, strict=True), 1):
            expected = mark.instances.get(uid)
            if expected is None:
                continue
            check = compare(item.path, expected, mark.entries)
            mismatched += [f"{keyword} (instance {number})" for keyword in check.mismatched]
            if not check.headers_ok:
                headers_ok = False
                bad_headers += 1
            if not check.quality_ok:
                quality_ok = False
                bad_quality += 1
        if missing:
            reasons.append(f"{missing} instance(s) of the sender's list did not arrive")
        if unexpected:
            reasons.append(f"{unexpected} instance(s) arrived that the sender did not list")
        if bad_headers:
            reasons.append(f"header entries differ in {bad_headers} instance(s)")
        if bad_quality:
            reasons.append(f"the pixel data of {bad_quality} instance(s) differs or cannot be decoded")
        last = self.db.query("SELECT MAX(received_at) AS t FROM inbound_mails WHERE set_ref = ?", (set_ref,))
        result: dict[str, object] = {
            "check_id": mark.check_id,
            "kind": mark.kind,
            "complete": not missing and not unexpected,
            "headers_ok": headers_ok,
            "quality_ok": quality_ok,
            "mismatched": mismatched[:MAX_MISMATCHED],
            "received_at": iso(last[0]["t"] if last else None),
            "verified_at": iso(now()),
            "reason": "; ".join(reasons) or None,
        }
        level = logging.INFO if result["complete"] and headers_ok and quality_ok else logging.WARNING
        log.log(level, "set %s: constancy check %s (%s): complete %s, header entries unchanged %s, image quality %s%s",
                verified.set_id, mark.check_id, mark.kind, result["complete"], headers_ok, quality_ok,
                f" ({result['reason']})" if result["reason"] else "")
        return result

    def _settle_in_flight(self, set_ref: int, verified: VerifiedSet, destination: Destination) -> None:
        """Instances whose C-STORE was under way when we crashed: ask the destination before sending again.

        Where it cannot tell, the instance is sent again (at least once): the
        PACS may then hold it twice, which is documented.
        """
        in_flight = [r["sop_instance_uid"] for r in self.db.query(
            "SELECT sop_instance_uid FROM forwarded_instances WHERE set_ref = ? AND state = 'sending'", (set_ref,))]
        if not in_flight:
            return  # the usual case: no crash to settle
        series = {f.dicom.sop_instance_uid: f.dicom.series_uid for f in verified.dicom_files if f.dicom}
        # A part (progressive forwarding) settles only its own instances: the others' series are not known here.
        for uid in (uid for uid in in_flight if uid in series):
            held = destination.has_instance(verified.study_uid, series.get(uid), uid) \
                if self.in_flight_check else None
            if held:
                with self.db.transaction() as conn:
                    conn.execute("UPDATE forwarded_instances SET state = 'stored' WHERE set_ref = ? "
                                 "AND sop_instance_uid = ?", (set_ref, uid))
                log.info("set %s: an instance whose C-STORE answer was lost (a crash, a dropped connection) "
                         "is in the destination already", verified.set_id)
            elif held is None:
                # The row stays "sending": should this attempt fail too (the PACS is down), the next asks again.
                log.warning("set %s: the destination cannot tell whether it stored an instance whose C-STORE "
                            "answer was lost (a crash, a dropped connection); it is sent again", verified.set_id)
            else:
                log.info("set %s: an instance whose C-STORE answer was lost (a crash, a dropped connection) "
                         "is not in the destination; it is sent again", verified.set_id)

    # -- incomplete sets -------------------------------------------------------------------

    def expire_sets(self) -> None:
        rows = self.db.query(
            "SELECT * FROM inbound_sets WHERE status = 'collecting' AND first_seen_at < ?",
            (now() - self.set_timeout,),
        )
        for row in rows:
            self._guarded(partial(self._expire_set, row), partial(self._fail_set, row["id"]),
                          f"set {row['set_id']}")

    def _expire_set(self, row: Any) -> None:
        have = {r["set_part"] for r in self.db.query("SELECT set_part FROM inbound_parts WHERE set_ref = ?",
                                                     (row["id"],))}
        missing = [n for n in range(1, row["set_total"] + 1) if n not in have]
        if self.notifier is not None and missing and not self._expires_now(row["id"], missing):
            return
        error = IncompleteSetError(
            f"set {row['set_id']} expired with {len(missing)} of {row['set_total']} parts missing: "
            f"{format_ranges(missing) if missing else '-'}",
            "ask the sender to send the missing parts again",
            missing_parts=missing,
        )
        self._fail_set(row["id"], error, status="expired")

    def _expires_now(self, set_ref: int, missing: list[int]) -> bool:
        """With acknowledgements, a timed-out set first asks for its missing parts and waits once more."""
        assert self.notifier is not None
        tracking = self.db.query("SELECT missing_reported_at FROM set_tracking WHERE set_ref = ?", (set_ref,))
        reported = tracking[0]["missing_reported_at"] if tracking else None
        if reported is not None:
            return bool(reported < now() - self.set_timeout)
        with self.db.transaction() as conn:
            asked = self.notifier.on_parts_missing(conn, set_ref, missing)
        return not asked

    def expire_fragments(self) -> None:
        """Fragments that never reassembled into a verified mail expire like incomplete sets."""
        rows = self.db.query(
            "SELECT * FROM inbound_mails WHERE status = 'stored' AND kind = ? AND received_at < ? ORDER BY id",
            (FRAGMENT, now() - self.set_timeout),
        )
        groups: dict[str | None, list[Any]] = {}
        for row in rows:
            groups.setdefault(row["fragment_id"], []).append(row)
        for fragment_id, members in groups.items():
            tried = self.db.query("SELECT last_error FROM fragment_groups WHERE fragment_id = ?", (fragment_id,))
            reason = tried[0]["last_error"] if tried and tried[0]["last_error"] else "not all fragments arrived"
            error = IncompleteSetError(
                f"{len(members)} message/partial fragment(s) expired without reassembling into a verified mail "
                f"({reason})",
                "ask the sender to send the mail again",
            )
            self._guarded(partial(self._quarantine_mails, members, error), partial(self._mark_quarantined, members),
                          "expired fragments")
            with self.db.transaction() as conn:
                conn.execute("DELETE FROM fragment_groups WHERE fragment_id = ?", (fragment_id,))

    def _mark_quarantined(self, rows: list[Any], error: DicommailError) -> None:
        """Last resort when even keeping a copy failed: the item must not be retried forever."""
        with self.db.transaction() as conn:
            for row in rows:
                conn.execute("UPDATE inbound_mails SET status = 'quarantined', error = ?, processed_at = ? "
                             "WHERE id = ?", (f"{error.code}: {error.message}", now(), row["id"]))
        log.error("mail %s could not be quarantined (%s); it is marked failed", rows[0]["id"], error.message)

    def expire_quarantine(self) -> None:
        """The quarantine keeps what it holds for ``quarantine_days``, then removes it."""
        removed = self.spool.expire_quarantine(time.time() - self.quarantine_days * 86400)
        if removed:
            log.info("removed %d quarantined item(s) older than %g days", removed, self.quarantine_days)


class _Nowhere:
    """The destination of a test set when no test destination is configured: it is checked, then discarded."""

    def deliver(self, verified: VerifiedSet, done: set[str], on_stored: Callable[[str], None],
                on_sending: Callable[[str], None] | None = None) -> None:
        del verified, done, on_stored, on_sending

    def has_instance(self, study_uid: str, series_uid: str | None, sop_instance_uid: str) -> bool | None:
        del study_uid, series_uid, sop_instance_uid
        return False


def _address_of(user_id: str) -> str:
    address = email.utils.parseaddr(user_id)[1]
    return address.lower() if "@" in address else ""


# -- part.json: a decoded part survives restarts ---------------------------------------------


def _save_part(part: ReceivedPart, directory: Path) -> None:
    data = {
        "set_id": part.set_id,
        "set_part": part.set_part,
        "set_total": part.set_total,
        "study_uid": part.study_uid,
        "message_id": part.message_id,
        "note": part.note,
        "recipients": list(part.recipients) if part.recipients is not None else None,
        "signer": {**asdict(part.signer), "signed_at": part.signer.signed_at.isoformat()},
        "manifest": json.loads(part.manifest.to_json()) if part.manifest else None,
        "constancy": json.loads(part.constancy.to_json()) if part.constancy else None,
        "emergency": part.emergency,
        "files": [
            {
                "content_id": f.content_id,
                "name": f.name,
                "media_type": f.media_type,
                "kind": f.kind,
                "file": f.path.name,
                "size": f.size,
                "sha256": f.sha256,
                "dicom": {k: str(v) if k == "path" else v for k, v in asdict(f.dicom).items()} if f.dicom else None,
            }
            for f in part.files
        ],
    }
    with atomic_writer(directory / "part.json") as handle:
        handle.write(json.dumps(data, indent=1).encode("utf-8"))


def _load_part(directory: Path) -> ReceivedPart:
    try:
        data = json.loads((directory / "part.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WireFormatError(f"the stored part in {directory} is unreadable: {exc}") from exc
    signer = dict(data["signer"])
    signer["signed_at"] = datetime.fromisoformat(signer["signed_at"])
    files = []
    for entry in data["files"]:
        path = directory / entry["file"]
        dicom = None
        if entry["dicom"]:
            dicom = DicomFile(**{**entry["dicom"], "path": path})
        files.append(
            ReceivedFile(entry["content_id"], entry["name"], entry["media_type"], entry["kind"], path, entry["size"],
                         entry["sha256"], dicom)
        )
    manifest = Manifest.from_json(json.dumps(data["manifest"]).encode()) if data["manifest"] else None
    recipients = data.get("recipients")
    constancy = data.get("constancy")
    return ReceivedPart(
        set_id=data["set_id"],
        set_part=data["set_part"],
        set_total=data["set_total"],
        study_uid=data["study_uid"],
        message_id=data["message_id"],
        signer=Verification(**signer),
        files=files,
        manifest=manifest,
        note=data["note"],
        recipients=tuple(recipients) if recipients is not None else None,
        emergency=bool(data.get("emergency", False)),
        constancy=ConstancyMark.from_json(json.dumps(constancy).encode()) if constancy else None,
    )
