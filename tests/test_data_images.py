"""Image files as a viewer shows them, and files that cannot be read (issue 15, points 3 and 5).

Every PIL mode a PNG or TIFF export can hold is written, prepared, and compared with PIL's own
conversion of the same file; broken files (truncated, empty, DICOM without pixels, a
compression without decoder, 4D NIfTI) stop preparation with the reason, never an object
address.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image, ImageOps

from data_helpers import assert_prepare_fails_cleanly
from clipsvd.config import DatasetConfig, GroupsConfig, PreprocessingConfig
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.store import PreparedStore

from test_data_prepare import blob, write_dicom, write_manifest, write_png

SIDE = 12  # images are square and stored at their own size: the resize is the identity
RNG = np.random.default_rng(15)
RGB = RNG.integers(20, 200, (SIDE, SIDE, 3), dtype=np.uint8)
ALPHA = RNG.integers(0, 120, (SIDE, SIDE), dtype=np.uint8)  # low: it must not join the scaling


def _with_alpha() -> Image.Image:
    return Image.fromarray(np.dstack([RGB, ALPHA]), "RGBA")


# mode -> (how to make it, file type that keeps the mode, what PIL converts it to for viewing)
MODES = {
    "1": (lambda: Image.fromarray(RGB).convert("1"), "png", "L"),
    "L": (lambda: Image.fromarray(RGB).convert("L"), "png", "L"),
    "LA": (lambda: _with_alpha().convert("LA"), "png", "L"),
    "P": (lambda: Image.fromarray(RGB).convert("P", palette=Image.Palette.ADAPTIVE), "png",
          "RGB"),
    "PA": (lambda: _with_alpha().convert("PA"), "tif", "RGB"),
    "RGB": (lambda: Image.fromarray(RGB), "png", "RGB"),
    "RGBA": (_with_alpha, "png", "RGB"),
    "CMYK": (lambda: Image.fromarray(RGB).convert("CMYK"), "tif", "RGB"),
    "YCbCr": (lambda: Image.fromarray(RGB).convert("YCbCr"), "tif", "RGB"),
    "LAB": (lambda: Image.fromarray(RGB).convert("LAB"), "tif", "RGB"),
    "I": (lambda: Image.fromarray(RGB[..., 0].astype(np.int32) * 100_000 - 7), "tif", None),
    "I;16": (lambda: Image.fromarray(RGB[..., 0].astype(np.uint16) * 257), "png", None),
    "I;16B": (lambda: Image.frombytes("I;16B", (SIDE, SIDE),
                                      (RGB[..., 0].astype(">u2") * 300).tobytes()), "tif", None),
    "F": (lambda: Image.fromarray(RGB[..., 0].astype(np.float32) / 7 - 3), "tif", None),
}


def _scaled(values: np.ndarray) -> np.ndarray:
    """Percentile scaling with percentiles (0, 100): min-max to 0..255, rounded."""
    values = values.astype(np.float64)
    out = (values - values.min()) / (values.max() - values.min()) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _viewer_reference(path: Path, target: str | None) -> np.ndarray:
    """(rows, cols, 3) as PIL converts the file for display; numeric modes as their values."""
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        array = np.asarray(image if target is None else image.convert(target))
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=-1)
    return _scaled(array)


@pytest.fixture(scope="module")
def mode_store(tmp_path_factory) -> tuple[Path, PreparedStore]:
    root = tmp_path_factory.mktemp("modes") / "images"
    root.mkdir()
    lines = ["path,label"]
    for i, (mode, (make, suffix, _)) in enumerate(MODES.items()):
        image = make()
        assert image.mode == mode
        name = f"{mode.replace(';', '_')}.{suffix}"
        image.save(root / name)
        with Image.open(root / name) as back:
            assert back.mode == mode or (mode == "I;16B" and back.mode.startswith("I;16")), (
                mode, back.mode)
        lines.append(f"{name},{'ab'[i % 2]}")
    # A viewer turns a photo by its EXIF orientation (6: rotate 90 degrees clockwise).
    exif = Image.Exif()
    exif[0x0112] = 6
    wide = np.zeros((SIDE, SIDE, 3), np.uint8)
    wide[:3, :, 0] = 250  # a red top band becomes a red right band
    wide[3:, :, 2] = RNG.integers(30, 220, (SIDE - 3, SIDE))
    Image.fromarray(wide).save(root / "exif.png", exif=exif)
    lines.append("exif.png,a")
    write_manifest(root, lines)
    dataset = DatasetConfig(name="modes", format="csv", root=str(root), manifest="manifest.csv",
                            groups=GroupsConfig(independent=True),
                            preprocessing=PreprocessingConfig(intensity="percentile",
                                                              percentiles=(0, 100),
                                                              resize="stretch"))
    prepare_dataset(dataset, root.parent / "store", SIDE)
    return root, PreparedStore.open(root.parent / "store")


@pytest.mark.parametrize("mode", list(MODES))
def test_every_pil_mode_is_stored_as_pil_shows_it(mode_store, mode):
    """Catches (shown by removing the reader's converter): palette indices stored as grey
    (P, PA), CMYK/YCbCr/LAB channels taken as RGB, alpha joining the intensity scaling (LA,
    RGBA, PA). 1, L, RGB and the numeric modes (16/32-bit, float) pass either way: they guard
    that the conversion leaves what a viewer shows as is."""
    root, store = mode_store
    _, suffix, target = MODES[mode]
    name = f"{mode.replace(';', '_')}.{suffix}"
    stored = store.images[store.rows([name])[0]].transpose(1, 2, 0)
    expected = _viewer_reference(root / name, target)
    assert np.abs(stored.astype(int) - expected.astype(int)).max() == 0, mode


def test_exif_orientation_is_applied(mode_store):
    """Catches: a photo stored as the camera wrote it, not as a viewer turns it."""
    root, store = mode_store
    stored = store.images[store.rows(["exif.png"])[0]].transpose(1, 2, 0)
    assert np.array_equal(stored, _viewer_reference(root / "exif.png", "RGB"))
    assert (stored[:, -3:, 0] > 200).all() and (stored[:, :-3, 0] < 50).all()  # band at right


def test_palette_and_one_bit_pixels_keep_their_values(tmp_path):
    """The issue's case: a palette PNG whose pixels are (200, 30, 30) is not (0, 0, 0); and a
    1-bit white pixel is 255 without intensity scaling. Catches: the palette index stored
    instead of the colour, 1-bit images stored as 0/1."""
    root = tmp_path / "p"
    root.mkdir()
    red = Image.new("RGB", (8, 8), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    red.save(root / "red.png")
    bits = np.zeros((8, 8), np.uint8)
    bits[:, 4:] = 255
    Image.fromarray(bits).convert("1").save(root / "bits.png")
    write_manifest(root, ["path,label", "red.png,r", "bits.png,g"])
    dataset = DatasetConfig(name="p", format="csv", root=str(root), manifest="manifest.csv",
                            preprocessing=PreprocessingConfig(intensity="none"))
    prepare_dataset(dataset, tmp_path / "store", 8)
    store = PreparedStore.open(tmp_path / "store")
    assert store.images[store.rows(["red.png"])[0]][:, 4, 4].tolist() == [200, 30, 30]
    one_bit = store.images[store.rows(["bits.png"])[0]]
    assert (one_bit[:, :, 4:] == 255).all() and (one_bit[:, :, :4] == 0).all()


# ----------------------------------------------------------------------------- unreadable files


def _dataset(root: Path, bad: str) -> DatasetConfig:
    write_png(root / "ok.png", blob(0, 8))
    write_png(root / "ok2.png", blob(1, 8))
    write_manifest(root, ["path,label", "ok.png,x", "ok2.png,x", f"{bad},y"])
    return DatasetConfig(name="b", format="csv", root=str(root), manifest="manifest.csv")


def _truncated_png(root: Path) -> DatasetConfig:
    write_png(root / "full.png", blob(3, 32))
    data = (root / "full.png").read_bytes()
    (root / "cut.png").write_bytes(data[: len(data) // 2])
    return _dataset(root, "cut.png")


def _zero_bytes(root: Path) -> DatasetConfig:
    root.mkdir(parents=True)
    (root / "empty.png").write_bytes(b"")
    return _dataset(root, "empty.png")


def _dicom_without_pixels(root: Path) -> DatasetConfig:
    write_dicom(root / "report.dcm", np.zeros((8, 8)), pixels=False)
    return _dataset(root, "report.dcm")


def _jpeg_ls_dicom(root: Path) -> DatasetConfig:
    """A JPEG-LS DICOM: pydicom needs a plugin (pylibjpeg-libjpeg, pyjpegls or gdcm) for it."""
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEGLSLossless

    if get_decoder(JPEGLSLossless).is_available:
        pytest.skip("a JPEG-LS decoder is installed here")
    path = write_dicom(root / "jls.dcm", np.zeros((8, 8)))
    import pydicom

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = JPEGLSLossless
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(24)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return _dataset(root, "jls.dcm")


def _nifti_4d(root: Path) -> DatasetConfig:
    root.mkdir(parents=True)
    data = np.random.default_rng(0).random((8, 8, 5, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), root / "fmri.nii.gz")
    return _dataset(root, "fmri.nii.gz")


@pytest.mark.parametrize("make, reason", [
    (_truncated_png, "cut.png: cannot read the image (the PNG data is truncated or corrupt"),
    (_zero_bytes, "empty.png: cannot read the image (the file is empty (0 bytes))"),
    (_dicom_without_pixels, "report.dcm: cannot read the image (the DICOM file has no pixel "
                            "data"),
    (_jpeg_ls_dicom, "jls.dcm: cannot read the image (its pixel data is compressed as JPEG-LS "
                     "Lossless Image Compression (transfer syntax 1.2.840.10008.1.2.4.80) and "
                     "no installed package decodes it; install one of the decoders (gdcm"),
    (_nifti_4d, "fmri.nii.gz: cannot read the image (a 4D NIfTI (shape 8×8×5×4); clipsvd reads "
                "2D images and 3D volumes"),
])
def test_unreadable_files_say_why_in_one_line(tmp_path, make, reason):
    """Catches: MONAI's `applying transform <... object at 0x...>` as the reason, and a 4D
    NIfTI whose fourth axis becomes the colour channels."""
    dataset = make(tmp_path / "bad")
    assert_prepare_fails_cleanly(dataset, tmp_path, reason)
    with pytest.raises(Exception) as info:
        prepare_dataset(dataset, tmp_path / "out", 8)
    assert not re.search(r"0x[0-9a-fA-F]{4,}|object at|<[\w.]+ object", str(info.value))


def test_skipped_files_give_byte_identical_provenance(tmp_path):
    """With on_error: skip, the reasons go into provenance.json; two preparations of the same
    inputs write the same bytes. Catches: object addresses (or timings) in provenance.json."""
    dataset = _truncated_png(tmp_path / "d")
    (tmp_path / "d" / "empty.png").write_bytes(b"")
    write_manifest(tmp_path / "d", ["path,label", "ok.png,x", "ok2.png,x", "cut.png,y",
                                    "empty.png,y", "full.png,y"])
    dataset = DatasetConfig(name="b", format="csv", root=dataset.root, manifest="manifest.csv",
                            preprocessing=PreprocessingConfig(on_error="skip"))
    prepare_dataset(dataset, tmp_path / "one", 8)
    prepare_dataset(dataset, tmp_path / "two", 8)
    first = (tmp_path / "one" / "provenance.json").read_bytes()
    assert first == (tmp_path / "two" / "provenance.json").read_bytes()
    skipped = json.loads(first)["skipped"]
    assert [s["sample_id"] for s in skipped] == ["cut.png", "empty.png"]
    assert not re.search(r"0x[0-9a-f]{6,}", first.decode())
