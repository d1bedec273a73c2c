"""The miniature study (config/studies/miniature.yaml): its config, and a slice of it run
through snakemake on the real MedMNIST files with the shipped pretrained model."""
from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from snakemake.utils import update_config

from clipsvd import config
from clipsvd.data.sampling import base_novel_labels
from clipsvd.data.sources import medmnist_labels
from clipsvd.pretrain import load_recipe
from conftest import workflow_env
from test_studies import job_stats

ROOT = Path(__file__).resolve().parents[1]
MEDMNIST = ROOT.parent / "shared" / "data" / "medmnist"
STUDY = ROOT / "config" / "studies" / "miniature.yaml"
needs_medmnist = pytest.mark.skipif(not (MEDMNIST / "retinamnist.npz").is_file(),
                                    reason="shared MedMNIST data not found")


def test_miniature_study_follows_the_protocol_of_the_issue():
    """3 seeds, K ∈ {1, 2, 4, 8, 16}, every method; few-shot on all three datasets,
    base-to-novel on BloodMNIST and OrganAMNIST, whose novel classes pretraining never saw; the
    shipped model; no training crop mirrored on the dataset with left and right organs."""
    cfg = config.load(STUDY)
    assert cfg.seeds == (1, 2, 3) and cfg.shots == (1, 2, 4, 8, 16)
    # every method but full fine-tuning, the ablations' reference (docs/miniature.md)
    assert set(cfg.methods) == set(config.METHODS) - {"full_finetune"}
    assert (cfg.model.name, cfg.model.pretrained) == ("mini-clip", "medmnist")
    settings = {d.name: cfg.settings_of(d.name) for d in cfg.datasets}
    assert settings == {"bloodmnist": ("few_shot", "base_to_novel"),
                        "organamnist": ("few_shot", "base_to_novel"),
                        "retinamnist": ("few_shot",)}
    for method in set(config.ADAPTER_METHODS) & set(cfg.methods):
        assert cfg.training(method, "organamnist").flip is False
        assert cfg.training(method, "bloodmnist").flip is True
    # protocol 2 (docs/miniature.md): every dataset leaves out what the model read; pretraining
    # reads part of each train split, and of a base-to-novel dataset only the base classes
    assert {d.exclude_pretrained_on for d in cfg.datasets} == {"mini-clip/medmnist"}
    recipe = load_recipe(ROOT / "src/clipsvd/pretrained/mini-clip-medmnist.yaml")
    sources = {s.medmnist: s for s in recipe.sources if s.medmnist}
    assert set(sources) == {d.medmnist.flag for d in cfg.datasets}
    assert {(s.split, s.share < 1) for s in sources.values()} == {("train", True)}
    for dataset in cfg.datasets:
        labels = medmnist_labels(dataset.medmnist.flag)
        if "base_to_novel" in cfg.settings_of(dataset.name):
            base, _ = base_novel_labels(len(labels))
            assert sources[dataset.medmnist.flag].classes == tuple(labels[i] for i in base)
    assert cfg.dataset("retinamnist").class_names["2"] == "moderate diabetic retinopathy"


@needs_medmnist
@pytest.mark.slow
def test_miniature_study_expands_to_its_documented_jobs(tmp_path):
    """`snakemake -n` on the whole study: 5 (dataset, setting) pairs × 15 (K, seed) runs; the
    linear probe and LP++ in few-shot only, RetinaMNIST in few-shot only (docs/miniature.md:
    1,533 jobs). Caught when tried: the probe kept in base-to-novel's job list gave 305
    evaluations of the five methods of protocol 2."""
    cfg = yaml.safe_load(STUDY.read_text(encoding="utf-8"))
    for dataset in cfg["datasets"]:
        dataset["root"] = str(MEDMNIST)
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    shutil.copytree(ROOT / "config", tmp_path / "config")  # as in a clone
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "1", "-n", "--configfile",
         str(tmp_path / "study.yaml")], capture_output=True, text=True, env=workflow_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    runs = 5 * 3
    assert job_stats(output) == {
        "prepare": 3, "features": 3, "sample": 5 * (runs + 1), "adapt": 5 * 7 * runs,
        "evaluate": 3 * (1 + 12 * runs) + 2 * (1 + 10 * runs), "interpret": 5 * runs,
        "report": 1, "all": 1}
    assert sum(job_stats(output).values()) == 1533
    assert "linear_probe/base_to_novel" not in output and "lp_pp/base_to_novel" not in output
    assert "retinamnist/zero_shot/base_to_novel" not in output


