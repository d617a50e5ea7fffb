"""Acknowledgements on the wire: Message Disposition Notifications and the dicommail status report.

A notification is an RFC 8098 (formerly RFC 3798) ``multipart/report;
report-type=disposition-notification`` entity with three parts:

1. ``text/plain``: a short human-readable statement (set ID, part numbers,
   counts and reason codes only, never patient data);
2. ``message/disposition-notification``: ``Reporting-UA``, ``Final-Recipient``,
   ``Original-Message-ID``, ``Disposition`` and, for errors, ``Error``;
3. ``application/x-dicommail-status+json``: the same facts for machines
   (:class:`StatusReport`); other @GIT implementations leave it out.

It is sent either as it is (method "rfc": a plain MDN) or signed and
encrypted to the original sender as PGP/MIME (method "pgp"), the outer header
carrying ``X-TELEMEDICINE-SETID`` and ``X-TELEMEDICINE-REPORT`` so that the
sender can recognise it before decrypting.  Outgoing dispositions use the
DRG/@GIT vocabulary; parsing accepts the RFC 8098 one as well.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import json
from dataclasses import asdict, dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

from dicommail import __version__
from dicommail.constancy.values import KINDS, is_check_id
from dicommail.crypto.gpg import Keyring, Verification
from dicommail.errors import InputError, WireFormatError
from dicommail.store.files import atomic_writer
from dicommail.wire import headers as h
from dicommail.wire.mime import CRLF, LF, header_block, new_boundary

#: The @GIT header that marks a mail as a report (notification), on the outer and inner header.
REPORT = "X-TELEMEDICINE-REPORT"
#: Media types of the report's parts.
REPORT_TYPE = "multipart/report"
MDN_TYPE = "message/disposition-notification"
STATUS_TYPE = "application/x-dicommail-status+json"
STATUS_NAME = "dicommail-status.json"
#: A notification is a few KiB; anything larger is not one.
MAX_REPORT_SIZE = 256 * 1024

# Scopes: one set part, or the whole set.
PART = "part"
SET = "set"

# Outcomes, from the sender's point of view.
SUCCESS = "success"  # received / delivered
WARNING = "warning"  # received, with a warning
ERROR = "error"  # failed, the sender may resend
FATAL = "fatal"  # failed, resending is pointless
OUTCOMES = (SUCCESS, WARNING, ERROR, FATAL)

#: What dicommail sends: the DRG/@GIT vocabulary.
_MODE = "automatic-action/MDN-sent-automatically"
DRG_DISPOSITIONS: dict[str, str] = {
    SUCCESS: f"{_MODE}; displayed",
    WARNING: f"{_MODE}; displayed/warning",
    ERROR: f"{_MODE}; deleted/error",
    FATAL: f"{_MODE}; deleted",
}

_SUCCESS_TYPES = frozenset({"displayed", "processed", "dispatched"})
_FATAL_TYPES = frozenset({"deleted", "denied", "failed"})
_FATAL_MODIFIERS = frozenset({"expired", "mailbox-terminated", "superseded"})

#: Reason codes sent in error notifications, with the fixed text that goes with them.
REASONS: dict[str, str] = {
    "decryption-failed": "the mail could not be decrypted (damaged, truncated or not encrypted to our key)",
    "signer-untrusted": "the mail's signature is missing, bad or made by a key we have not certified",
    "malformed": "the mail does not follow the DICOM-Mail format",
    "integrity": "a file does not match the manifest (size, SHA-256 or UID)",
    "not-dicom": "a file labelled application/dicom is no DICOM file",
    "parts-missing": "parts of the set did not arrive in time",
    "pacs-refused": "the archive (PACS) did not accept the study",
    "error": "the set could not be processed",
}


@dataclass(frozen=True)
class Disposition:
    """An RFC 8098 ``Disposition`` field: ``action/sending; type[/modifier,...]``."""

    action_mode: str
    sending_mode: str
    type: str
    modifiers: tuple[str, ...] = ()

    @property
    def outcome(self) -> str:
        """success, warning, error (resend possible) or fatal, in both vocabularies."""
        modifiers = set(self.modifiers)
        if "error" in modifiers:
            return ERROR
        if self.type in _FATAL_TYPES or modifiers & _FATAL_MODIFIERS:
            return FATAL
        if "warning" in modifiers:
            return WARNING
        if self.type in _SUCCESS_TYPES:
            return SUCCESS
        return FATAL  # an unknown type is no acknowledgement

    def __str__(self) -> str:
        kind = f"{self.type}/{','.join(self.modifiers)}" if self.modifiers else self.type
        return f"{self.action_mode}/{self.sending_mode}; {kind}"


def parse_disposition(value: str) -> Disposition:
    """Parse a ``Disposition`` field (RFC 3798 and RFC 8098 forms, case-insensitive)."""
    text = " ".join(value.split())
    modes, sep, rest = text.partition(";")
    rest = rest.lower()
    if not sep:
        raise WireFormatError(f"malformed Disposition field {value[:100]!r}")
    action, slash, sending = modes.strip().partition("/")
    if not slash or not action or not sending:
        raise WireFormatError(f"malformed disposition mode in {value[:100]!r}")
    kind, _, modifier_text = rest.strip().partition("/")
    kind = kind.strip()
    if not kind or not kind.replace("-", "").isalpha():
        raise WireFormatError(f"malformed disposition type in {value[:100]!r}")
    # RFC 3798 separates several modifiers with commas; older texts with slashes.
    modifiers = tuple(m.strip() for m in modifier_text.replace("/", ",").split(",") if m.strip())
    return Disposition(action.strip(), sending.strip(), kind, modifiers)


def disposition_for(outcome: str) -> Disposition:
    return parse_disposition(DRG_DISPOSITIONS[outcome])


@dataclass
class StatusReport:
    """The machine-readable part (``application/x-dicommail-status+json``)."""

    scope: str  # part, set
    set_id: str
    status: str  # part: verified, failed; set: delivered, failed, expired, incomplete
    outcome: str  # success, warning, error, fatal
    set_part: int | None = None
    set_total: int | None = None
    reason: str | None = None
    message: str | None = None
    missing_parts: list[int] = field(default_factory=list)
    parts_received: int | None = None
    files: int | None = None
    dicom_instances: int | None = None
    instances_forwarded: int | None = None
    first_received_at: str | None = None
    verified_at: str | None = None
    forwarded_at: str | None = None
    reported_at: str | None = None
    generator: str = f"dicommail {__version__}"
    #: A constancy check's results (final set notification of a test set only; section 10 of the wire format).
    constancy: dict[str, object] | None = None

    def to_json(self) -> bytes:
        data: dict[str, Any] = {"format": "dicommail-status", "version": 1, **asdict(self)}
        if self.constancy is None:
            del data["constancy"]  # ordinary reports stay as they were
        return json.dumps(data, indent=1, ensure_ascii=True).encode("ascii") + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> StatusReport:
        if len(data) > MAX_REPORT_SIZE:
            raise WireFormatError("the status report is too large")
        try:
            raw = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise WireFormatError(f"the status report is not valid JSON: {exc}") from exc
        if not isinstance(raw, dict) or raw.get("format") != "dicommail-status":
            raise WireFormatError("the status report is not a dicommail-status object")
        if raw.get("version") != 1:
            raise WireFormatError(f"unknown status report version {raw.get('version')!r}")
        try:
            report = cls(
                scope=_text(raw, "scope", (PART, SET)),
                set_id=_text(raw, "set_id"),
                status=_text(raw, "status"),
                outcome=_text(raw, "outcome", OUTCOMES),
                set_part=_int_or_none(raw, "set_part"),
                set_total=_int_or_none(raw, "set_total"),
                reason=_text_or_none(raw, "reason"),
                message=_text_or_none(raw, "message"),
                missing_parts=_int_list(raw, "missing_parts"),
                parts_received=_int_or_none(raw, "parts_received"),
                files=_int_or_none(raw, "files"),
                dicom_instances=_int_or_none(raw, "dicom_instances"),
                instances_forwarded=_int_or_none(raw, "instances_forwarded"),
                first_received_at=_text_or_none(raw, "first_received_at"),
                verified_at=_text_or_none(raw, "verified_at"),
                forwarded_at=_text_or_none(raw, "forwarded_at"),
                reported_at=_text_or_none(raw, "reported_at"),
                generator=_text_or_none(raw, "generator") or "",
                constancy=_constancy_or_none(raw),
            )
        except (TypeError, ValueError) as exc:
            raise WireFormatError(f"the status report is malformed: {exc}") from exc
        if not h.is_set_id(report.set_id):
            raise WireFormatError("the status report's set ID is malformed")
        return report


def _text(raw: dict[str, Any], key: str, choices: tuple[str, ...] = ()) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value or (choices and value not in choices):
        raise ValueError(f"{key} must be " + (f"one of {', '.join(choices)}" if choices else "a string"))
    return value


def _text_or_none(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 2000:
        raise ValueError(f"{key} must be a string")
    return value


def _int_or_none(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{key} must be a whole number")
    return value


#: Bounds of a constancy result from a peer: its mismatch list and the length of each entry.
MAX_MISMATCHED = 1000
_CONSTANCY_FLAGS = ("complete", "headers_ok", "quality_ok")


def _constancy_or_none(raw: dict[str, Any]) -> dict[str, object] | None:
    """The ``constancy`` object, checked field by field; unknown fields are dropped, not trusted."""
    value = raw.get("constancy")
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError("constancy must be an object")
    result: dict[str, object] = {
        "check_id": _text(value, "check_id"),
        "kind": _text(value, "kind", KINDS),
    }
    if not is_check_id(result["check_id"]):
        raise ValueError("constancy check_id is malformed")
    for flag in _CONSTANCY_FLAGS:
        if not isinstance(value.get(flag), bool):
            raise ValueError(f"constancy {flag} must be true or false")
        result[flag] = value[flag]
    mismatched = value.get("mismatched", [])
    if not isinstance(mismatched, list) or len(mismatched) > MAX_MISMATCHED or not all(
            isinstance(m, str) and len(m) <= 200 for m in mismatched):
        raise ValueError("constancy mismatched must be a list of short texts")
    result["mismatched"] = list(mismatched)
    for key in ("received_at", "verified_at", "reason"):
        text = _text_or_none(value, key)
        if key != "reason" and text is not None and len(text) > 64:
            raise ValueError(f"constancy {key} is too long")
        result[key] = text
    return result


def _int_list(raw: dict[str, Any], key: str) -> list[int]:
    value = raw.get(key) or []
    if not isinstance(value, list) or len(value) > 100_000:
        raise ValueError(f"{key} must be a list of part numbers")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in value):
        raise ValueError(f"{key} must be a list of part numbers")
    return list(value)


@dataclass
class Notification:
    """One acknowledgement, as built or as parsed."""

    set_id: str
    scope: str
    disposition: Disposition
    set_part: int | None = None
    set_total: int | None = None
    original_message_id: str = ""
    final_recipient: str = ""
    reporting_ua: str = ""
    error: str = ""
    text: str = ""
    status: StatusReport | None = None

    @property
    def outcome(self) -> str:
        return self.status.outcome if self.status is not None else self.disposition.outcome

    @property
    def reason(self) -> str | None:
        if self.status is not None and self.status.reason:
            return self.status.reason
        return self.error.partition(":")[0].strip() or None if self.error else None

    @property
    def missing_parts(self) -> list[int]:
        return list(self.status.missing_parts) if self.status is not None else []


def human_text(report: StatusReport) -> str:
    """The text/plain part: what happened, in set IDs, part numbers, counts and reason codes."""
    where = f"DICOM-Mail set {report.set_id}"
    if report.scope == PART:
        where += f", part {report.set_part} of {report.set_total}"
    if report.outcome in (SUCCESS, WARNING) and report.scope == PART:
        text = f"{where}: received, signature and content verified."
    elif report.outcome in (SUCCESS, WARNING) and report.constancy is not None:
        found = ", ".join(f"{label}: {'yes' if report.constancy.get(key) is True else 'no'}" for key, label in (
            ("complete", "complete"), ("headers_ok", "header entries unchanged"), ("quality_ok", "image quality")))
        text = (
            f"{where}: constancy check test set ({report.constancy.get('kind')}) received and checked, "
            f"not forwarded to the archive: {found}."
        )
    elif report.outcome in (SUCCESS, WARNING):
        text = (
            f"{where}: complete and delivered to the archive: {report.files} file(s), "
            f"{report.dicom_instances} DICOM instance(s)."
        )
    else:
        reason = report.reason or "error"
        text = f"{where}: not accepted ({reason}: {REASONS.get(reason, REASONS['error'])})."
        if report.missing_parts:
            text += f" Missing parts: {', '.join(str(n) for n in report.missing_parts)}."
        text += " Please send the affected parts again." if report.outcome == ERROR else " Resending will not help."
    if report.outcome == WARNING and report.message:
        text += f" Warning: {report.message}"
    return text + "\n"


def build_notification(report: StatusReport, *, original_message_id: str, final_recipient: str,
                       reporting_host: str) -> Notification:
    """The notification that carries ``report``, in the DRG/@GIT vocabulary."""
    error = ""
    if report.outcome in (ERROR, FATAL):
        reason = report.reason or "error"
        error = f"{reason}: {REASONS.get(reason, REASONS['error'])}"
    return Notification(
        set_id=report.set_id,
        scope=report.scope,
        disposition=disposition_for(report.outcome),
        set_part=report.set_part,
        set_total=report.set_total,
        original_message_id=original_message_id,
        final_recipient=final_recipient,
        reporting_ua=f"{reporting_host}; dicommail {__version__}",
        error=error,
        text=human_text(report),
        status=report,
    )


def _set_fields(notification: Notification) -> list[tuple[str, str]]:
    fields = [(h.SETID, notification.set_id)]
    if notification.set_part is not None:
        fields.append((h.SETPART, str(notification.set_part)))
    if notification.set_total is not None:
        fields.append((h.SETTOTAL, str(notification.set_total)))
    fields.append((REPORT, notification.scope))
    return fields


def report_entity(notification: Notification, eol: bytes = CRLF, extra: list[tuple[str, str]] | None = None) -> bytes:
    """The ``multipart/report`` entity (headers and body) with ``eol`` line ends."""
    boundary = new_boundary()
    fields = [
        *(extra or []),
        ("MIME-Version", "1.0"),
        ("Content-Type", f'{REPORT_TYPE}; report-type=disposition-notification; boundary="{boundary}"'),
        *_set_fields(notification),
    ]
    mdn = [("Reporting-UA", notification.reporting_ua)]
    if notification.final_recipient:
        mdn.append(("Final-Recipient", f"rfc822; {notification.final_recipient}"))
    if notification.original_message_id:
        mdn.append(("Original-Message-ID", notification.original_message_id))
    mdn.append(("Disposition", str(notification.disposition)))
    if notification.error:
        mdn.append(("Error", notification.error))
    delimiter = f"--{boundary}".encode() + eol
    text = notification.text.encode("ascii", "replace").replace(b"\n", eol)
    out = header_block(fields, eol) + eol
    out += b"This is a disposition notification (RFC 8098)." + eol
    out += delimiter + header_block([("Content-Type", "text/plain; charset=us-ascii")], eol) + eol + text
    out += delimiter + header_block([("Content-Type", MDN_TYPE)], eol) + eol + header_block(mdn, eol)
    if notification.status is not None:
        out += delimiter + header_block(
            [
                ("Content-Type", f'{STATUS_TYPE}; name="{STATUS_NAME}"'),
                ("Content-Transfer-Encoding", "7bit"),
                ("Content-Disposition", f'inline; filename="{STATUS_NAME}"'),
            ],
            eol,
        ) + eol + notification.status.to_json().replace(b"\n", eol)
    out += f"--{boundary}--".encode() + eol
    return out


def _subject(notification: Notification) -> str:
    where = notification.set_id
    if notification.set_part is not None:
        where += f" ({notification.set_part}/{notification.set_total})"
    word = {SUCCESS: "received", WARNING: "received with warning", ERROR: "error", FATAL: "failed"}
    if notification.scope == SET and notification.outcome in (SUCCESS, WARNING):
        return f"Disposition notification: DICOM-Mail {where} delivered"
    return f"Disposition notification: DICOM-Mail {where} {word[notification.outcome]}"


def _envelope(notification: Notification, sender: str, recipient: str, message_id: str) -> list[tuple[str, str]]:
    return [
        ("From", sender),
        ("To", recipient),
        ("Date", email.utils.formatdate(localtime=True)),
        ("Subject", _subject(notification)),
        ("Message-ID", message_id),
        # RFC 3834: an automatic reply; nobody should answer it automatically.
        ("Auto-Submitted", "auto-replied"),
        ("X-Mailer", f"dicommail {__version__}"),
    ]


def write_plain(notification: Notification, path: Path, *, sender: str, recipient: str, message_id: str) -> None:
    """Write the notification as a plain RFC 8098 MDN mail (method "rfc")."""
    data = report_entity(notification, LF, _envelope(notification, sender, recipient, message_id))
    with atomic_writer(path) as handle:
        handle.write(data)


def write_pgp(
    notification: Notification,
    path: Path,
    *,
    sender: str,
    recipient: str,
    message_id: str,
    keyring: Keyring,
    signer: str,
    passphrase: str | None,
    work: Path,
) -> None:
    """Write the notification signed and encrypted to ``recipient`` as PGP/MIME (method "pgp")."""
    work.mkdir(parents=True, exist_ok=True)
    inner = work / f"{path.stem}.inner"
    armored = work / f"{path.stem}.asc"
    inner.write_bytes(report_entity(notification, CRLF))
    try:
        keyring.sign_encrypt_file(inner, armored, recipient=recipient, signer=signer, passphrase=passphrase)
        boundary = new_boundary()
        fields = [
            *_envelope(notification, sender, recipient, message_id),
            ("MIME-Version", "1.0"),
            ("Content-Type", f'multipart/encrypted; protocol="application/pgp-encrypted"; boundary="{boundary}"'),
            *_set_fields(notification),
        ]
        data = header_block(fields, LF) + LF
        data += b"This is an OpenPGP/MIME encrypted message (RFC 3156)." + LF
        data += f"--{boundary}".encode() + LF + header_block([("Content-Type", "application/pgp-encrypted")], LF)
        data += LF + b"Version: 1" + LF + LF
        data += f"--{boundary}".encode() + LF + header_block(
            [
                ("Content-Type", 'application/octet-stream; name="encrypted.asc"'),
                ("Content-Disposition", 'inline; filename="encrypted.asc"'),
            ],
            LF,
        ) + LF
        data += armored.read_bytes().replace(b"\r\n", b"\n") + LF + f"--{boundary}--".encode() + LF
        with atomic_writer(path) as handle:
            handle.write(data)
    finally:
        inner.unlink(missing_ok=True)
        armored.unlink(missing_ok=True)


# --- reading -----------------------------------------------------------------------------------

_parser = email.parser.BytesParser(policy=email.policy.compat32)
_header_parser = email.parser.HeaderParser(policy=email.policy.compat32)


def is_report(headers: Message) -> bool:
    """Whether a mail's outer header says it is a notification (plain or PGP/MIME)."""
    return headers.get(REPORT) is not None or headers.get_content_type() == REPORT_TYPE


