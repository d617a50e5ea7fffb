"""Synthetic, patient-free studies for tests, benchmarks, the demo and constancy checks.

DIN 6868-159 asks for a defined test data set whose transfer time is
measured; these generators make one reproducibly without real patient data.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MULTIFRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"


def _base(sop_class: str, study_uid: str, series_uid: str, number: int, modality: str) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = generate_uid()
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "SYNTHETIC^TEST"
    ds.PatientID = "DICOMMAIL-TEST"
    ds.StudyDescription = "dicommail synthetic test study"
    ds.StudyDate = "20260101"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    return ds


def _pixels(ds: Dataset, data: bytes, rows: int, columns: int, frames: int = 1) -> None:
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = data


def _ct_slices(count: int, size: int, seed: int) -> Iterator[bytes]:
    import numpy as np

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    body = (x - size / 2) ** 2 + (y - size / 2) ** 2 < (size * 0.39) ** 2
    for _ in range(count):
        # Air outside a body disc, noisy tissue inside: compresses like real CT.
        image = np.full((size, size), 24, dtype=np.uint16)
        image[body] = np.clip(rng.normal(1064, 20, int(body.sum())), 0, 4095).astype(np.uint16)
        yield image.tobytes()


def write_ct_study(
    out_dir: Path,
    slices: int = 20,
    size: int = 512,
    *,
    seed: int = 0,
    patient_name: str | None = None,
    charset: str | None = None,
    study_uid: str | None = None,
) -> list[Path]:
    """A CT series of ``slices`` images of ``size``² 16-bit pixels (512² is 512 KiB each)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid = study_uid or generate_uid()
    series_uid = generate_uid()
    paths = []
    for number, data in enumerate(_ct_slices(slices, size, seed), 1):
        ds = _base(CT_IMAGE_STORAGE, study_uid, series_uid, number, "CT")
        if charset:
            ds.SpecificCharacterSet = charset
        if patient_name:
            ds.PatientName = patient_name
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        _pixels(ds, data, size, size)
        path = out_dir / f"CT{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_mr_study(out_dir: Path, images: int = 5, size: int = 256, *, seed: int = 1) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid = generate_uid(), generate_uid()
    paths = []
    for number, data in enumerate(_ct_slices(images, size, seed), 1):
        ds = _base(MR_IMAGE_STORAGE, study_uid, series_uid, number, "MR")
        _pixels(ds, data, size, size)
        path = out_dir / f"MR{number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(out_dir: Path, frames: int = 50, size: int = 512, *, seed: int = 2) -> Path:
    """One multi-frame object, large enough to need message/partial at small mail sizes."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ds = _base(MULTIFRAME_WORD_SC, generate_uid(), generate_uid(), 1, "OT")
    _pixels(ds, b"".join(_ct_slices(frames, size, seed)), size, size, frames)
    path = out_dir / "MULTIFRAME.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def pydicom_sample(name: str) -> Path:
    """A file from pydicom's own test data (e.g. compressed transfer syntaxes)."""
    from pydicom.data import get_testdata_file

    found = get_testdata_file(name)
    if not isinstance(found, str):
        raise FileNotFoundError(name)
    return Path(found)


__all__ = ["pydicom_sample", "write_ct_study", "write_mr_study", "write_multiframe"]
