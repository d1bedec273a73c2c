"""Several studies over one dataset (issue 17): what they share is made once and reused, what
one of them does (or fails to do) never touches a file another made.

The first study is the default study of the test session (tests/conftest.py), copied with its
results and Snakemake's records into a folder of its own; the other studies run there.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import workflow_env

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
SHARED_RULES = ("demo_data", "prepare", "features", "sample")


def snakemake(workdir: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "2",
         *args], capture_output=True, text=True, env=workflow_env(), timeout=1800)


def scheduled(output: str) -> dict[str, int]:
    """Jobs per rule from Snakemake's "Job stats" table."""
    table = output.split("Job stats:", 1)[1] if "Job stats:" in output else ""
    return {rule: int(count) for rule, count in re.findall(r"^(\w+)\s+(\d+)$", table, re.M)
            if rule != "total"}


def snapshot(results: Path) -> dict[str, str]:
    """sha256 of every file under results/ but the MLflow store, which every study writes to
    (it mirrors the run folders, which are checked)."""
    digests = {}
    for path in sorted(results.rglob("*")):
        rel = path.relative_to(results).as_posix()
        if path.is_file() and not rel.startswith(("mlflow.db", "mlartifacts/")):
            digests[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def write_study(workdir: Path, name: str, **changes) -> Path:
    """The default study renamed, with some keys changed; a file of its own under config/."""
    study = yaml.safe_load((workdir / "config" / "config.yaml").read_text())
    study["study"] = name
    for key, value in changes.items():
        study[key] = value
    path = workdir / "config" / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    return path


@pytest.fixture
def first_study(local_default_study, tmp_path) -> Path:
    work = tmp_path / "studies"
    shutil.copytree(local_default_study, work, symlinks=True)
    return work


@pytest.mark.slow
def test_second_study_reuses_the_shared_steps_and_its_failure_changes_nothing(first_study):
    """A second study over the same dataset and model (another name, fewer methods, shots and
    seeds, another learning rate) schedules no demo_data, prepare, features or sample job,
    and when all of its own jobs fail (device: cuda on a machine without a GPU) every file the
    first study made is byte-identical and still there.

    Breaks it catches: with the study's config file as a param of prepare (as before issue 17)
    the dry run schedules prepare, the run remakes the store and its provenance.json (timings)
    differs; the same for features (the features file is remade, its log differs)."""
    before = snapshot(first_study / "results")
    second = write_study(first_study, "second", methods=["zero_shot", "linear_probe", "clip_svd"],
                         shots=[2], seeds=[2], device="cuda",
                         clip_svd={"lr": 0.02, "epochs": 5})
    dry = snakemake(first_study, "--configfile", str(second), "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = scheduled(dry.stdout + dry.stderr)
    assert jobs.get("adapt") == 1 and jobs.get("evaluate") == 3, jobs
    assert not set(SHARED_RULES) & set(jobs), jobs

    run = snakemake(first_study, "--configfile", str(second), "--keep-going")
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert "Error in rule adapt" in output and "Error in rule evaluate" in output
    assert not re.search(rf"^rule ({'|'.join(SHARED_RULES)}):", output, re.M), output[-3000:]
    after = snapshot(first_study / "results")
    missing = sorted(set(before) - set(after))
    changed = sorted(p for p in before if p in after and before[p] != after[p])
    assert not missing and not changed, (missing, changed)
    # What the second study added is its own: its config, its runs' folders, its logs.
    added = sorted(set(after) - set(before))
    assert all(p.startswith(("studies/second.json", "runs/second/")) for p in added), added


def _with_sampling(study: dict) -> dict:
    study["datasets"][0]["sampling"] = {"max_val_shots": 2}
    return study


def _with_model(study: dict) -> dict:
    # The default study's architecture with random weights: the same 28 px input, other
    # features.
    study["model"] = {"name": "mini-clip", "pretrained": None}
    return study


@pytest.mark.slow
@pytest.mark.parametrize("change, expected", [
    (lambda study: study, set()),
    (_with_sampling, {"sample"}),
    (_with_model, {"features"}),
], ids=["renamed", "other-sampling", "other-model-same-input-size"])
def test_keys_that_do_not_decide_a_step_rerun_nothing_of_it(first_study, change, expected):
    """Each shared step reruns exactly when what decides it changes: another sampling rule
    draws new split files from the same store; another model with the same input size
    computes new features from the same store; a rename with other methods, shots and seeds
    reruns none of them.

    Breaks it catches: keying the store by the model's name instead of its input size (the
    new model would remake the store); leaving sampling out of the split files' key (the new
    sampling rule would find the old files and schedule no sample job)."""
    study = yaml.safe_load((first_study / "config" / "config.yaml").read_text())
    study.update(study="other", methods=["zero_shot", "linear_probe"], shots=[2], seeds=[1])
    path = first_study / "config" / "other.yaml"
    path.write_text(yaml.safe_dump(change(study)))
    dry = snakemake(first_study, "--configfile", str(path), "-n")
    assert dry.returncode == 0, dry.stderr[-3000:]
    jobs = scheduled(dry.stdout + dry.stderr)
    assert set(SHARED_RULES) & set(jobs) == expected, jobs


@pytest.mark.slow
def test_a_failing_preparation_of_another_store_leaves_the_first_store(first_study):
    """A study that names the same dataset but reads it from elsewhere asks for another store;
    its prepare job fails (the folder is missing) and Snakemake removes that job's outputs
    only: the first study's store is untouched.

    Break it catches: the store keyed by the dataset's name alone (results/prepared/<name>):
    the failing job's outputs are then the first study's store, which Snakemake deletes."""
    before = snapshot(first_study / "results")
    study = yaml.safe_load((first_study / "config" / "config.yaml").read_text())
    dataset = {k: v for k, v in study["datasets"][0].items() if k != "demo"}
    dataset["root"] = str(first_study / "elsewhere")
    path = write_study(first_study, "elsewhere", datasets=[dataset],
                       methods=["zero_shot"], shots=[1], seeds=[1])
    run = snakemake(first_study, "--configfile", str(path))
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "Error in rule prepare" in output, output[-3000:]
    after = snapshot(first_study / "results")
    assert {p: after.get(p) for p in before} == before
