"""Real images: the three official MedMNIST v3 files of ../shared/data/medmnist through the
`medmnist` format, and a slice of config/studies/medmnist_few_shot.yaml through snakemake.

Counts and class names are checked against the official figures (the MedMNIST v3 release, as
that folder's README gives them), not against clipsvd's own label file; every stored pixel is
compared with the file's own array.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from clipsvd.config import DatasetConfig, MedmnistConfig, PreprocessingConfig
from clipsvd.data.prepare import prepare_dataset
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

pytestmark = pytest.mark.skipif(not all((SHARED / f"{flag}.npz").is_file() for flag in FLAGS),
                                reason="shared MedMNIST data not found")


def dataset(flag: str) -> DatasetConfig:
    return DatasetConfig(name=flag, format="medmnist", root=str(SHARED),
                         medmnist=MedmnistConfig(flag=flag, size=28),
                         preprocessing=PreprocessingConfig(intensity="none", resize="crop"))


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> dict[str, PreparedStore]:
    """The three files prepared at their own 28 px (once per module: 77k images)."""
    out = tmp_path_factory.mktemp("medmnist")
    for flag in FLAGS:
        prepare_dataset(dataset(flag), out / flag, 28, threads=2)
    return {flag: PreparedStore.open(out / flag) for flag in FLAGS}


@pytest.mark.parametrize("flag", FLAGS)
def test_the_files_are_the_official_release(flag):
    digest = hashlib.md5((SHARED / f"{flag}.npz").read_bytes()).hexdigest()
    assert digest == OFFICIAL[flag]["md5"]


@pytest.mark.slow
@pytest.mark.parametrize("flag", FLAGS)
def test_counts_and_class_names_are_the_official_figures(stores, flag):
    """Catches: a split, class list or label order that differs from the release."""
    store, official = stores[flag], OFFICIAL[flag]
    assert store.classes == official["classes"]
    assert store.index.groupby("split").size().to_dict() == official["counts"]
    splits = store.provenance["splits"]
    for split, count in official["counts"].items():
        assert splits[split]["images"] == splits[split]["groups"] == count
        assert splits[split]["classes"] == len(official["classes"])
        assert sum(splits[split]["per_class"].values()) == count
    assert store.provenance["groups"]["images_by_source"] == {
        "image": sum(official["counts"].values())}


@pytest.mark.slow
@pytest.mark.parametrize("flag", FLAGS)
def test_every_pixel_and_label_is_the_files_own(stores, flag):
    """Catches: transposed or mirrored images, swapped colour channels, grey not repeated
    into three channels, labels out of step with their images."""
    store = stores[flag]
    with np.load(SHARED / f"{flag}.npz") as npz:
        for split in ("train", "val", "test"):
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
