"""A small synthetic medical-style dataset, so the whole study runs offline with no downloads.

Four visually distinct classes (learnable from a few examples even by a randomly initialised
model), stored in the real formats a study meets: 8- and 16-bit PNG, CT-like DICOM with a
rescale slope/intercept, and NIfTI. Everything is drawn from ``demo.seed``, so the same seed
gives byte-identical files.
"""
from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..config import DemoConfig
from ..io import atomic_dir
from ..seeding import numpy_rng

log = logging.getLogger(__name__)

CLASSES = ("normal tissue", "cyst", "tumor", "calcification")
# Cycled over the images of every class so that no file format is tied to one class.
FORMATS = ("png8", "png8", "png16", "dicom", "nifti")
_EXTENSIONS = {"png8": ".png", "png16": ".png", "dicom": ".dcm", "nifti": ".nii"}
# Stored DICOM value = (HU - intercept) / slope: a non-trivial slope checks the reader applies it.
DICOM_SLOPE = 0.5
DICOM_INTERCEPT = -1024.0
HU_LOW, HU_HIGH = -100.0, 200.0  # the demo's soft-tissue range: intensity 0..1 maps onto it


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture: a coarse random grid upsampled bicubically, roughly in [-1, 1]."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    field = Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC)
    return np.asarray(field, dtype=np.float32)


def _soft_mask(distance: np.ndarray, edge: float) -> np.ndarray:
    """1 inside (distance < 0), 0 outside, with a smooth edge so shapes are not pixel-sharp."""
    return 1.0 / (1.0 + np.exp(np.clip(distance / max(edge, 1e-3), -50, 50)))


def render_image(class_name: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """One float image in [0, 1]: tissue background plus the class's lesion, then noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    image = 0.45 + 0.06 * _smooth_field(rng, size, 5) + 0.03 * _smooth_field(rng, size, 12)
    margin = 0.25 * size
    cy, cx = rng.uniform(margin, size - margin, size=2)
    if class_name == "cyst":
        radius = rng.uniform(0.13, 0.22) * size
        distance = np.hypot(yy - cy, xx - cx) - radius
        image = image * (1 - _soft_mask(distance, 1.0)) + 0.12 * _soft_mask(distance, 1.0)
    elif class_name == "tumor":
        radius = rng.uniform(0.14, 0.24) * size
        angle = np.arctan2(yy - cy, xx - cx)
        wobble = sum(rng.uniform(0.08, 0.2) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
                     for k in range(2, 6))
        distance = np.hypot(yy - cy, xx - cx) - radius * (1 + wobble)
        mask = _soft_mask(distance, 1.5)
        inside = 0.85 + 0.05 * _smooth_field(rng, size, 8)
        image = image * (1 - mask) + inside * mask
    elif class_name == "calcification":
        spread = rng.uniform(0.12, 0.25) * size
        for _ in range(int(rng.integers(5, 10))):
            dy, dx = rng.normal(0, spread, size=2)
            distance = np.hypot(yy - (cy + dy), xx - (cx + dx)) - rng.uniform(1.2, 2.6) * size / 96
            mask = _soft_mask(distance, 0.5)
            image = image * (1 - mask) + 0.97 * mask
    elif class_name != "normal tissue":
        raise ValueError(f"unknown demo class {class_name!r}")
    image = image + rng.normal(0, 0.035, size=image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _write_png8(path: Path, image: np.ndarray) -> None:
    path.write_bytes(_png_bytes(np.rint(image * 255).astype(np.uint8)))


def _write_png16(path: Path, image: np.ndarray) -> None:
    path.write_bytes(_png_bytes(np.rint(image * 65535).astype(np.uint16)))


def _write_dicom(path: Path, image: np.ndarray, patient: str, uid_key: str) -> None:
    """A single-frame CT slice; UIDs derive from the file's key so output is deterministic."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    hu = HU_LOW + image * (HU_HIGH - HU_LOW)
    stored = np.rint((hu - DICOM_INTERCEPT) / DICOM_SLOPE).astype(np.uint16)
    sop_uid = generate_uid(entropy_srcs=["clipsvd-demo", uid_key])
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["clipsvd-demo-study", patient])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["clipsvd-demo-series", uid_key])
    ds.Modality = "CT"
    ds.PatientID = patient
    ds.PatientName = patient
    ds.Rows, ds.Columns = stored.shape
    ds.PixelSpacing = [0.7, 0.7]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = DICOM_SLOPE
    ds.RescaleIntercept = DICOM_INTERCEPT
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _write_nifti(path: Path, image: np.ndarray) -> None:
    """NIfTI stores (x, y): transpose so viewers (and the preparation) show the PNG orientation."""
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.ascontiguousarray(image.T * 1000.0), affine=np.eye(4)), path)


def demo_images(demo: DemoConfig) -> Iterator[tuple[int, str, int, str, np.ndarray]]:
    """(class index, class name, number in class, patient, float image) of every image of the
    dataset, in the generator's order: one random stream for the whole dataset."""
    rng = numpy_rng(demo.seed)
    patient_number = 0
    for class_index, class_name in enumerate(CLASSES):
        remaining_in_patient = 0
        for i in range(demo.per_class):
            if remaining_in_patient == 0:  # each fake patient contributes 2 to 5 images
                patient_number += 1
                remaining_in_patient = int(rng.integers(2, 6))
            remaining_in_patient -= 1
            yield (class_index, class_name, i, f"patient{patient_number:03d}",
                   render_image(class_name, demo.image_size, rng))


def generate_demo_dataset(root: Path, demo: DemoConfig) -> None:
    """Write ``root/images/*`` and ``root/manifest.csv`` (path,label,group), atomically."""
    root = Path(root)
    rows: list[tuple[str, str, str]] = []
    with atomic_dir(root) as tmp:
        (tmp / "images").mkdir()
        for class_index, class_name, i, patient, image in demo_images(demo):
            slug = class_name.replace(" ", "_")
            kind = FORMATS[(i + class_index) % len(FORMATS)]
            relative = f"images/{slug}_{i:03d}{_EXTENSIONS[kind]}"
            target = tmp / relative
            if kind == "png8":
                _write_png8(target, image)
            elif kind == "png16":
                _write_png16(target, image)
            elif kind == "dicom":
                _write_dicom(target, image, patient, f"{demo.seed}/{relative}")
            else:
                _write_nifti(target, image)
            rows.append((relative, class_name, patient))
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(("path", "label", "group"))
            writer.writerows(rows)
    log.info("demo dataset: %d images of %d classes written to %s",
             len(rows), len(CLASSES), root)
