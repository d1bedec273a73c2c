"""Base-to-novel end to end through snakemake, with `--config` overrides that the jobs must see.

One small study (the demo's four classes; zero-shot and CLIP-SVD at K = 2) run once: the split
file, the predictions and the metrics of base and novel classes, checked against the protocol
(first ceil(n/2) classes of the sorted label ids are base, each group relabelled from 0, HM =
2·b·n/(b + n)) by hand from predictions.csv; and overrides given as `--config key=value`
(a list, a nested mapping, a string) in the configuration the jobs read and in what they did.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from clipsvd import layout
from conftest import ROOT, workflow_env

STUDY = "b2n_cli"  # the name given on the command line
OVERRIDES = [f"study={STUDY}", "seeds=[2]", "clip_svd={lr: 0.02, epochs: 3}"]
METHODS = ("zero_shot", "clip_svd")


@pytest.fixture(scope="module")
def b2n_study(tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("b2n")
    study = {
        "study": "b2n_file",
        "datasets": [{"name": "demo_scans", "format": "csv", "root": "results/raw/demo_scans",
                      "manifest": "manifest.csv", "templates": ["a {} scan"],
                      "demo": {"per_class": 24, "image_size": 64, "seed": 0}}],
        "methods": list(METHODS), "settings": ["base_to_novel"], "shots": [2], "seeds": [1],
        "device": "cpu", "threads": 1,
        "clip_svd": {"lr": 0.01, "epochs": 10, "batch_size": 32},
        "interpret": {"enabled": False}, "tracking": {"enabled": False},
    }
    (workdir / "study.yaml").write_text(yaml.safe_dump(study))
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(workdir), "--cores", "2", "--configfile",
         str(workdir / "study.yaml"), "--config", *OVERRIDES],
        capture_output=True, text=True, env=workflow_env())
    if result.returncode != 0:
        raise AssertionError(f"the base-to-novel study failed:\n{result.stdout[-3000:]}\n"
                             f"{result.stderr[-6000:]}")
    return workdir


def run_folder(workdir: Path, method: str) -> Path:
    shots, seed = (layout.ZERO_SHOT_SHOTS, layout.ZERO_SHOT_SEED) if method == "zero_shot" \
        else (2, 2)
    return workdir / layout.RUN.format(study=STUDY, dataset="demo_scans", method=method,
                                       setting="base_to_novel", shots=shots, seed=seed)


def the_one(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def test_base_and_novel_classes_follow_the_protocol(b2n_study):
    """Base classes are the first ceil(n/2) of the sorted label ids; the support sets and the
    base test set hold no novel class; the two test sets share no class and no image. Catches
    a sampler that trains on every class (tried)."""
    store = the_one(sorted(b2n_study.glob("results/prepared/**/index.csv"))).parent
    classes = json.loads((store / "classes.json").read_text())
    classes = classes["classes"] if isinstance(classes, dict) else classes
    index = pd.read_csv(store / "index.csv", dtype={"sample_id": str}).set_index("sample_id")
    assert len(classes) == 4
    split = the_one([p for p in sorted(b2n_study.glob("results/splits/**/*.json"))
                     if json.loads(p.read_text())["shots"] == 2])
    split = json.loads(split.read_text())
    assert (split["setting"], split["seed"]) == ("base_to_novel", 2)
    assert split["base_classes"] == split["classes"] == classes[:2]
    assert split["novel_classes"] == classes[2:]

    def names(key):
        return set(index.loc[[str(i) for i in split[key]], "class_name"])

    assert names("train") <= set(classes[:2]) and names("val") <= set(classes[:2])
    assert names("test") == set(classes[:2]) and names("test_novel") == set(classes[2:])
    assert not set(split["test"]) & set(split["test_novel"])
    everything = set(index.index[index.split == "test"])
    assert set(split["test"]) | set(split["test_novel"]) == everything


@pytest.mark.parametrize("method", METHODS)
def test_metrics_equal_the_predictions_counted_by_hand(b2n_study, method):
    """Base and novel accuracy and their harmonic mean recomputed from predictions.csv, each
    group relabelled from 0 and predicted over its own classes only, and the report showing
    the run's numbers. Catches novel images scored with the base class names and the
    arithmetic mean in place of the harmonic one (both tried)."""
    run = run_folder(b2n_study, method)
    split = json.loads(the_one([p for p in b2n_study.glob("results/splits/**/*.json")
                                if json.loads(p.read_text())["shots"] == 2]).read_text())
    table = pd.read_csv(run / layout.PREDICTIONS, dtype={"sample_id": str})
    accuracy = {}
    for group, names, key in (("base", split["base_classes"], "test"),
                              ("novel", split["novel_classes"], "test_novel")):
        rows = table[table.group == group]
        assert rows.sample_id.tolist() == [str(i) for i in split[key]]
        # relabelled from 0 within the group, predictions over the group's classes only
        assert rows.label.tolist() == [names.index(n) for n in rows.class_name]
        probabilities = rows[[f"p_{n}" for n in names]].to_numpy()
        assert (rows.prediction.to_numpy() == probabilities.argmax(1)).all()
        assert rows.predicted_class.tolist() == [names[i] for i in rows.prediction]
        assert probabilities.sum(1) == pytest.approx(1.0, abs=1e-5)
        accuracy[group] = float((rows.label == rows.prediction).mean())
    b, n = accuracy["base"], accuracy["novel"]
    harmonic = 2 * b * n / (b + n) if b + n else 0.0
    metrics = json.loads((run / layout.METRICS).read_text())
    assert metrics["base_accuracy"] == pytest.approx(b, abs=1e-12)
    assert metrics["novel_accuracy"] == pytest.approx(n, abs=1e-12)
    assert metrics["harmonic_mean"] == pytest.approx(harmonic, abs=1e-12)
    assert metrics["accuracy"] == metrics["harmonic_mean"]
    assert metrics["base_n_test"] + metrics["novel_n_test"] == len(table)
    report = pd.read_csv(b2n_study / layout.REPORT.format(study=STUDY) / "base_to_novel.csv")
    (row,) = report[(report.method == method)].itertuples()
    # the report's CSV holds 6 decimals
    assert (row.base_mean, row.novel_mean) == pytest.approx((b, n), abs=1e-6)
    assert row.hm == pytest.approx(harmonic, abs=1e-6) and not math.isnan(row.hm)


def test_command_line_overrides_reach_the_jobs(b2n_study):
    """`--config study=… seeds=[2] clip_svd={lr: 0.02, epochs: 3}`: the configuration the jobs
    read holds them with their types (Snakemake leaves nested values strings; they failed the
    schema before), and the training job used them. Catches overrides left as Snakemake
    hands them over (tried: the study then stops on `key 'seeds.0': '2' is not of type
    'integer'`) and jobs that read the study file instead of the resolved configuration."""
    resolved = json.loads((b2n_study / layout.STUDY_CONFIG.format(study=STUDY)).read_text())
    assert resolved["study"] == STUDY and resolved["seeds"] == [2]
    assert resolved["clip_svd"]["lr"] == 0.02 and resolved["clip_svd"]["epochs"] == 3
    # merged into the file's values, not replacing them
    assert resolved["clip_svd"]["batch_size"] == 32 and resolved["shots"] == [2]
    assert not (b2n_study / "results" / "runs" / "b2n_file").exists()
    run = run_folder(b2n_study, "clip_svd")
    summary = json.loads((run / layout.TRAIN_SUMMARY).read_text())
    assert summary["config"]["clip_svd"]["lr"] == 0.02 and summary["seed"] == 2
    history = pd.read_csv(run / layout.TRAIN_HISTORY)
    # 3 epochs over 4 support images (2 base classes x K = 2) in batches of 32: 3 steps
    assert summary["total_steps"] == len(history) == 3
    assert history.lr.iloc[0] == pytest.approx(0.02)