def _read_limited(path: Path) -> bytes:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_REPORT_SIZE + 1)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_REPORT_SIZE:
        raise WireFormatError(f"the notification is larger than {MAX_REPORT_SIZE} bytes")
    return data


def parse_report(data: bytes) -> Notification:
    """Parse a ``multipart/report; report-type=disposition-notification`` entity (or mail)."""
    if len(data) > MAX_REPORT_SIZE:
        raise WireFormatError(f"the notification is larger than {MAX_REPORT_SIZE} bytes")
    message = _parser.parsebytes(data)
    if message.get_content_type() != REPORT_TYPE:
        raise WireFormatError(f"not a disposition notification (Content-Type {message.get_content_type()})")
    report_type = str(message.get_param("report-type", "") or "").lower()
    if report_type != "disposition-notification":
        raise WireFormatError(f"a report of type {report_type or 'unknown'!r}, not a disposition notification")
    fields: Message | None = None
    text = ""
    status: StatusReport | None = None
    for part in message.walk():
        media = part.get_content_type()
        if media == MDN_TYPE and fields is None:
            fields = _mdn_fields(part)
        elif media == STATUS_TYPE and status is None:
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                status = StatusReport.from_json(payload)
        elif media == "text/plain" and not text:
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                text = payload.decode("utf-8", "replace")[:4000]
    if fields is None or fields.get("Disposition") is None:
        raise WireFormatError("the notification has no message/disposition-notification part with a Disposition")
    disposition = parse_disposition(str(fields["Disposition"]))
    set_id = str(message.get(h.SETID, "") or "").strip() or (status.set_id if status else "")
    if status is not None and set_id and status.set_id != set_id:
        raise WireFormatError("the status report names another set than the notification's header")
    if set_id and not h.is_set_id(set_id):
        raise WireFormatError("the notification's set ID is malformed")
    set_part = _header_int(message, h.SETPART)
    if set_part is None and status is not None:
        set_part = status.set_part
    set_total = _header_int(message, h.SETTOTAL)
    if set_total is None and status is not None:
        set_total = status.set_total
    scope = str(message.get(REPORT, "") or "").strip().lower()
    if scope not in (PART, SET):
        scope = status.scope if status is not None else (PART if set_part is not None else SET)
    return Notification(
        set_id=set_id,
        scope=scope,
        disposition=disposition,
        set_part=set_part,
        set_total=set_total,
        original_message_id=" ".join(str(fields.get("Original-Message-ID", "") or "").split()),
        final_recipient=_address_field(str(fields.get("Final-Recipient", "") or "")),
        reporting_ua=" ".join(str(fields.get("Reporting-UA", "") or "").split())[:200],
        error=" ".join(str(fields.get("Error", "") or "").split())[:500],
        text=text,
        status=status,
    )


