"""The manifest: what a set part carries, so the receiver can prove a set complete and intact.

Every mail of a set carries one manifest (inside the encryption) listing the
files in *that* mail with size and SHA-256, plus the file count and byte
total of the whole set.  The receiver checks each file against its entry and
the union of all parts against the set totals.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from dicommail.errors import WireFormatError
from dicommail.wire.headers import is_set_id, is_uid

FORMAT = "dicommail-manifest"
VERSION = 1
#: A manifest is metadata; anything larger is not one of ours.
MAX_MANIFEST_SIZE = 4 * 1024 * 1024


@dataclass(frozen=True)
class ManifestEntry:
    content_id: str
    name: str
    kind: str  # "dicom" or "attachment"
    size: int
    sha256: str
    media_type: str = "application/dicom"
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    transfer_syntax_uid: str = ""


@dataclass(frozen=True)
class Manifest:
    set_id: str
    study_instance_uid: str
    set_part: int
    set_total: int
    set_files: int
    set_bytes: int
    files: list[ManifestEntry] = field(default_factory=list)
    created: str = ""
    generator: str = ""

    def to_json(self) -> bytes:
        document: dict[str, Any] = {"format": FORMAT, "version": VERSION, **asdict(self)}
        # ASCII-only JSON travels as 7bit without any transfer encoding.
        return json.dumps(document, indent=1, ensure_ascii=True).encode("ascii").replace(b"\n", b"\r\n") + b"\r\n"

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        try:
            document = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WireFormatError(f"the manifest is not valid JSON: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise WireFormatError("the manifest part is not a dicommail manifest")
        if document.get("version") != VERSION:
            raise WireFormatError(
                f"manifest version {document.get('version')!r} is not supported",
                "upgrade dicommail on this side",
            )
        try:
            files = [ManifestEntry(**entry) for entry in document["files"]]
            manifest = cls(
                set_id=str(document["set_id"]),
                study_instance_uid=str(document["study_instance_uid"]),
                set_part=int(document["set_part"]),
                set_total=int(document["set_total"]),
                set_files=int(document["set_files"]),
                set_bytes=int(document["set_bytes"]),
                files=files,
                created=str(document.get("created", "")),
                generator=str(document.get("generator", "")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise WireFormatError(f"the manifest lacks or garbles a field ({exc})") from exc
        manifest.validate()
        return manifest

    def validate(self) -> None:
        if not is_set_id(self.set_id) or not is_uid(self.study_instance_uid):
            raise WireFormatError("the manifest's set ID or study UID is malformed")
        if not 1 <= self.set_part <= self.set_total or self.set_files < 0 or self.set_bytes < 0:
            raise WireFormatError("the manifest's part numbers or totals are inconsistent")
        for entry in self.files:
            if entry.kind not in ("dicom", "attachment") or entry.size < 0 or len(entry.sha256) != 64:
                raise WireFormatError(f"manifest entry {entry.content_id!r} is malformed")
            if entry.kind == "dicom" and not is_uid(entry.sop_instance_uid):
                raise WireFormatError(f"manifest entry {entry.content_id!r} has no valid SOP Instance UID")
