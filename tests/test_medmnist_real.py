"""Real images: the three official MedMNIST v3 files of ../shared/data/medmnist through the
`medmnist` format, and a slice of config/studies/medmnist_few_shot.yaml through snakemake.

Counts and class names are checked against the official figures (the MedMNIST v3 release, as
that folder's README gives them), not against clipsvd's own label file; every stored pixel is
compared with the array it was prepared from. RetinaMNIST is prepared whole; BloodMNIST and
OrganAMNIST (75k images, about 7 minutes to prepare on two cores) as slices of the official
files, which go through the same `medmnist` format code.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from clipsvd.config import DatasetConfig, MedmnistConfig, PreprocessingConfig
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.sources import classes_of, read_source
from clipsvd.data.store import PreparedStore

from conftest import workflow_env

ROOT = Path(__file__).resolve().parents[1]
# <repo root>/../shared as in CI; CLIPSVD_SHARED names it where the clone lives elsewhere (a
# git worktree).
SHARED = Path(os.environ.get("CLIPSVD_SHARED", ROOT.parent / "shared")) / "data" / "medmnist"
STUDY = ROOT / "config" / "studies" / "medmnist_few_shot.yaml"
OFFICIAL = {
    "bloodmnist": {
        "md5": "7053d0359d879ad8a5505303e11de1dc", "channels": 3,
        "counts": {"train": 11_959, "val": 1_712, "test": 3_421},
        "classes": ["basophil", "eosinophil", "erythroblast",
                    "immature granulocytes(myelocytes, metamyelocytes and promyelocytes)",
                    "lymphocyte", "monocyte", "neutrophil", "platelet"]},
    "organamnist": {
        "md5": "68e3f8846a6bd62f0c9bf841c0d9eacc", "channels": 1,
        "counts": {"train": 34_561, "val": 6_491, "test": 17_778},
        "classes": ["bladder", "femur-left", "femur-right", "heart", "kidney-left",
                    "kidney-right", "liver", "lung-left", "lung-right", "pancreas", "spleen"]},
    "retinamnist": {
        "md5": "bd4c0672f1bba3e3a89f0e4e876791e4", "channels": 3,
        "counts": {"train": 1_080, "val": 120, "test": 400},
        "classes": ["0", "1", "2", "3", "4"]},
}
FLAGS = list(OFFICIAL)
SPLITS = ("train", "val", "test")
# BloodMNIST and OrganAMNIST are prepared from their first SLICE_ROWS images of each split: more
# than one chunk of rows (prepare.ARRAY_CHUNK = 256) and every class in every split (OrganAMNIST's
# test split has all 11 within its first 82).
SLICED = ("bloodmnist", "organamnist")
SLICE_ROWS = 300

pytestmark = pytest.mark.skipif(not all((SHARED / f"{flag}.npz").is_file() for flag in FLAGS),
                                reason="shared MedMNIST data not found")


def dataset(flag: str, root: Path = SHARED) -> DatasetConfig:
    return DatasetConfig(name=flag, format="medmnist", root=str(root),
                         medmnist=MedmnistConfig(flag=flag, size=28),
                         preprocessing=PreprocessingConfig(intensity="none", resize="crop"))


@dataclass
class Prepared:
    store: PreparedStore
    source: Path  # the .npz it was prepared from: the official file or a slice of it
    rows: int | None  # images taken from each split of the official file; None: all


def write_slice(official: Path, out: Path, rows: int) -> None:
    """The official file's arrays, in its key order, cut to their first ``rows`` rows."""
    with np.load(official) as npz:
        arrays = {key: npz[key][:rows] for key in npz.files}
    np.savez_compressed(out, **arrays)


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, Prepared]:
    """RetinaMNIST prepared whole at its own 28 px, the others as slices written where the
    `medmnist` format looks for them (<root>/<flag>.npz); once per module, 3,400 images."""
    out = tmp_path_factory.mktemp("medmnist")
    slices = out / "slices"
    slices.mkdir()
    prepared = {}
    for flag in FLAGS:
        root, rows = (slices, SLICE_ROWS) if flag in SLICED else (SHARED, None)
        if rows is not None:
            write_slice(SHARED / f"{flag}.npz", slices / f"{flag}.npz", rows)
        prepare_dataset(dataset(flag, root), out / flag, 28, threads=2)
        prepared[flag] = Prepared(PreparedStore.open(out / flag), root / f"{flag}.npz", rows)
    return prepared


@pytest.mark.parametrize("flag", FLAGS)
def test_the_files_are_the_official_release(flag):
    digest = hashlib.md5((SHARED / f"{flag}.npz").read_bytes()).hexdigest()
    assert digest == OFFICIAL[flag]["md5"]