def _mdn_fields(part: Message) -> Message:
    payload = part.get_payload()
    if isinstance(payload, list):  # the parser treats message/* bodies as header blocks
        first = payload[0] if payload else None
        if isinstance(first, Message):
            return first
        return Message()
    raw = part.get_payload(decode=True)
    text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(payload)
    return _header_parser.parsestr(text.strip() + "\n")


def _header_int(message: Message, name: str) -> int | None:
    value = message.get(name)
    if value is None:
        return None
    text = str(value).strip()
    if not text.isdigit():
        raise WireFormatError(f"header {name} is not a number")
    return int(text)


def _address_field(value: str) -> str:
    """``rfc822; a@b`` -> ``a@b``."""
    _, _, address = value.partition(";")
    return email.utils.parseaddr((address or value).strip())[1].lower()


@dataclass(frozen=True)
class ReceivedReport:
    """A notification as it arrived: parsed, and who signed it (``None``: a plain MDN)."""

    notification: Notification
    signer: Verification | None
    sender: str  # the outer From address
    message_id: str
    #: The mail's Date (POSIX time; None if missing or malformed): when the receiver wrote it, not
    #: when this site fetched it.  Unsigned: use it only within times known otherwise.
    written_at: float | None = None


def open_report(path: Path, keyring: Keyring, work: Path, *, passphrase: str | None = None) -> ReceivedReport:
    """Read a stored notification; a PGP/MIME one is decrypted and its signer checked (trust rule)."""
    data = _read_limited(path)
    outer = _parser.parsebytes(data)
    sender = email.utils.parseaddr(str(outer.get("From", "") or ""))[1].lower()
    message_id = " ".join(str(outer.get("Message-ID", "") or "").split())
    written_at = _date(outer)
    if outer.get_content_type() == REPORT_TYPE:
        return ReceivedReport(parse_report(data), None, sender, message_id, written_at)
    if outer.get_content_type() != "multipart/encrypted":
        raise WireFormatError(f"a notification must be a report or PGP/MIME, not {outer.get_content_type()}")
    armored: bytes | None = None
    for part in outer.walk():
        if part.get_content_type() == "application/octet-stream":
            payload = part.get_payload(decode=True)
            armored = payload if isinstance(payload, bytes) else None
            break
    if not armored:
        raise WireFormatError("the PGP/MIME encrypted part is missing or empty")
    work.mkdir(parents=True, exist_ok=True)
    source = work / "report.asc"
    target = work / "report.mime"
    source.write_bytes(armored)
    try:
        signer = keyring.decrypt_verify_file(source, target, max_output=MAX_REPORT_SIZE, passphrase=passphrase)
        inner = target.read_bytes()
    finally:
        source.unlink(missing_ok=True)
        target.unlink(missing_ok=True)
    notification = parse_report(inner)
    # The signed inner values are authoritative; outer copies must agree with them.
    for name, inner_value in ((h.SETID, notification.set_id), (h.SETPART, notification.set_part)):
        outer_value = outer.get(name)
        if outer_value is not None and inner_value is not None and str(outer_value).strip() != str(inner_value):
            raise WireFormatError(f"the outer header {name} differs from the signed one inside the encryption")
    return ReceivedReport(notification, signer, sender, message_id, written_at)


def _date(message: Message) -> float | None:
    try:
        return email.utils.parsedate_to_datetime(str(message.get("Date", "") or "")).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
