"""Header names and identifiers of the DICOM-Mail wire format."""

from __future__ import annotations

import re
import uuid
from email.message import Message

SETID = "X-TELEMEDICINE-SETID"
SETPART = "X-TELEMEDICINE-SETPART"
SETTOTAL = "X-TELEMEDICINE-SETTOTAL"
STUDYID = "X-TELEMEDICINE-STUDYID"
NOTIFICATION_TO = "X-TELEMEDICINE-DISPOSITION-NOTIFICATION-TO"

#: An emergency set: its subject starts with this, and it carries these priority headers
#: (docs/wire-format.md section 1).  Outside the encryption, so a hint for scheduling only.
EMERGENCY_PREFIX = "EMERGENCY: "
EMERGENCY_HEADERS = (("X-Priority", "1 (Highest)"), ("Importance", "high"), ("Priority", "urgent"))

#: Content type of our manifest part inside the encrypted entity.
MANIFEST_TYPE = "application/x-dicommail-manifest+json"
MANIFEST_NAME = "dicommail-manifest.json"

#: The recommendation limits STUDYID to letters, digits and "- _ . ,".
_STUDYID_RE = re.compile(r"^[A-Za-z0-9_.,-]{1,64}$")
#: DICOM UIDs: digits and dots, no leading zeros in components, 64 chars max.
_UID_RE = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$")
#: A set ID from a foreign sender may be any token; bound it and its alphabet.
#: It names a spool directory, so it must start with a letter or digit
#: ("." and ".." would name the spool itself or its parent).
_SETID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.,:@+=-]{0,127}$")


def is_uid(value: str) -> bool:
    return len(value) <= 64 and bool(_UID_RE.fullmatch(value))


def is_study_id(value: str) -> bool:
    return bool(_STUDYID_RE.fullmatch(value))


def is_set_id(value: str) -> bool:
    return bool(_SETID_RE.fullmatch(value))


def is_emergency(headers: Message) -> bool:
    """Whether an outer header marks its mail as an emergency (subject prefix or ``X-Priority: 1``)."""
    subject = str(headers.get("Subject", "")).lstrip().upper()
    return subject.startswith(EMERGENCY_PREFIX.strip().upper()) or \
        str(headers.get("X-Priority", "")).strip().startswith("1")


def new_set_id(uid_root: str = "") -> str:
    """A fresh set ID in DICOM UID form: ``<root>.<n>`` or ``2.25.<UUID as integer>``.

    A UUID's 122 random bits make collisions between sites impossible in
    practice, unlike the millisecond timestamps older senders use.
    """
    number = uuid.uuid4().int
    if not uid_root:
        return f"2.25.{number}"
    room = 64 - len(uid_root) - 1
    return f"{uid_root}.{str(number)[:room].lstrip('0') or '1'}"


def new_message_id(sender: str) -> str:
    domain = sender.rpartition("@")[2] or "dicommail.invalid"
    return f"<{uuid.uuid4().hex}@{domain}>"
