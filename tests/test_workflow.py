"""The default study through snakemake, end to end, in a temporary directory."""
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))


def snakemake(workdir, *args, check=True):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(workdir), "--cores", "2", *args],
        capture_output=True, text=True, env=env)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


COMPUTE_RULES = {"prepare", "features", "adapt", "evaluate", "interpret"}


def most_compute_jobs_at_once(log: str) -> int:
    """The most jobs of the compute rules running at the same time, from snakemake's output
    (a job starts at its `rule X:` block's `jobid:` line and ends at `Finished jobid: N`)."""
    running, most, rule = set(), 0, None
    for line in log.splitlines():
        if found := re.match(r"(?:local)?rule (\w+):$", line):
            rule = found.group(1)
        elif (found := re.match(r"\s+jobid: (\d+)$", line)) and rule in COMPUTE_RULES:
            running.add(found.group(1))
            most = max(most, len(running))
        elif found := re.match(r"Finished jobid: (\d+)", line):
            running.discard(found.group(1))
    return most


@pytest.fixture(scope="module")
def study(local_default_study):
    """The default study, run once per test session (tests/conftest.py)."""
    return local_default_study


@pytest.mark.slow
def test_default_study_report_and_mlflow(study):
    cfg = yaml.safe_load((study / "config" / "config.yaml").read_text())
    report = study / "results" / "report" / cfg["study"]
    table = pd.read_csv(report / "accuracy.csv")

    def runs_of(method):
        if method == "zero_shot":
            return [(0, 0)]
        return [(k, s) for k in cfg["shots"] for s in cfg["seeds"]]

    expected = {(m, k) for m in cfg["methods"] for k, _ in runs_of(m)}
    assert set(zip(table.method, table.shots)) == expected
    assert (report / "accuracy_vs_shots.png").stat().st_size > 1000
    assert (report / "report.html").stat().st_size > 1000
    # Every row equals the mean over the seeds' metrics files.
    runs = study / "results" / "runs" / cfg["study"] / "demo_scans"
    for row in table.itertuples():
        accs = [json.loads((runs / row.method / "few_shot" / f"shots{k}" / f"seed{s}" /
                            "metrics.json").read_text())["accuracy"]
                for k, s in runs_of(row.method) if k == row.shots]
        assert row.mean == pytest.approx(sum(accs) / len(accs), abs=1e-6)
        assert row.n_seeds == len(accs)
    # The demo's four classes are learnable: the linear probe on frozen features beats chance.
    probe = table[table.method == "linear_probe"]
    assert (probe["mean"] > 0.25).all(), probe
    # One MLflow child run per (method, shots, seed), one parent per method, one report run.
    client = mlflow.MlflowClient(f"sqlite:///{study / 'results' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(cfg["study"])
    runs_logged = client.search_runs([experiment.experiment_id])
    children = [r for r in runs_logged if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == sum(len(runs_of(m)) for m in cfg["methods"])
    reports = [r for r in runs_logged if r.data.tags.get("clipsvd.report") == "true"]
    assert len(reports) == 1  # the report folder, logged by `clipsvd report`
    assert len(runs_logged) - len(children) - len(reports) == len(cfg["methods"])
    for method in cfg["methods"]:
        logged = {(int(r.data.tags["shots"]), int(r.data.tags["seed"])) for r in children
                  if r.data.tags["method"] == method}
        assert logged == set(runs_of(method)), method
    assert all("accuracy" in r.data.metrics for r in children)
    names = {a.path for a in client.list_artifacts(children[0].info.run_id)}
    assert {"metrics.json", "predictions.csv", "confusion_matrix.png", "evaluate.log"} <= names


@pytest.mark.slow
def test_default_study_on_the_pretrained_model_adapts_beyond_zero_shot(study):
    """The default study runs on the shipped pretrained miniature: zero-shot is far above
    chance (25 %), and CLIP-SVD with 4 images per class (mean over the seeds) is better still
    (README: the figures of `python3 dev.py study`). Meant to catch the shipped weights not
    being loaded: mini-clip with random weights is below 50 % zero-shot on demo images
    (test_pretrain.py::test_pretrained_model_recognises_held_out_demo_findings), under the
    60 % asked here; a default study on broken weights was not run against it."""
    cfg = yaml.safe_load((study / "config" / "config.yaml").read_text())
    assert (cfg["model"]["name"], cfg["model"]["pretrained"]) == ("mini-clip", "medmnist")
    table = pd.read_csv(study / "results" / "report" / cfg["study"] / "accuracy.csv")
    accuracy = table.set_index(["method", "shots"])["mean"]
    assert accuracy[("zero_shot", 0)] >= 0.6
    assert accuracy[("clip_svd", 4)] > accuracy[("zero_shot", 0)]


@pytest.mark.slow
def test_default_study_interprets_its_clip_svd_runs(study):
    cfg = yaml.safe_load((study / "config" / "config.yaml").read_text())
    runs = study / "results" / "runs" / cfg["study"] / "demo_scans" / "clip_svd" / "few_shot"
    for shots in cfg["shots"]:
        for seed in cfg["seeds"]:
            folder = runs / f"shots{shots}" / f"seed{seed}" / "interpret"
            for name in ("interpret.json", "summary.md", "matrix_changes.csv", "head_changes.csv",
                         "head_descriptions.csv", "matrix_heatmap.png"):
                assert (folder / name).stat().st_size > 0, folder / name
    html = (study / "results" / "report" / cfg["study"] / "report.html").read_text()
    assert "id='interpretation'" in html


@pytest.mark.slow
def test_second_run_has_nothing_to_do(study):
    result = snakemake(study, "-n")
    assert "Nothing to be done" in result.stdout + result.stderr


@pytest.mark.slow
def test_dry_run_lists_the_rules(study):
    result = snakemake(study, "-n", "--forceall")
    out = result.stdout + result.stderr
    for rule in ("demo_data", "prepare", "sample", "adapt", "evaluate", "report"):
        assert f"rule {rule}:" in out or f"\n{rule} " in out


def test_bad_config_stops_before_any_job(tmp_path):
    shutil.copytree(ROOT / "config", tmp_path / "config")
    cfg_path = tmp_path / "config" / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg["shots"] = [-1]
    cfg_path.write_text(yaml.safe_dump(cfg))
    result = snakemake(tmp_path, check=False)
    assert result.returncode != 0
    assert "key 'shots.0': -1 is less than the minimum of 1" in result.stderr
    assert not (tmp_path / "results").exists()


def test_lint_is_clean():
    result = subprocess.run([SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--lint"], cwd=ROOT,
                            capture_output=True, text=True)
    assert "Congratulations" in result.stdout + result.stderr, result.stdout + result.stderr


def test_snakefmt_is_clean():
    snakefmt = str(Path(sys.executable).with_name("snakefmt"))
    files = [str(ROOT / "Snakefile"), str(ROOT / "workflow")]
    result = subprocess.run([snakefmt, "--check", *files], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
def test_snakemake_report_holds_the_table_and_plot(study, tmp_path):
    """Snakemake's report: a home page describing the study, the report's files under
    categories named apart from Snakemake's own pages. Catches: no global description (an
    empty home page), a 'Statistics' category (docutils duplicate-target warnings)."""
    out = tmp_path / "snakemake-report.html"
    result = snakemake(study, "--report", str(out))
    html = out.read_text(errors="replace")
    for name in ("accuracy.csv", "accuracy_vs_shots.svg", "report.html", "datasets.csv",
                 "per_class.csv", "test_bootstrap.csv"):
        assert name in html, name
    assert "Few-shot adaptation of a CLIP-style model" in html  # workflow/report/workflow.rst
    assert "Paired comparison" in html and "Figures" in html
    log = result.stdout + result.stderr
    assert "Duplicate explicit target name" not in log and "(WARNING/2)" not in log, log[-3000:]


@pytest.mark.slow
def test_default_study_report_has_the_dataset_table_and_vector_figures(study):
    """The demo store's split summary in datasets.csv (160 images of 4 classes, patients as
    groups) and every figure as SVG and PNG."""
    report = study / "results" / "report" / "demo"
    table = pd.read_csv(report / "datasets.csv")
    totals = table[table.class_name == "(all)"].set_index("split")
    assert totals.loc[["train", "val", "test"], "images"].sum() == 160
    assert (totals.loc[["train", "val", "test"], "groups"] > 1).all()
    assert (totals.loc[["train", "val", "test"], "classes"] == 4).all()
    assert totals.loc["evaluated: few_shot", "images"] == totals.loc["test", "images"]
    pngs = sorted(report.glob("*.png"))
    methods = yaml.safe_load((study / "config" / "config.yaml").read_text())["methods"]
    # accuracy, reliability, a confusion matrix per method
    assert len(pngs) == 1 + 1 + len(methods)
    assert {p.name for p in pngs if p.name.startswith("confusion_")} == {
        f"confusion_demo_scans_few_shot_{m}.png" for m in methods}
    assert all(p.with_suffix(".svg").is_file() for p in pngs)
    html = (report / "report.html").read_text()
    assert "<td>seeds</td><td>1, 2</td>" in html and "<td>shots per class (K)</td><td>1, 2, 4</td>" in html


def test_catalog_test_directory_dry_runs():
    """`snakemake --directory .test` finds .test/config/config.yaml (the catalog layout) and
    plans the complete study."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / ".test"
        shutil.copytree(ROOT / ".test" / "config", work / "config")
        result = snakemake(work, "-n")
    out = result.stdout + result.stderr
    assert "results/report/catalog_test/report.html" in out
    for rule in ("demo_data", "prepare", "features", "adapt", "evaluate", "interpret", "report"):
        assert f"\n{rule} " in out, rule  # a row of the job stats


@pytest.mark.slow
def test_template_study_runs_as_its_comment_says(tmp_path):
    """config/studies/template.yaml on the data its comment makes (`clipsvd demo-data --out
    data/my_scans`): the full study plans as shipped; it runs (scale cut to one K and one seed
    with --config to keep the suite short; every other line as shipped) two jobs at once on
    2 cores, and `snakemake --report` builds its report with the same --configfile. Caught
    when tried: the template without `threads:` (the schema's 2 threads a job: one at a time)."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    make = subprocess.run([sys.executable, "-m", "clipsvd", "demo-data", "--out",
                           str(tmp_path / "data" / "my_scans")], capture_output=True, text=True)
    assert make.returncode == 0, make.stderr
    template = ["--configfile", "config/studies/template.yaml"]
    planned = snakemake(tmp_path, "-n", *template)
    assert "my_study" in planned.stdout + planned.stderr
    run = snakemake(tmp_path, *template, "--config", "shots=[1]", "seeds=[1]")
    assert most_compute_jobs_at_once(run.stdout + run.stderr) == 2  # --cores 2, 1 thread a job
    report = tmp_path / "results" / "report" / "my_study"
    table = pd.read_csv(report / "accuracy.csv")
    assert set(table.method) == {"zero_shot", "linear_probe", "clip_lora", "comp_lora",
                                 "clip_svd"}
    out = tmp_path / "my_study.html"
    snakemake(tmp_path, "--report", str(out), *template, "--config", "shots=[1]", "seeds=[1]")
    assert "my_study" in out.read_text(errors="replace")
