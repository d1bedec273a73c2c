"""Source formats beyond folders and CSV: MedMNIST npz, CoOp split JSON, DICOM series folders;
and the preparation fingerprint that decides when a prepared store is rebuilt."""
from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest

from data_helpers import assert_prepare_fails_cleanly
from clipsvd.config import (ConfigError, DatasetConfig, MedmnistConfig, PreprocessingConfig,
                            SamplingConfig, SplitConfig, from_dict)
from clipsvd.data.npz import NpzFile
from clipsvd.data.fingerprint import (PREPARATION_FIELDS, UNRELATED_FIELDS,
                                      preparation_fingerprint, preparation_parameters)
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.sources import index_files, medmnist_labels, read_source
from clipsvd.data.store import PreparedStore
from clipsvd.errors import DataError

from test_data_prepare import blob, write_dicom, write_png

# ----------------------------------------------------------------------------- MedMNIST


def write_npz(path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray],
              compressed: bool = True) -> Path:
    """A MedMNIST-style file: <split>_images and <split>_labels (N×1) for every split."""
    arrays = {f"{split}_images": images[split] for split in images}
    arrays.update({f"{split}_labels": labels[split] for split in labels})
    path.parent.mkdir(parents=True, exist_ok=True)
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    return path


def medmnist_2d(root: Path, flag: str, size: int, rgb: bool, n_classes: int,
                counts=(6, 3, 3)) -> Path:
    """Images whose top-left corner is white (orientation) and whose centre value is 10*label."""
    images, labels = {}, {}
    for split, n in zip(("train", "val", "test"), counts):
        label = (np.arange(n) % n_classes).astype(np.uint8)
        shape = (n, size, size, 3) if rgb else (n, size, size)
        array = np.zeros(shape, dtype=np.uint8)
        array[:, size // 4:, size // 4:] = (10 * label)[:, None, None, *([None] if rgb else [])]
        array[:, :size // 4, :size // 4] = 255
        if rgb:
            array[:, size // 4:, size // 4:, 1] = 100  # green differs: channel order shows
        images[split], labels[split] = array, label[:, None]
    name = f"{flag}.npz" if size == 28 else f"{flag}_{size}.npz"
    return write_npz(root / name, images, labels)


def medmnist_dataset(root: Path, flag: str, size: int = 28, **pre) -> DatasetConfig:
    return DatasetConfig(name="m", format="medmnist", root=str(root),
                         medmnist=MedmnistConfig(flag=flag, size=size),
                         preprocessing=PreprocessingConfig(**{"intensity": "none", **pre}))


def prepared(dataset: DatasetConfig, out: Path, size: int = 16) -> PreparedStore:
    prepare_dataset(dataset, out, size)
    return PreparedStore.open(out)


def test_medmnist_2d_grey_28(tmp_path):
    medmnist_2d(tmp_path / "mm", "pneumoniamnist", 28, rgb=False, n_classes=2)
    dataset = medmnist_dataset(tmp_path / "mm", "pneumoniamnist", resize="stretch")
    table = read_source(dataset)
    assert table["sample_id"].tolist()[:2] == ["train/000000", "train/000001"]
    store = prepared(dataset, tmp_path / "p", size=28)
    assert store.images.shape == (12, 3, 28, 28)
    assert store.classes == ["normal", "pneumonia"]
    assert store.index["split"].tolist() == ["train"] * 6 + ["val"] * 3 + ["test"] * 3
    assert store.index["sample_id"].tolist()[6:8] == ["val/000000", "val/000001"]
    assert store.index["group"].tolist() == store.index["sample_id"].tolist()
    assert store.index["label"].tolist()[:4] == [0, 1, 0, 1]
    image = store.images[store.rows(["train/000001"])[0]]
    assert (image[:, :7, :7] == 255).all() and (image[:, 20, 20] == 10).all()
    assert (image[:, 2, 20] == 0).all()  # top-right stays dark: rows are rows
    for name in ("array_key", "array_index", "array_layout"):
        assert name not in store.index.columns
    assert store.provenance["source"]["medmnist"] == {"flag": "pneumoniamnist", "size": 28}
    assert store.provenance["n_files"] == 1 and store.provenance["n_samples"] == 12


def test_medmnist_2d_rgb_64_keeps_all_classes(tmp_path):
    medmnist_2d(tmp_path / "mm", "bloodmnist", 64, rgb=True, n_classes=3)
    store = prepared(medmnist_dataset(tmp_path / "mm", "bloodmnist", size=64), tmp_path / "p",
                     size=32)
    assert store.images.shape == (12, 3, 32, 32)
    assert store.classes == medmnist_labels("bloodmnist") and len(store.classes) == 8
    assert set(store.index["label"]) == {0, 1, 2}  # classes 3..7 have no images, keep names
    image = store.images[store.rows(["test/000002"])[0]]
    assert image[:, 20, 20].tolist() == [20, 100, 20]  # R, G, B in order
    assert (image[:, 2, 2] == 255).all()


def test_medmnist_3d_slices_grouped_by_volume(tmp_path):
    depth, side = 6, 8
    images, labels = {}, {}
    for split, n in (("train", 4), ("val", 2), ("test", 2)):
        volume = np.zeros((n, depth, side, side), dtype=np.uint8)
        for z in range(depth):
            volume[:, z] = 40 * z  # slice z has value 40*z
        volume[:, :, 0, :] = 255  # the first image row of every slice: orientation
        images[split] = volume
        labels[split] = (np.arange(n) % 2)[:, None].astype(np.uint8)
    write_npz(tmp_path / "mm" / "nodulemnist3d.npz", images, labels)
    dataset = medmnist_dataset(tmp_path / "mm", "nodulemnist3d", slices="every_k", slice_step=2)
    store = prepared(dataset, tmp_path / "p", size=8)
    assert len(store.index) == 8 * 3
    volume_rows = store.index[store.index["group"] == "train/000001"]
    assert volume_rows["sample_id"].tolist() == [f"train/000001#z{z:03d}" for z in (0, 2, 4)]
    assert set(volume_rows["split"]) == {"train"}
    assert store.index.groupby("group")["split"].nunique().max() == 1
    slices = [store.images[i] for i in volume_rows.index]
    assert [int(s[0, 4, 4]) for s in slices] == [0, 80, 160]
    assert all((s[:, 0, :] == 255).all() and (s[:, 1:, :] != 255).all() for s in slices)
    assert store.classes == ["benign", "malignant"]
    center = prepared(replace(dataset, preprocessing=PreprocessingConfig(intensity="none")),
                      tmp_path / "c", size=8)
    assert center.index["sample_id"].tolist()[0] == "train/000000#z003"


def test_npz_rows_stream_like_the_array(tmp_path):
    array = np.random.default_rng(0).integers(0, 256, (50, 7, 5), dtype=np.uint8)
    for compressed in (True, False):
        path = write_npz(tmp_path / f"a{compressed}.npz", {"train": array}, {}, compressed)
        with NpzFile(path) as npz:
            assert npz.header("train_images")[0] == (50, 7, 5)
            assert np.array_equal(np.stack(list(npz.rows("train_images"))), array)
            assert np.array_equal(np.stack(list(npz.rows("train_images", 47))), array[47:])


def test_shipped_label_names_match_medmnist_info():
    """The package's copy of the label names against the official INFO dict of the pinned
    medmnist release (a test dependency, so this runs everywhere). Catches an edited, reordered
    or missing name in resources/medmnist_labels.json."""
    from medmnist.info import INFO as info

    for flag, entry in info.items():
        labels = entry["label"]
        assert medmnist_labels(flag) == [labels[str(i)] for i in range(len(labels))]


# ----------------------------------------------------------------------------- CoOp split JSON

COOP_CLASSES = ["glioma_tumor", "meningioma tumor", "Normal brain"]  # label order, not sorted


def coop_dataset(root: Path, layout: str = "coop", split_name: str = "BTMRI",
                 entries: dict | None = None) -> Path:
    """root/split_<NAME>.json with images under root/<NAME>/ (CoOp) or root/ ('flat')."""
    image_root = root / split_name if layout == "coop" else root
    split = {"train": [], "val": [], "test": []}
    for label, name in enumerate(COOP_CLASSES):
        for i, part in enumerate(["train"] * 4 + ["val"] * 2 + ["test"] * 2):
            rel = f"{name.replace(' ', '_')}/img {i}.png"
            write_png(image_root / rel, blob(10 * label + i, 12))
            split[part].append([rel, label, name])
    root.mkdir(parents=True, exist_ok=True)
    (root / f"split_{split_name}.json").write_text(json.dumps(entries or split), "utf-8")
    return root


def test_coop_json_dataset(tmp_path):
    root = coop_dataset(tmp_path / "BTMRI")
    dataset = DatasetConfig(name="btmri", format="coop_json", root=str(root))
    store = prepared(dataset, tmp_path / "p", size=12)
    assert store.classes == COOP_CLASSES  # label order, names as given
    assert store.images.shape == (24, 3, 12, 12)
    counts = store.index.groupby("split").size().to_dict()
    assert counts == {"train": 12, "val": 6, "test": 6}
    row = store.index[store.index["sample_id"] == "BTMRI/Normal_brain/img 5.png"].iloc[0]
    assert (row["label"], row["class_name"], row["split"]) == (2, "Normal brain", "val")
    assert store.provenance["split"] == {"assigned": False, "from": "source",
                                         "groups_in_several_splits": {"count": 0,
                                                                      "examples": []}}


def test_coop_json_flat_layout_explicit_file_and_image_dir(tmp_path):
    flat = coop_dataset(tmp_path / "flat", layout="flat", split_name="X")
    table = read_source(DatasetConfig(name="f", format="coop_json", root=str(flat)))
    assert len(table) == 24 and all(Path(p).is_file() for p in table["source_path"])
    root = coop_dataset(tmp_path / "two", split_name="A")
    (root / "split_B.json").write_text((root / "split_A.json").read_text("utf-8"), "utf-8")
    with pytest.raises(DataError, match="several split files"):
        read_source(DatasetConfig(name="t", format="coop_json", root=str(root)))
    chosen = read_source(DatasetConfig(name="t", format="coop_json", root=str(root),
                                       split_file="split_B.json", image_dir="A"))
    assert len(chosen) == 24


def test_coop_json_config_keys():
    raw = {"study": "s", "datasets": [
        {"name": "a", "format": "coop_json", "root": "/d", "split_file": "split_A.json"},
        {"name": "b", "format": "medmnist", "root": "/m", "medmnist": {"flag": "pathmnist"}}]}
    study = from_dict(raw)
    assert study.dataset("a").split_file == "split_A.json"
    assert study.dataset("b").medmnist == MedmnistConfig(flag="pathmnist", size=28)
    bad = [
        ({"name": "c", "format": "medmnist", "root": "/m"}, "needs medmnist"),
        ({"name": "c", "format": "folder", "root": "/m", "split_file": "split_A.json"},
         "only format 'coop_json'"),
        ({"name": "c", "format": "medmnist", "root": "/m",
          "medmnist": {"flag": "pathmnist", "size": 32}}, "medmnist.size"),
        ({"name": "c", "format": "medmnist", "root": "/m", "medmnist": {"flag": "nomnist"}},
         "medmnist.flag"),
    ]
    for dataset, message in bad:
        with pytest.raises(ConfigError, match=message):
            from_dict({"study": "s", "datasets": [dataset]})


# ----------------------------------------------------------------------------- DICOM series


def write_series(folder: Path, depth: int, uid: str | None = None, start: int = 0) -> Path:
    """A one-series folder: slice z holds 100*z, written in reverse file-name order."""
    import pydicom
    from pydicom.uid import generate_uid

    uid = uid or generate_uid()
    for z in range(depth):
        stored = np.full((8, 8), start + 100 * z, dtype=np.uint16)
        stored[0, :] = 4000  # first image row: orientation
        path = write_dicom(folder / f"slice {depth - z:02d}.dcm", stored)
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = uid
        ds.InstanceNumber = z + 1
        ds.ImagePositionPatient = [0.0, 0.0, float(z)]
        ds.save_as(path)
    return folder


def test_dicom_series_folders_become_volumes(tmp_path):
    root = tmp_path / "ct"
    write_series(root / "tumor" / "patient 1", 5)
    write_series(root / "tumor" / "patient 2", 4)
    write_series(root / "normal" / "patient 3", 3)
    write_dicom(root / "normal" / "single.dcm", np.full((6, 8), 50, np.uint16))
    write_series(root / "normal" / "mixed", 1)  # two files of two series: two 2D samples
    write_series(root / "normal" / "mixed", 1, start=7)
    (root / "normal" / "mixed" / "slice 01.dcm").rename(root / "normal" / "mixed" / "b.dcm")
    write_series(root / "normal" / "mixed", 1)
    dataset = DatasetConfig(name="s", format="folder", root=str(root),
                            preprocessing=PreprocessingConfig(intensity="window",
                                                              window=[0, 500], slices="all"),
                            split=SplitConfig(fractions=(0.5, 0.25, 0.25)))
    table = read_source(dataset)
    assert sorted(Path(p).name for p in table["source_path"]) == [
        "b.dcm", "patient 1", "patient 2", "patient 3", "single.dcm", "slice 01.dcm"]
    store = prepared(dataset, tmp_path / "p", size=8)
    rows = store.index[store.index["group"] == "tumor/patient 1"]
    assert rows["sample_id"].tolist() == [f"tumor/patient 1#z{z:03d}" for z in range(5)]
    assert len(set(rows["split"])) == 1
    assert store.index.groupby("group")["split"].nunique().max() == 1
    values = [int(store.images[i][0, 4, 4]) for i in rows.index]
    assert values == [0, 51, 102, 153, 204]  # sorted by position, 100 HU steps of 500
    assert all((store.images[i][:, 0, :] == 255).all() for i in rows.index)
    assert len(store.index) == 5 + 4 + 3 + 3
    manifest = root / "manifest.csv"
    manifest.write_text("path,label\ntumor/patient 1,t\nnormal/patient 3,n\n", "utf-8")
    csv = prepared(replace(dataset, format="csv", manifest="manifest.csv"), tmp_path / "c", 8)
    assert csv.index["group"].tolist() == ["tumor/patient 1"] * 5 + ["normal/patient 3"] * 3


# ----------------------------------------------------------------------------- bad input


def _missing_npz(root: Path) -> DatasetConfig:
    medmnist_2d(root, "pathmnist", 28, rgb=True, n_classes=9)
    return medmnist_dataset(root, "pathmnist", size=64)


def _multi_label_flag(root: Path) -> DatasetConfig:
    medmnist_2d(root, "chestmnist", 28, rgb=False, n_classes=2)
    return medmnist_dataset(root, "chestmnist")


def _multi_label_array(root: Path) -> DatasetConfig:
    images = {s: np.zeros((4, 28, 28), np.uint8) for s in ("train", "val", "test")}
    labels = {s: np.zeros((4, 3), np.uint8) for s in ("train", "val", "test")}
    write_npz(root / "breastmnist.npz", images, labels)
    return medmnist_dataset(root, "breastmnist")


def _medmnist_label_without_name(root: Path) -> DatasetConfig:
    images = {s: np.zeros((3, 28, 28), np.uint8) for s in ("train", "val", "test")}
    labels = {s: np.array([[0], [1], [0]], np.uint8) for s in ("train", "val", "test")}
    labels["test"][2] = 2  # breastmnist has labels 0 and 1 only
    write_npz(root / "breastmnist.npz", images, labels)
    return medmnist_dataset(root, "breastmnist")


def _medmnist_wrong_shape(root: Path) -> DatasetConfig:
    images = {s: np.zeros((3, 28, 28, 2), np.uint8) for s in ("train", "val", "test")}
    labels = {s: np.zeros((3, 1), np.uint8) for s in ("train", "val", "test")}
    write_npz(root / "breastmnist.npz", images, labels)
    return medmnist_dataset(root, "breastmnist")


def _medmnist_not_a_zip(root: Path) -> DatasetConfig:
    root.mkdir(parents=True)
    (root / "breastmnist.npz").write_bytes(b"not an npz")
    return medmnist_dataset(root, "breastmnist")


def _coop_split(root: Path, **change) -> DatasetConfig:
    coop_dataset(root)
    if change:
        path = root / "split_BTMRI.json"
        split = json.loads(path.read_text("utf-8"))
        for key, value in change.items():
            split[key] = value
        path.write_text(json.dumps(split), "utf-8")
    return DatasetConfig(name="c", format="coop_json", root=str(root))


def _coop_missing_split_file(root: Path) -> DatasetConfig:
    coop_dataset(root)
    return DatasetConfig(name="c", format="coop_json", root=str(root),
                         split_file="split_OTHER.json")


def _coop_no_split_file(root: Path) -> DatasetConfig:
    coop_dataset(root)
    (root / "split_BTMRI.json").unlink()
    return DatasetConfig(name="c", format="coop_json", root=str(root))


def _coop_label_without_name(root: Path) -> DatasetConfig:
    return _coop_split(root, test=[["glioma_tumor/img 6.png", 0]])


def _coop_label_gap(root: Path) -> DatasetConfig:
    return _coop_split(root, test=[["glioma_tumor/img 6.png", 4, "astrocytoma"]])


def _coop_two_names(root: Path) -> DatasetConfig:
    return _coop_split(root, test=[["glioma_tumor/img 6.png", 0, "glioma"]])


def _coop_missing_image(root: Path) -> DatasetConfig:
    return _coop_split(root, val=[["glioma_tumor/gone.png", 0, "glioma_tumor"]])


def _coop_missing_key(root: Path) -> DatasetConfig:
    dataset = _coop_split(root)
    path = root / "split_BTMRI.json"
    split = json.loads(path.read_text("utf-8"))
    del split["val"]
    path.write_text(json.dumps(split), "utf-8")
    return dataset


@pytest.mark.parametrize("make, named", [
    (_missing_npz, "pathmnist_64.npz: MedMNIST file not found"),
    (_multi_label_flag, "chestmnist.npz: chestmnist is a multi-label"),
    (_multi_label_array, "breastmnist.npz: train_labels has shape (4, 3)"),
    (_medmnist_label_without_name, "breastmnist.npz: test_labels holds label 2, which has no name"),
    (_medmnist_wrong_shape, "breastmnist.npz: train_images has shape (3, 28, 28, 2)"),
    (_medmnist_not_a_zip, "breastmnist.npz: not a readable .npz"),
    (_coop_missing_split_file, "split_OTHER.json: split file not found"),
    (_coop_no_split_file, "no split_<NAME>.json found"),
    (_coop_label_without_name, "split_BTMRI.json: entry 0 of 'test'"),
    (_coop_label_gap, "split_BTMRI.json: labels must be 0..3 with no gaps; label 3 has no entry"),
    (_coop_two_names, "split_BTMRI.json: label 0 is named both"),
    (_coop_missing_image, "gone.png"),
    (_coop_missing_key, "split_BTMRI.json: needs a list under 'val'"),
])
def test_bad_format_inputs_raise_one_line_and_leave_no_output(tmp_path, make, named):
    assert_prepare_fails_cleanly(make(tmp_path / "bad"), tmp_path, named)


# ----------------------------------------------------------------------------- rebuilds


def test_index_files_name_the_file_listing_the_samples(tmp_path):
    medmnist_2d(tmp_path / "mm", "bloodmnist", 64, rgb=True, n_classes=3)
    assert index_files(medmnist_dataset(tmp_path / "mm", "bloodmnist", size=64)) == [
        str(tmp_path / "mm" / "bloodmnist_64.npz")]
    assert index_files(medmnist_dataset(tmp_path / "mm", "bloodmnist")) == []
    root = coop_dataset(tmp_path / "c")
    assert index_files(DatasetConfig(name="c", format="coop_json", root=str(root))) == [
        str(root / "split_BTMRI.json")]
    assert index_files(DatasetConfig(name="f", format="folder", root=str(root))) == []


def test_every_dataset_field_is_classified_for_preparation():
    names = {f.name for f in fields(DatasetConfig)}
    assert names <= set(PREPARATION_FIELDS) | set(UNRELATED_FIELDS)
    assert not set(PREPARATION_FIELDS) & set(UNRELATED_FIELDS)


def test_preparation_fingerprint_follows_preparation_parameters_only(tmp_path):
    base = DatasetConfig(name="d", format="csv", root="data/d", manifest="m.csv")
    fingerprint = preparation_fingerprint(base, 224)
    assert fingerprint == preparation_fingerprint(replace(base), 224)
    relevant = [
        replace(base, preprocessing=PreprocessingConfig(intensity="zscore")),
        replace(base, preprocessing=PreprocessingConfig(slices="all")),
        replace(base, split=SplitConfig(seed=1)),
        replace(base, root="data/other"),
        replace(base, manifest="n.csv"),
        replace(base, format="medmnist", medmnist=MedmnistConfig("pathmnist", 64)),
        replace(base, format="coop_json", split_file="split_X.json"),
    ]
    for changed in relevant:
        assert preparation_fingerprint(changed, 224) != fingerprint, changed
    assert preparation_fingerprint(base, 196) != fingerprint
    unrelated = [replace(base, name="e"), replace(base, templates=("an image of {}.",)),
                 replace(base, sampling=SamplingConfig(nested=True)),
                 replace(base, settings=("few_shot",))]  # one store for every setting
    if "overrides" in {f.name for f in fields(DatasetConfig)}:
        unrelated.append(replace(base, overrides={"clip_svd": {"lr": 0.1}}))
    for changed in unrelated:
        assert preparation_fingerprint(changed, 224) == fingerprint, changed
    assert preparation_parameters(base, 224)["image_size"] == 224


def test_provenance_records_why_a_store_was_rebuilt(tmp_path):
    root = tmp_path / "d"
    for i in range(3):
        write_png(root / "a" / f"{i}.png", blob(i, 8))
        write_png(root / "b" / f"{i}.png", blob(9 + i, 8))
    dataset = DatasetConfig(name="r", format="folder", root=str(root))
    out = tmp_path / "store"
    first = prepared(dataset, out, 8).provenance["rebuild"]
    assert first["previous_fingerprint"] is None and first["reason"] == "no previous store"
    changed = replace(dataset, preprocessing=PreprocessingConfig(intensity="zscore"))
    second = prepared(changed, out, 8).provenance["rebuild"]
    assert second["previous_fingerprint"] == first["fingerprint"] != second["fingerprint"]
    assert second["changed_parameters"] == ["preprocessing.intensity"]
    assert "preprocessing.intensity" in second["reason"] and not second["inputs_changed"]
    (out / "provenance.json").unlink()  # as Snakemake does with outputs before a rerun
    same = prepared(replace(changed, templates=("x {}",)), out, 8).provenance["rebuild"]
    assert same["fingerprint"] == same["previous_fingerprint"] == second["fingerprint"]
    assert same["reason"] == "same parameters and inputs: rebuilt on request"
    write_png(root / "b" / "new.png", blob(99, 8))
    grown = prepared(changed, out, 16).provenance["rebuild"]
    assert grown["inputs_changed"] and grown["changed_parameters"] == ["image_size"]
    assert "input files changed (6 -> 7 files" in grown["reason"]