@needs_medmnist
@pytest.mark.slow
def test_slice_of_the_miniature_study_runs_on_medmnist(tmp_path):
    """RetinaMNIST (few-shot, K ∈ {1, 2}, seed 1, every method) with the study's own settings,
    through snakemake: real images, the shipped model, split files shared by every method."""
    cfg = yaml.safe_load(STUDY.read_text(encoding="utf-8"))
    (retina,) = [d for d in cfg["datasets"] if d["name"] == "retinamnist"]
    retina["root"] = str(MEDMNIST)
    cfg.update(datasets=[retina], settings=["few_shot"], shots=[1, 2], seeds=[1],
               study="miniature_slice")
    cfg["interpret"]["max_images"] = 64
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "2", "--configfile",
         str(tmp_path / "study.yaml")], capture_output=True, text=True, env=workflow_env())
    assert result.returncode == 0, result.stderr[-6000:]
    table = pd.read_csv(tmp_path / "results/report/miniature_slice/accuracy.csv")
    assert set(zip(table.method, table.shots)) == {("zero_shot", 0)} | {
        (m, k) for m in config.METHODS if m not in ("zero_shot", "full_finetune")
        for k in (1, 2)}
    runs = tmp_path / "results/runs/miniature_slice/retinamnist"
    split_hashes = set()
    for method in set(config.METHODS) - {"zero_shot", "full_finetune"}:
        record = json.loads((runs / method / "few_shot/shots2/seed1/run.json").read_text())
        split_hashes.add(record["provenance"]["split_sha256"])
        metrics = json.loads((runs / method / "few_shot/shots2/seed1/metrics.json").read_text())
        assert metrics["n_test"] == 400  # RetinaMNIST's official test split
    assert len(split_hashes) == 1
    (provenance,) = (tmp_path / "results/prepared/retinamnist").glob("*/provenance.json")
    store = json.loads(provenance.read_text())  # the one store, under its key
    assert store["image_size"] == 28 and store["splits"]["test"]["images"] == 400
    # the support pool: the train images the model was not pretrained on (protocol 2)
    assert store["excluded_pretraining_images"]["train_images_dropped"] == 540
    assert store["splits"]["train"]["images"] == 1080 - 540


def _study(**dataset_keys):
    return {"study": "s", "datasets": [{"name": "d", "format": "folder", "root": "x",
                                        **dataset_keys}],
            "settings": ["few_shot"]}


def test_dataset_settings_and_crop_overrides_are_checked():
    """A dataset may run a subset of the study's settings, never one the study lacks; a
    crop-scale override needs 0 < low <= high <= 1; a study setting that no dataset runs is
    refused (the report rule would wait for its tables). Each is one line naming the key. Caught
    when tried: the last check removed (no error). Without it, the slice test above with the
    study's two settings ran every job and then failed in the report rule (base_to_novel.csv
    missing)."""
    with pytest.raises(config.ConfigError) as info:
        config.from_dict(_study(settings=["base_to_novel"]), "s.yaml")
    assert str(info.value) == ("s.yaml: key 'datasets.0.settings': 'base_to_novel' is not one "
                               "of the study's settings (few_shot); add it there or remove it "
                               "here")
    with pytest.raises(config.ConfigError, match=r"key 'datasets.0.overrides.clip_svd."
                                                 r"crop_scale': need 0 < low <= high <= 1, "
                                                 r"got \[0.9, 0.5\]"):
        config.from_dict(_study(overrides={"clip_svd": {"crop_scale": [0.9, 0.5]}}), "s.yaml")
    cfg = config.from_dict(_study(overrides={"clip_svd": {"crop_scale": [0.5, 0.9],
                                                          "flip": False}}), "s.yaml")
    assert cfg.training("clip_svd", "d").crop_scale == (0.5, 0.9)
    assert cfg.training("clip_svd", "d").flip is False
    assert cfg.training("clip_lora", "d").flip is True
    assert cfg.settings_of("d") == ("few_shot",)
    both = {**_study(settings=["few_shot"]), "settings": ["few_shot", "base_to_novel"]}
    with pytest.raises(config.ConfigError) as info:
        config.from_dict(both, "s.yaml")
    assert str(info.value) == ("s.yaml: key 'settings': no dataset runs 'base_to_novel' (every "
                               "dataset's settings leave it out); remove it here or add it to a "
                               "dataset's settings")


# Known defect (found 2026-12-07, open): these overlays were run before miniature.yaml held the
# rates the grid chose as per-dataset overrides; a dataset's override now shadows the overlay's
# method-level lr, so rerun today they would train at the chosen rates. Reproduce them at the
# commit that ran them (d143b33) until overlays can reach a dataset's override. Strict: the fix
# makes these pass and must drop this. (Overlays that restate `datasets:` carry their own rates.)
SHADOWED = {"miniature-grid": {p.stem for p in (ROOT / "config/studies/miniature-grid").glob("*.yaml")}}


def _overlays():
    for path in sorted((ROOT / "config" / "studies").glob("miniature-*/*.yaml")):
        marks = [pytest.mark.xfail(strict=True, reason="a per-dataset override in "
                                   "miniature.yaml shadows the overlay's lr")] \
            if path.stem in SHADOWED.get(path.parent.name, ()) else []
        yield pytest.param(path, marks=marks, id=f"{path.parent.name}/{path.stem}")


@pytest.mark.parametrize("overlay", list(_overlays()))
def test_each_grid_and_ablation_overlay_is_a_study_of_its_own(overlay):
    """Each overlay given after miniature.yaml is a valid study under its own name, so its runs
    never land in (or overwrite) the study's, and it keeps the study's datasets and rates."""
    base = yaml.safe_load(STUDY.read_text(encoding="utf-8"))
    change = yaml.safe_load(overlay.read_text(encoding="utf-8"))
    merged = copy.deepcopy(base)
    update_config(merged, change)  # how Snakemake merges a second --configfile
    cfg = config.from_dict(merged, str(overlay))
    assert cfg.study != base["study"] and cfg.study.startswith("miniature-")
    assert [d.name for d in cfg.datasets] == [d["name"] for d in base["datasets"]]
    for method in cfg.methods if "datasets" not in change else ():
        if isinstance(change.get(method), dict) and "lr" in change[method]:
            assert cfg.training(method, "bloodmnist").lr == pytest.approx(change[method]["lr"])
