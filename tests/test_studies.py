"""The shipped paper studies (config/studies/*.yaml): they load, hold the paper's recipe, and a
dry run expands them to the job counts the README documents.

The datasets are not on this machine, so the dry run works in a folder with stand-ins: each
dataset's split_<NAME>.json with a few tiny images it lists, which is all the workflow reads
before running anything.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from clipsvd import config, layout
from conftest import ROOT, workflow_env

STUDIES = ROOT / "config" / "studies"
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

# The paper's per-dataset CLIP-SVD recipes with BiomedCLIP (learning rate, epochs), as
# /work/shared/reference/methods.md records them from arXiv 2509.03740.
FEW_SHOT = {"BTMRI": (7e-3, 100), "BUSI": (2e-3, 100), "CHMNIST": (7e-3, 100),
            "COVID_19": (5e-4, 100), "CTKidney": (1e-3, 200), "KneeXray": (8e-3, 100),
            "Kvasir": (5e-3, 100), "LungColon": (3e-3, 100), "OCTMNIST": (1e-2, 100),
            "RETINA": (7e-3, 100)}
BASE_TO_NOVEL = {"BTMRI": (9e-3, 100), "CHMNIST": (1e-3, 60), "COVID_19": (2e-3, 50),
                 "CTKidney": (1e-2, 200), "KneeXray": (2e-3, 60), "Kvasir": (3e-3, 60),
                 "LungColon": (1e-2, 100), "OCTMNIST": (2e-2, 100), "RETINA": (2e-2, 60)}


def expected_jobs(datasets: int, shots: int, seeds: int, adapters: int, probe: bool) -> dict:
    """Jobs of a study from its documented size: per dataset one store and one feature file,
    a split file per (K, seed) plus zero-shot's (K = 0), a training per adapter method, K and
    seed, an evaluation per run (zero-shot once), an interpretation per CLIP-SVD run."""
    runs = shots * seeds
    return {"prepare": datasets, "features": datasets, "sample": datasets * (runs + 1),
            "adapt": datasets * adapters * runs,
            "evaluate": datasets * (1 + (adapters + probe) * runs),
            "interpret": datasets * runs, "report": 1, "all": 1}


# README, "The paper's studies": 10 datasets × 5 methods × K ∈ {1, 2, 4, 8, 16} × seeds 1-3;
# base-to-novel: 9 datasets, K = 16, seeds 1-3, without the linear probe.
DOCUMENTED = {
    "biomedclip_few_shot": expected_jobs(10, 5, 3, adapters=3, probe=True),
    "biomedclip_base_to_novel": expected_jobs(9, 1, 3, adapters=3, probe=False),
}


def shipped() -> list[str]:
    return sorted(p.stem for p in STUDIES.glob("*.yaml"))


# Shipped studies whose datasets are not BiomedCoOp split files: tested where their data is
# (MedMNIST files, the template's generated folder).
TESTED_ELSEWHERE = {"medmnist_few_shot": "tests/test_medmnist_real.py",
                    "miniature": "tests/test_miniature.py",
                    "template": "tests/test_workflow.py"}


def test_every_shipped_study_has_documented_job_counts():
    assert shipped() == sorted([*DOCUMENTED, *TESTED_ELSEWHERE]), (
        "a study in config/studies/ without documented job counts here (or one gone); add its "
        "counts to DOCUMENTED and to the README")
    assert DOCUMENTED["biomedclip_few_shot"]["evaluate"] == 610  # as the README says
    assert DOCUMENTED["biomedclip_base_to_novel"]["evaluate"] == 90


@pytest.mark.parametrize("name, recipe, setting", [
    ("biomedclip_few_shot", FEW_SHOT, "few_shot"),
    ("biomedclip_base_to_novel", BASE_TO_NOVEL, "base_to_novel"),
])
def test_shipped_study_holds_the_papers_recipe(name, recipe, setting):
    """Catches a dataset left out or a learning rate, epoch count or prompt template that is
    not the paper's."""
    cfg = config.load(STUDIES / f"{name}.yaml")
    assert cfg.study == name and cfg.settings == (setting,)
    assert cfg.model.name == BIOMEDCLIP and cfg.model.logit_scale == "model"
    assert cfg.seeds == (1, 2, 3)
    assert cfg.shots == ((1, 2, 4, 8, 16) if setting == "few_shot" else (16,))
    assert [d.name for d in cfg.datasets] == list(recipe)
    for dataset in cfg.datasets:
        settings = cfg.training("clip_svd", dataset.name)
        assert (settings.lr, settings.epochs) == recipe[dataset.name], dataset.name
        assert (settings.weight_decay, settings.batch_size, settings.min_lr) == (0.0, 32, 1e-6)
        assert tuple(settings.crop_scale) == (0.08, 1.0) and settings.flip
        # the public configs prompt COVID with the chest-xray template in few-shot only
        chest = dataset.name == "COVID_19" and setting == "few_shot"
        template = "a chest xray of {}." if chest else "a photo of a {}."
        assert dataset.templates == (template,), dataset.name
        assert dataset.format == "coop_json"


def stand_ins(workdir: Path, study: Path) -> None:
    """Each dataset's split file with three images per class it lists (split JSON entries
    [relative path, label, class name], images under <root>/<NAME>/)."""
    for dataset in yaml.safe_load(study.read_text())["datasets"]:
        root = workdir / dataset["root"]
        split = {"train": [], "val": [], "test": []}
        for label, name in enumerate(("first class", "second class")):
            for part, entries in split.items():
                relative = f"{name.replace(' ', '_')}/{part}.png"
                (root / dataset["name"] / relative).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(np.full((8, 8), 40 * label, np.uint8)).save(
                    root / dataset["name"] / relative)
                entries.append([relative, label, name])
        (root / f"split_{dataset['name']}.json").write_text(json.dumps(split))


def job_stats(output: str) -> dict[str, int]:
    table = output.split("Job stats:", 1)[1].split("\n\n", 1)[0]
    rows = [line.split() for line in table.strip().splitlines()[2:]]
    return {name: int(count) for name, count in rows if name != "total"}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(DOCUMENTED))
def test_shipped_study_expands_to_its_documented_jobs(name, tmp_path):
    """`snakemake -n --configfile config/studies/<name>.yaml`. Catches a study that does not
    load in the workflow, a setting, K, seed or method dropped or duplicated in the expansion,
    and the demo's config leaking into a study given with --configfile."""
    study = STUDIES / f"{name}.yaml"
    stand_ins(tmp_path, study)
    shutil.copytree(ROOT / "config", tmp_path / "config")  # as in a clone: the demo is there
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "1", "-n", "--configfile", str(study)],
        capture_output=True, text=True, env=workflow_env())
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-5000:]
    assert job_stats(output) == DOCUMENTED[name]
    # the configuration the jobs would read is the study file's, nothing of the demo's merged
    resolved = json.loads((tmp_path / layout.STUDY_CONFIG.format(study=name)).read_text())
    assert resolved == yaml.safe_load(study.read_text())
    assert not re.search(r"results/runs/(?!" + name + r"/)", output)
