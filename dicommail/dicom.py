"""Reading just enough of DICOM Part 10 files to route, pack and verify them."""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from dicommail.errors import InputError, NotDicomError
from dicommail.wire.headers import is_uid

#: Media Storage Directory (DICOMDIR): an index of a medium, not an image.
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"]


@dataclass(frozen=True)
class DicomFile:
    path: Path
    size: int
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    instance_number: int


def instance_number(value: object) -> int:
    """An Instance Number, for ordering only: its first value if that is numeric, else 0 (never an error)."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    if value is None:
        return 0
    text = str(value).split("\\", 1)[0].strip()
    try:
        return int(text)
    except ValueError:
        try:
            return int(float(text))
        except (ValueError, OverflowError):
            return 0


def _identifiers(source: Path | BinaryIO, label: str) -> tuple[str, str, str, str, str, int]:
    """(study, series, SOP instance, SOP class, transfer syntax, instance number); :class:`NotDicomError`."""
    try:
        dataset = pydicom.dcmread(source, stop_before_pixels=True, specific_tags=_TAGS)
        meta = dataset.file_meta
        sop_instance = str(dataset.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", ""))
        sop_class = str(dataset.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", ""))
        study = str(dataset.get("StudyInstanceUID", ""))
        series = str(dataset.get("SeriesInstanceUID", ""))
        syntax = str(meta.get("TransferSyntaxUID", ""))
        try:
            number = instance_number(dataset.get("InstanceNumber", None))
        except (ValueError, TypeError):  # a value pydicom cannot even convert: it only orders files
            number = 0
    except InvalidDicomError as exc:
        raise NotDicomError(f"{label} is not a DICOM Part 10 file", "only DICOM files can be sent as images") from exc
    except (OSError, ValueError, TypeError, AttributeError, EOFError, KeyError) as exc:
        raise NotDicomError(f"{label} is not a readable DICOM file ({type(exc).__name__})") from exc
    if sop_class == DICOMDIR_CLASS:
        raise NotDicomError(f"{label} is a DICOMDIR index, not an image", "it is skipped; the images it lists are sent")
    for name, uid in (("SOP Instance UID", sop_instance), ("Study Instance UID", study)):
        if not is_uid(uid):
            raise NotDicomError(f"{label} has no valid {name}", "the file is malformed; repair or re-export it")
    return study, series if is_uid(series) else "", sop_instance, sop_class, syntax, number


def read_dicom_info(path: Path, label: str | None = None) -> DicomFile:
    """Read the identifying UIDs of a Part 10 file; :class:`NotDicomError` if it is none."""
    study, series, sop_instance, sop_class, syntax, number = _identifiers(path, label or str(path))
    return DicomFile(
        path=path,
        size=path.stat().st_size,
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax_uid=syntax,
        instance_number=number,
    )


def check_dicom_data(data: bytes, label: str) -> tuple[str, str]:
    """(SOP Instance UID, Study Instance UID) of Part 10 bytes that :func:`read_dicom_info` will accept.

    The same checks as :func:`read_dicom_info`, so an object accepted now can be packed later;
    :class:`NotDicomError` otherwise.
    """
    study, _series, sop_instance, _class, _syntax, _number = _identifiers(io.BytesIO(data), label)
    return sop_instance, study


@dataclass
class ScanResult:
    files: list[DicomFile]
    skipped: list[tuple[Path, str]]

    def studies(self) -> dict[str, list[DicomFile]]:
        """Files grouped by study, each ordered by series, instance number and path."""
        grouped: dict[str, list[DicomFile]] = {}
        for item in self.files:
            grouped.setdefault(item.study_uid, []).append(item)
        for items in grouped.values():
            items.sort(key=lambda f: (f.series_uid, f.instance_number, str(f.path)))
        return grouped


def _walk(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    if not name.startswith("."):
                        yield Path(root) / name
        elif path.exists():
            yield path
        else:
            raise InputError(f"{path} does not exist")


def scan(paths: Iterable[Path]) -> ScanResult:
    """Find the DICOM files among ``paths`` (files or folder trees); list the rest as skipped."""
    files: list[DicomFile] = []
    skipped: list[tuple[Path, str]] = []
    seen: set[str] = set()
    for path in _walk(paths):
        try:
            info = read_dicom_info(path)
        except NotDicomError as exc:
            skipped.append((path, exc.message))
            continue
        if info.sop_instance_uid in seen:
            skipped.append((path, f"{path} repeats an instance already found (same SOP Instance UID)"))
            continue
        seen.add(info.sop_instance_uid)
        files.append(info)
    return ScanResult(files=files, skipped=skipped)
