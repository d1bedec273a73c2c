"""The offline demo dataset: deterministic, several real formats, and preparable as is."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from clipsvd.config import DatasetConfig, DemoConfig
from clipsvd.data.demo import CLASSES, generate_demo_dataset
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.store import PreparedStore

SMALL = DemoConfig(per_class=10, image_size=32, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("demo") / "demo"
    generate_demo_dataset(root, SMALL)
    return root


def test_same_seed_gives_identical_files(demo_root, tmp_path):
    generate_demo_dataset(tmp_path / "again", SMALL)
    assert _files(tmp_path / "again") == _files(demo_root)
    generate_demo_dataset(tmp_path / "other", DemoConfig(per_class=10, image_size=32, seed=4))
    assert _files(tmp_path / "other") != _files(demo_root)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_manifest_formats_and_groups(demo_root):
    with open(demo_root / "manifest.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "group"]
    assert len(rows) == 4 * SMALL.per_class
    assert sorted({r["label"] for r in rows}) == sorted(CLASSES)
    assert all((demo_root / r["path"]).is_file() for r in rows)
    per_group: dict[str, set[str]] = {}
    for row in rows:
        per_group.setdefault(row["group"], set()).add(row["path"])
    assert max(len(paths) for paths in per_group.values()) >= 2
    suffixes = {Path(r["path"]).suffix for r in rows}
    assert suffixes == {".png", ".dcm", ".nii"}
    modes = {Image.open(demo_root / r["path"]).mode for r in rows if r["path"].endswith(".png")}
    assert modes == {"L", "I;16"}
    dicom = pydicom.dcmread(next(demo_root / r["path"] for r in rows
                                 if r["path"].endswith(".dcm")))
    assert float(dicom.RescaleSlope) != 1.0 and float(dicom.RescaleIntercept) == -1024.0
    hu = dicom.pixel_array * float(dicom.RescaleSlope) + float(dicom.RescaleIntercept)
    assert -200 < hu.mean() < 250  # CT-like soft tissue values


def test_demo_prepares_into_distinct_classes(demo_root, tmp_path):
    dataset = DatasetConfig(name="demo", format="csv", root=str(demo_root),
                            manifest="manifest.csv", demo=SMALL)
    prepare_dataset(dataset, tmp_path / "prepared", 24, threads=2)
    store = PreparedStore.open(tmp_path / "prepared")
    assert store.images.shape == (40, 3, 24, 24) and store.images.dtype == np.uint8
    assert store.images.max() == 255 and store.images.min() == 0
    assert store.classes == sorted(CLASSES)
    assert store.index["label"].tolist() == [store.classes.index(n)
                                             for n in store.index["class_name"]]
    assert store.index.groupby("group")["split"].nunique().max() == 1
    assert set(store.index["split"]) == {"train", "val", "test"}
    # A cyst is dark and a tumor bright relative to the rest of their image: class means differ.
    means = store.index.assign(m=store.images.reshape(40, -1).mean(1)).groupby("class_name")["m"]
    assert means.mean()["cyst"] > means.mean()["tumor"] + 30
    assert store.provenance["n_images"] == 40
    timing = json.loads((tmp_path / "prepared" / "preparation.json").read_text())
    assert timing["images_per_second"] > 0 and "images_per_second" not in store.provenance
