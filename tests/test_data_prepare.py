"""Sources and preparation: formats, intensity, orientation, splits, and user errors."""
from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from data_helpers import assert_prepare_fails_cleanly
from clipsvd.config import DatasetConfig, PreprocessingConfig, SplitConfig
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.sources import read_source
from clipsvd.data.store import PreparedStore
from clipsvd.errors import DataError


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def write_dicom(path: Path, stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0,
                pixels: bool = True) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.Rows, ds.Columns = stored.shape
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [0, 0, 0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if pixels:
        ds.PixelData = stored.astype(np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_manifest(root: Path, lines: list[str]) -> None:
    (root / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")


def csv_dataset(root: Path, **pre) -> DatasetConfig:
    return DatasetConfig(name="t", format="csv", root=str(root), manifest="manifest.csv",
                         preprocessing=PreprocessingConfig(**pre))


def blob(seed: int, size: int = 16) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size), dtype=np.uint8)


def prepared(dataset: DatasetConfig, tmp_path: Path, size: int = 16) -> PreparedStore:
    out = tmp_path / "prepared"
    prepare_dataset(dataset, out, size)
    return PreparedStore.open(out)


def test_folder_format_with_spaces_and_non_ascii(tmp_path):
    root = tmp_path / "my data ü"
    for i in range(3):
        write_png(root / "Ärger class" / f"bild {i}.png", blob(i))
        write_png(root / "b class" / "sub dir" / f"é {i}.png", blob(10 + i))
    (root / "b class" / "notes.txt").write_text("ignored")
    dataset = DatasetConfig(name="f", format="folder", root=str(root))
    table = read_source(dataset)
    assert sorted(set(table["class_name"])) == ["b class", "Ärger class"]
    assert table.groupby("class_name")["label"].first().to_dict() == {"b class": 0,
                                                                      "Ärger class": 1}
    assert all(Path(p).is_file() for p in table["source_path"])
    store = prepared(dataset, tmp_path)
    assert store.images.shape == (6, 3, 16, 16) and store.images.dtype == np.uint8
    assert store.classes == ["b class", "Ärger class"]
    assert "Ärger class/bild 0.png" in set(store.index["sample_id"])
    assert set(store.index["split"]) <= {"train", "val", "test"}
    assert store.rows(["Ärger class/bild 0.png"]).tolist() == [
        int(np.flatnonzero(store.index["sample_id"] == "Ärger class/bild 0.png")[0])]


def test_png_16bit_rgb_and_orientation(tmp_path):
    root = tmp_path / "d"
    gradient = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))  # bright at right
    write_png(root / "g16.png", gradient)
    rgb = np.zeros((16, 16, 3), dtype=np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 50, 10
    rgb[:4, :4] = 255  # a white top-left corner shows the orientation
    write_png(root / "rgb.png", rgb)
    write_manifest(root, ["path,label", "g16.png,a", "rgb.png,b"])
    store = prepared(csv_dataset(root, intensity="percentile", percentiles=(0, 100)), tmp_path)
    g16 = store.images[store.rows(["g16.png"])[0]]
    assert g16.min() == 0 and g16.max() == 255
    assert (np.diff(g16[0].astype(int), axis=1) > 0).all()  # rises along columns, as stored
    assert (g16[0] == g16[1]).all() and (g16[1] == g16[2]).all()
    out = prepared(csv_dataset(root, intensity="none"), tmp_path / "none")
    colour = out.images[out.rows(["rgb.png"])[0]]
    assert colour[:, 8, 8].tolist() == [200, 50, 10]
    assert colour[:, 0, 0].tolist() == [255, 255, 255] and colour[:, 15, 15].tolist() != [255] * 3


def test_dicom_rescale_and_ct_window_bounds(tmp_path):
    root = tmp_path / "ct"
    hu = np.full((16, 16), 40.0)
    hu[:, :4] = -160.0  # abdomen window bottom -> 0
    hu[:, -4:] = 240.0  # abdomen window top -> 255
    hu[:2, 4:12] = -1000.0  # air, below the window -> 0
    slope, intercept = 0.5, -1024.0
    write_dicom(root / "slice.dcm", np.rint((hu - intercept) / slope), slope, intercept)
    write_png(root / "same.png", np.zeros((16, 16), np.uint8))
    write_manifest(root, ["path,label", "slice.dcm,x", "same.png,y"])
    store = prepared(csv_dataset(root, intensity="window", window="abdomen"), tmp_path)
    image = store.images[store.rows(["slice.dcm"])[0]]
    assert (image[:, :, :4] == 0).all() and (image[:, :, -4:] == 255).all()
    assert (image[:, :2, 4:12] == 0).all()
    assert (image[:, 8, 8] == 128).all()  # 40 HU is the middle of (-160, 240)
    explicit = prepared(csv_dataset(root, intensity="window", window=[-160, 240]),
                        tmp_path / "explicit")
    assert np.array_equal(explicit.images[0], store.images[0])
    transforms = [step["transform"] for step in store.provenance["transforms"]]
    assert "ScaleIntensityRanged" in transforms and "LoadImaged" in transforms


def test_dicom_and_png_share_orientation(tmp_path):
    root = tmp_path / "o"
    array = np.zeros((12, 20), dtype=np.uint8)
    array[:3, :5] = 200  # top-left, non-square image
    write_png(root / "a.png", array)
    write_dicom(root / "a.dcm", array.astype(np.uint16))
    nib.save(nib.Nifti1Image(array.T.astype(np.float32), np.eye(4)), root / "a.nii.gz")
    write_manifest(root, ["path,label", "a.png,p", "a.dcm,d", "a.nii.gz,n"])
    store = prepared(csv_dataset(root, intensity="none", resize="stretch"), tmp_path, size=20)
    png, dcm, nii = (store.images[store.rows([i])[0]] for i in ("a.png", "a.dcm", "a.nii.gz"))
    assert np.array_equal(png, dcm) and np.array_equal(png, nii)
    assert png[0, 0, 0] == 200 and png[0, -1, -1] == 0


def test_resize_pad_and_crop_keep_aspect(tmp_path):
    root = tmp_path / "r"
    write_png(root / "wide.png", np.full((10, 20), 200, dtype=np.uint8))
    write_png(root / "tall.png", np.full((20, 10), 100, dtype=np.uint8))
    write_manifest(root, ["path,label", "wide.png,w", "tall.png,t"])
    pad = prepared(csv_dataset(root, intensity="none", resize="pad"), tmp_path / "pad")
    assert pad.images.shape == (2, 3, 16, 16)
    assert (pad.images[0, :, :3] == 0).all() and (pad.images[0, :, 5:11] == 200).all()
    crop = prepared(csv_dataset(root, intensity="none", resize="crop"), tmp_path / "crop")
    assert (crop.images[0] == 200).all()


def test_nifti_2d_and_3d_slice_policies(tmp_path):
    root = tmp_path / "n"
    root.mkdir()
    volume = np.stack([np.full((8, 8), 50.0 * z) for z in range(5)], axis=-1)  # (x, y, z)
    nib.save(nib.Nifti1Image(volume.astype(np.float32), np.eye(4)), root / "vol.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8), 7.0, np.float32), np.eye(4)), root / "flat.nii")
    write_manifest(root, ["path,label,group", "vol.nii.gz,v,", "flat.nii,f,"])
    center = prepared(csv_dataset(root, intensity="none"), tmp_path / "c", size=8)
    assert center.index["sample_id"].tolist() == ["vol.nii.gz#z002", "flat.nii"]
    assert (center.images[0] == 100).all() and (center.images[1] == 7).all()
    every = prepared(csv_dataset(root, intensity="none", slices="every_k", slice_step=2),
                     tmp_path / "k", size=8)
    volume_rows = every.index[every.index["source_path"].str.endswith("vol.nii.gz")]
    assert volume_rows["sample_id"].tolist() == [f"vol.nii.gz#z{z:03d}" for z in (0, 2, 4)]
    assert set(volume_rows["group"]) == {"vol.nii.gz"}
    assert len(set(volume_rows["split"])) == 1  # one volume, one split
    assert [int(every.images[i].max()) for i in volume_rows.index] == [0, 100, 200]
    everything = prepared(csv_dataset(root, intensity="none", slices="all"),
                          tmp_path / "a", size=8)
    assert len(everything.index) == 6


def grouped_dataset(tmp_path: Path, seed: int = 0) -> DatasetConfig:
    root = tmp_path / "g"
    if not root.exists():
        lines = ["path,label,group,site"]
        for c, name in enumerate(("alpha", "beta", "gamma")):
            for i in range(24):
                write_png(root / f"{name}_{i}.png", blob(100 * c + i, 8))
                lines.append(f"{name}_{i}.png,{name},pat{c}_{i // 3},s{i % 2}")
        write_manifest(root, lines)
    return DatasetConfig(name="g", format="csv", root=str(root), manifest="manifest.csv",
                         split=SplitConfig(fractions=(0.6, 0.2, 0.2), seed=seed))


def test_grouped_split_is_stratified_deterministic_and_keeps_groups(tmp_path):
    dataset = grouped_dataset(tmp_path)
    prepare_dataset(dataset, tmp_path / "p1", 8)
    prepare_dataset(dataset, tmp_path / "p2", 8)
    index = PreparedStore.open(tmp_path / "p1").index
    assert index.groupby("group")["split"].nunique().max() == 1
    per_class = index.groupby(["class_name", "split"]).size().unstack()
    assert (per_class["train"] > per_class["val"]).all() and (per_class["test"] > 0).all()
    assert "site" in index.columns
    for name in ("index.csv", "images.npy", "classes.json"):
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()
    other = grouped_dataset(tmp_path, seed=5)
    prepare_dataset(other, tmp_path / "p3", 8)
    assert PreparedStore.open(tmp_path / "p3").index["split"].tolist() != index["split"].tolist()


def test_split_column_of_the_source_is_kept(tmp_path):
    root = tmp_path / "s"
    for i in range(4):
        write_png(root / f"{i}.png", blob(i, 8))
    write_manifest(root, ["path,label,split", "0.png,a,train", "1.png,a,Validation",
                          "2.png,b,test", "3.png,b,train"])
    store = prepared(csv_dataset(root), tmp_path, size=8)
    assert store.index["split"].tolist() == ["train", "val", "test", "train"]


def _bad_folder_duplicate(root: Path) -> DatasetConfig:
    write_png(root / "Tumor" / "a.png", blob(0, 8))
    write_png(root / "tumor " / "b.png", blob(1, 8))
    return DatasetConfig(name="b", format="folder", root=str(root))


def _bad_empty_class(root: Path) -> DatasetConfig:
    write_png(root / "full" / "a.png", blob(0, 8))
    (root / "empty").mkdir()
    return DatasetConfig(name="b", format="folder", root=str(root))


def _bad_no_images(root: Path) -> DatasetConfig:
    root.mkdir(parents=True)
    return DatasetConfig(name="b", format="folder", root=str(root))


def _bad_missing_file(root: Path) -> DatasetConfig:
    write_png(root / "a.png", blob(0, 8))
    write_manifest(root, ["path,label", "a.png,x", "gone.png,y"])
    return csv_dataset(root)


def _bad_duplicate_row(root: Path) -> DatasetConfig:
    write_png(root / "a.png", blob(0, 8))
    write_manifest(root, ["path,label", "a.png,x", "./a.png,y"])
    return csv_dataset(root)


def _bad_label_gap(root: Path) -> DatasetConfig:
    write_png(root / "a.png", blob(0, 8))
    write_png(root / "b.png", blob(1, 8))
    write_manifest(root, ["path,label,class_name", "a.png,0,cat", "b.png,2,dog"])
    return csv_dataset(root)


def _bad_corrupt_png(root: Path) -> DatasetConfig:
    write_png(root / "ok.png", blob(0, 8))
    root.joinpath("broken.png").write_bytes(b"\x89PNG not really")
    write_manifest(root, ["path,label", "ok.png,x", "broken.png,y"])
    return csv_dataset(root)


def _bad_dicom_without_pixels(root: Path) -> DatasetConfig:
    write_png(root / "ok.png", blob(0, 8))
    write_dicom(root / "empty.dcm", np.zeros((8, 8)), pixels=False)
    write_manifest(root, ["path,label", "ok.png,x", "empty.dcm,y"])
    return csv_dataset(root)


@pytest.mark.parametrize("make, named", [
    (_bad_folder_duplicate, "differ only in case"),
    (_bad_empty_class, "empty"),
    (_bad_no_images, "no class folders"),
    (_bad_missing_file, "gone.png"),
    (_bad_label_gap, "label 1 is not in the class list"),
    (_bad_duplicate_row, "line 3 lists"),
    (_bad_corrupt_png, "broken.png"),
    (_bad_dicom_without_pixels, "empty.dcm"),
])
def test_bad_inputs_raise_one_line_and_leave_no_output(tmp_path, make, named):
    assert_prepare_fails_cleanly(make(tmp_path / "bad"), tmp_path, named)


def test_missing_root_and_manifest(tmp_path):
    with pytest.raises(DataError, match="root folder not found"):
        read_source(DatasetConfig(name="m", format="folder", root=str(tmp_path / "nowhere")))
    tmp_path.joinpath("r").mkdir()
    with pytest.raises(DataError, match="manifest.csv: manifest file not found"):
        read_source(csv_dataset(tmp_path / "r"))


def test_skip_mode_lists_skipped_files(tmp_path, caplog):
    dataset = _bad_corrupt_png(tmp_path / "skip")
    dataset = csv_dataset(Path(dataset.root), on_error="skip")
    with caplog.at_level(logging.WARNING, logger="clipsvd.data.prepare"):
        store = prepared(dataset, tmp_path, size=8)
    assert store.index["sample_id"].tolist() == ["ok.png"]
    assert [Path(s["source_path"]).name for s in store.provenance["skipped"]] == ["broken.png"]
    assert "broken.png" in caplog.text
    assert store.classes == ["x", "y"]  # the class list does not shrink with a skipped file


def test_store_open_errors(tmp_path):
    with pytest.raises(DataError, match="clipsvd prepare"):
        PreparedStore.open(tmp_path / "missing")
    tmp_path.joinpath("half").mkdir()
    tmp_path.joinpath("half", "index.csv").write_text("sample_id\n")
    with pytest.raises(DataError, match="lacks images.npy"):
        PreparedStore.open(tmp_path / "half")