@pytest.mark.slow
@pytest.mark.parametrize("flag", FLAGS)
def test_counts_and_class_names_are_the_official_figures(stores, flag):
    """The whole official file as the `medmnist` format reads it (labels and array headers,
    no images) has the release's counts and classes; the prepared store has those classes and,
    per split and class, the images of the file it was prepared from (the whole file or the
    slice). Catches: a split, class list or label order that differs from the release."""
    official, prepared = OFFICIAL[flag], stores[flag]
    table = read_source(dataset(flag))
    assert classes_of(table) == official["classes"]
    assert table.groupby("split").size().to_dict() == official["counts"]
    store = prepared.store
    assert store.classes == official["classes"]
    with np.load(prepared.source) as npz:
        labels = {split: npz[f"{split}_labels"][:, 0] for split in SPLITS}
    counts = {split: len(labels[split]) for split in SPLITS}
    assert counts == (official["counts"] if prepared.rows is None
                      else dict.fromkeys(SPLITS, prepared.rows))
    assert store.index.groupby("split").size().to_dict() == counts
    splits = store.provenance["splits"]
    for split, count in counts.items():
        assert splits[split]["images"] == splits[split]["groups"] == count
        assert splits[split]["classes"] == len(official["classes"])
        per_class = np.bincount(labels[split], minlength=len(official["classes"]))
        assert splits[split]["per_class"] == dict(zip(official["classes"], per_class.tolist()))
    assert store.provenance["groups"]["images_by_source"] == {"image": sum(counts.values())}


@pytest.mark.slow
@pytest.mark.parametrize("flag", FLAGS)
def test_every_pixel_and_label_is_the_files_own(stores, flag):
    """Every stored image and label against the file it was prepared from, and that file
    against the official one (a slice: its first rows, same keys and dtypes). Catches:
    transposed or mirrored images, swapped colour channels, grey not repeated into three
    channels, labels out of step with their images."""
    prepared = stores[flag]
    store = prepared.store
    with np.load(SHARED / f"{flag}.npz") as official, np.load(prepared.source) as npz:
        assert npz.files == official.files
        for split in SPLITS:
            for key in (f"{split}_images", f"{split}_labels"):
                whole = official[key]
                expected = whole if prepared.rows is None else whole[:prepared.rows]
                assert npz[key].dtype == whole.dtype and np.array_equal(npz[key], expected), key
            rows = (store.index["split"] == split).to_numpy()
            images = npz[f"{split}_images"]
            if images.ndim == 3:
                assert OFFICIAL[flag]["channels"] == 1
                images = np.repeat(images[..., None], 3, axis=-1)
            assert np.array_equal(store.images[rows].transpose(0, 2, 3, 1), images), split
            assert np.array_equal(store.index.loc[rows, "label"].to_numpy(),
                                  npz[f"{split}_labels"][:, 0])


@pytest.mark.slow
def test_a_slice_of_the_medmnist_study_runs_through_snakemake(tmp_path):
    """The study file as shipped, with a second config file and --config narrowing it to
    RetinaMNIST at 28 px, K = 1, seed 1 and a tiny BiomedCLIP-like model (no weights can be
    downloaded here), all five methods. Catches: a study file that does not validate or run,
    and the real files failing anywhere between prepare and the report."""
    study = yaml.safe_load(STUDY.read_text())
    assert study["shots"] == [1, 2, 4, 8, 16] and study["seeds"] == [1, 2, 3]
    assert {d["medmnist"]["flag"] for d in study["datasets"]} == set(FLAGS)
    retina = next(d for d in study["datasets"] if d["name"] == "retinamnist")
    retina = {**retina, "root": str(SHARED), "medmnist": {"flag": "retinamnist", "size": 28}}
    narrow = {"datasets": [retina], "shots": [1], "seeds": [1],
              "model": {"name": "tiny-biomedclip", "pretrained": None},
              "clip_svd": {"epochs": 2, "precision": "fp32"},
              "clip_lora": {"iterations_per_shot": 3}, "comp_lora": {"iterations_per_shot": 3},
              "interpret": {"max_images": 16, "k": 2}}
    (tmp_path / "slice.yaml").write_text(yaml.safe_dump(narrow))
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "2",
         "--configfile", str(STUDY), str(tmp_path / "slice.yaml"),
         "--config", "device=cpu", "threads=1"],
        capture_output=True, text=True, env=workflow_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    results = tmp_path / "results"
    (store,) = (results / "prepared" / "retinamnist").iterdir()  # the store under its key
    provenance = json.loads((store / "provenance.json").read_text())
    assert {s: v["images"] for s, v in provenance["splits"].items()} == \
        OFFICIAL["retinamnist"]["counts"]
    table = pd.read_csv(results / "report" / study["study"] / "accuracy.csv")
    assert set(table["method"]) == set(study["methods"])
    for method in study["methods"]:
        shots, seed = (0, 0) if method == "zero_shot" else (1, 1)
        metrics = json.loads((results / "runs" / study["study"] / "retinamnist" / method /
                              f"few_shot/shots{shots}/seed{seed}/metrics.json").read_text())
        assert metrics["n_test"] == 400 and 0.0 <= metrics["accuracy"] <= 1.0
