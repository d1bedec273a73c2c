"""The report: aggregation over fabricated run folders, the paired comparison of matched runs
(its statistics against their definitions: tests/test_report_stats.py), the Markdown/LaTeX
tables, the report files, and the HTML page in headless Chromium."""
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from browser import ARTIFACTS, ensure_chromium, run_chromium
from clipsvd import layout
from clipsvd.report import build_report, collect_runs, summarise
from clipsvd.report.aggregate import (AVERAGE, average_over_datasets, base_to_novel_table,
                                      best_shots, with_average)
from clipsvd.report.stats import matched_pairs, paired_comparison
from clipsvd.report.tables import Table, accuracy_by_shots, latex_escape

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["cyst", "tumor"]


def fake_run(root, method, shots, seed, accuracy, setting="few_shot", dataset="ds", **extra):
    """A run folder as evaluate writes it: metrics.json (with a confusion matrix consistent with
    the accuracy on 10 test images), predictions.csv and run.json."""
    run = root / layout.RUN.format(study="st", dataset=dataset, method=method, setting=setting,
                                   shots=shots, seed=seed)
    run.mkdir(parents=True)
    correct = round(10 * accuracy)
    cm = [[min(correct, 5), 5 - min(correct, 5)], [5 - (correct - min(correct, 5)),
                                                   correct - min(correct, 5)]]
    metrics = {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy,
               "macro_auroc": 0.9, "ece": 0.1, "n_test": 10, "confusion_matrix": cm,
               "class_names": CLASSES, "per_class": {}, **extra}
    if setting == "base_to_novel":
        for group in ("base", "novel"):
            metrics[f"{group}_confusion_matrix"] = cm
            metrics[f"{group}_class_names"] = CLASSES
            metrics[f"{group}_ece"] = 0.1
    (run / layout.METRICS).write_text(json.dumps(metrics))
    labels = [0] * 5 + [1] * 5
    preds = [0] * cm[0][0] + [1] * cm[0][1] + [0] * cm[1][0] + [1] * cm[1][1]
    p1 = [0.3 if p == 0 else 0.8 for p in preds]
    pd.DataFrame({"sample_id": [f"s{i}" for i in range(10)], "group": "all", "label": labels,
                  "class_name": [CLASSES[y] for y in labels], "prediction": preds,
                  "predicted_class": [CLASSES[p] for p in preds],
                  "p_cyst": [1 - p for p in p1], "p_tumor": p1}).to_csv(
        run / layout.PREDICTIONS, index=False)
    (run / layout.RUN_RECORD).write_text(json.dumps({
        "tags": {"model": "tiny-clip:random"},
        "provenance": {"git_commit": "abc123", "git_dirty": False, "config_hash": "cafe01",
                       "device": "cpu", "packages": {"torch": "2.4.0", "numpy": "2.0.0"}}}))
    return run


@pytest.fixture
def runs(tmp_path):
    return [
        fake_run(tmp_path, "zero_shot", 0, 0, 0.25),
        fake_run(tmp_path, "clip_svd", 1, 1, 0.40),
        fake_run(tmp_path, "clip_svd", 1, 2, 0.50),
        fake_run(tmp_path, "clip_svd", 2, 1, 0.70),
        fake_run(tmp_path, "clip_svd", 2, 2, 0.90),
    ]


def study_runs(root):
    """Two datasets, zero-shot, linear probe and CLIP-SVD at K ∈ {1, 2}, seeds {1, 2, 3}, and a
    base-to-novel setting on dataset 'a'."""
    dirs = []
    for d, offset in (("a", 0.0), ("b", 0.1)):
        dirs.append(fake_run(root, "zero_shot", 0, 0, 0.3 + offset, dataset=d))
        for k in (1, 2):
            for s in (1, 2, 3):
                dirs.append(fake_run(root, "linear_probe", k, s, 0.4 + offset + 0.1 * (k == 2),
                                     dataset=d))
                dirs.append(fake_run(root, "clip_svd", k, s,
                                     0.5 + offset + 0.1 * (k == 2) + 0.1 * (s == 3), dataset=d))
    for method, shots, seeds, base, novel in (("zero_shot", 0, [0], 0.6, 0.4),
                                              ("clip_svd", 1, [1, 2], 0.8, 0.5)):
        for s in seeds:
            b, n = base + 0.1 * (s == 2), novel
            dirs.append(fake_run(root, method, shots, s, 2 * b * n / (b + n), dataset="a",
                                 setting="base_to_novel", base_accuracy=b, novel_accuracy=n,
                                 harmonic_mean=2 * b * n / (b + n)))
    return dirs


# --- aggregation -----------------------------------------------------------------------------

def test_collect_reads_identity_from_the_layout(runs):
    table = collect_runs(runs)
    assert set(table.columns) >= {"dataset", "method", "setting", "shots", "seed", "accuracy"}
    row = table[(table.method == "clip_svd") & (table.shots == 2) & (table.seed == 2)].iloc[0]
    assert row.accuracy == 0.90 and row.dataset == "ds" and row.setting == "few_shot"
    assert "confusion_matrix" not in table.columns  # only scalars
    assert list(table.method.unique()) == ["zero_shot", "clip_svd"]  # the paper's order


def test_summary_is_mean_and_sample_std_over_seeds(runs):
    table = summarise(collect_runs(runs)).set_index(["method", "shots"])
    assert table.loc[("clip_svd", 1), "mean"] == pytest.approx(0.45)
    assert table.loc[("clip_svd", 1), "std"] == pytest.approx(0.0707106781)  # sample std (n-1)
    assert table.loc[("clip_svd", 2), "n_seeds"] == 2
    assert table.loc[("zero_shot", 0), "std"] == 0.0


def test_average_over_datasets(tmp_path):
    runs = collect_runs(study_runs(tmp_path))
    avg = average_over_datasets(runs[runs.setting == "few_shot"]).set_index(["method", "shots"])
    # CLIP-SVD K=1: dataset a seeds (0.5, 0.5, 0.6), b (0.6, 0.6, 0.7).
    assert avg.loc[("clip_svd", 1), "mean"] == pytest.approx((0.5333333 + 0.6333333) / 2)
    per_seed = np.array([0.55, 0.55, 0.65])  # average over datasets per seed
    assert avg.loc[("clip_svd", 1), "std"] == pytest.approx(per_seed.std(ddof=1))
    assert avg.loc[("clip_svd", 1), "n_datasets"] == 2
    assert avg.loc[("clip_svd", 1), "n_seeds"] == 3
    assert avg.loc[("zero_shot", 0), "mean"] == pytest.approx(0.35)
    assert avg.loc[("zero_shot", 0), "std"] == 0.0
    wide = with_average(runs, "few_shot")
    assert list(wide.dataset.unique()) == [AVERAGE, "a", "b"]
    row = wide[(wide.dataset == "b") & (wide.method == "linear_probe") & (wide.shots == 2)]
    assert row.accuracy_mean.item() == pytest.approx(0.6) and row.n_seeds.item() == 3
    assert best_shots(summarise(runs))[("a", "few_shot", "clip_svd")] == 2


def test_base_to_novel_table(tmp_path):
    runs = collect_runs(study_runs(tmp_path))
    table = base_to_novel_table(runs).set_index(["dataset", "method", "shots"])
    row = table.loc[("a", "clip_svd", 1)]
    assert row.base_mean == pytest.approx(0.85) and row.novel_mean == pytest.approx(0.5)
    assert row.base_std == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert row.hm == pytest.approx(2 * 0.85 * 0.5 / 1.35)  # HM of the means
    per_run = [2 * b * 0.5 / (b + 0.5) for b in (0.8, 0.9)]
    assert row.hm_per_run_mean == pytest.approx(np.mean(per_run))
    assert AVERAGE not in table.index.get_level_values(0)  # one dataset: no average rows
    assert table.loc[("a", "zero_shot", 0)].n_seeds == 1


# --- statistics ------------------------------------------------------------------------------

def test_paired_comparison_matches_runs(tmp_path):
    runs = collect_runs(study_runs(tmp_path))
    pairs = matched_pairs(runs[runs.setting == "few_shot"], "linear_probe")
    assert len(pairs) == 12  # 2 datasets × 2 shots × 3 seeds
    assert pairs.difference.to_numpy() == pytest.approx(
        np.where(pairs.seed == 3, 0.2, 0.1))
    zero = matched_pairs(runs, "zero_shot")
    assert len(zero[zero.setting == "few_shot"]) == 12  # zero-shot reused for every CLIP-SVD run
    table = paired_comparison(runs)
    overall = table[(table.method == "linear_probe") & (table.scope == "all")].iloc[0]
    assert overall.n_pairs == 12 and overall.mean_difference == pytest.approx(0.4 / 3)
    # all twelve differences positive: only that sign pattern is as extreme, p = 2 / 2^12
    assert overall.p_value == pytest.approx(2 / 2 ** 12)
    assert overall.ci_low <= overall.mean_difference <= overall.ci_high
    assert set(table.scope) >= {"all", "shots=1", "shots=2", "dataset=a", "dataset=b"}
    assert table[table.method == "zero_shot"].zero_shot_reused.all()
    b2n = table[(table.setting == "base_to_novel") & (table.scope == "all")]
    assert b2n.n_pairs.tolist() == [2]


# --- tables ----------------------------------------------------------------------------------

def test_markdown_and_latex_tables(tmp_path):
    runs = collect_runs(study_runs(tmp_path))
    table = accuracy_by_shots(with_average(runs, "few_shot").query("dataset != @AVERAGE"),
                              "few_shot")
    markdown = table.markdown()
    assert "| Dataset | Method | K=0 | K=1 | K=2 |" in markdown
    assert "| a | Zero-shot | 30.00 ± 0.00 | – | – |" in markdown
    assert "| a | CLIP-SVD | – | **53.33 ± 5.77** | **63.33 ± 5.77** |" in markdown
    latex = table.latex()
    for piece in ("\\begin{tabular}{llrrr}", "\\toprule", "\\midrule", "\\bottomrule",
                  "\\textbf{53.33 $\\pm$ 5.77}", "Zero-shot & 30.00 $\\pm$ 0.00 & -- & --"):
        assert piece in latex
    assert latex_escape("demo_scans 50% & #1") == "demo\\_scans 50\\% \\& \\#1"
    small = Table("cap", ["Dataset", "n"], [["x_y", "1"]], text_columns=1).latex()
    assert "x\\_y & 1 \\\\" in small and "\\begin{tabular}{lr}" in small


# --- the report folder and the HTML page -----------------------------------------------------

@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    out = root / "report"
    build_report(study_runs(root), out)
    return out


def test_report_files(runs, tmp_path):
    out = tmp_path / "report"
    build_report(runs, out)
    table = pd.read_csv(out / layout.REPORT_TABLE)
    assert list(table.columns) == ["dataset", "method", "setting", "shots", "mean", "std",
                                   "n_seeds"]
    assert len(table) == 3
    markdown = (out / layout.REPORT_TABLE_MD).read_text()
    assert "| ds | CLIP-SVD | few_shot | 2 | 80.00 ± 14.14 | 2 |" in markdown
    assert (out / layout.REPORT_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_folder_of_a_study(report_dir):
    expected = [layout.REPORT_TABLE, layout.REPORT_TABLE_MD, layout.REPORT_PLOT,
                layout.REPORT_RUNS, layout.REPORT_SUMMARY, layout.REPORT_SUMMARY_AVERAGE,
                layout.REPORT_PROVENANCE, layout.REPORT_HTML]
    for setting in ("few_shot", "base_to_novel"):
        expected += [layout.REPORT_SETTING_TABLE.format(setting=setting, ext=e)
                     for e in ("csv", "md", "tex")]
        expected += [layout.REPORT_METRICS_TABLE.format(setting=setting, ext=e)
                     for e in ("md", "tex")]
        expected.append(layout.REPORT_RELIABILITY.format(setting=setting))
    expected += [layout.REPORT_COMPARISON.format(ext=e) for e in ("csv", "md", "tex")]
    expected += [layout.REPORT_CONFUSION.format(dataset=d, setting="few_shot") for d in "ab"]
    expected.append(layout.REPORT_CONFUSION.format(dataset="a", setting="base_to_novel"))
    missing = [name for name in expected if not (report_dir / name).is_file()]
    assert not missing
    few = pd.read_csv(report_dir / "few_shot.csv")
    avg = few[(few.dataset == AVERAGE) & (few.method == "clip_svd") & (few.shots == 1)]
    assert avg.accuracy_mean.item() == pytest.approx(0.583333, abs=1e-6)
    b2n_md = (report_dir / "base_to_novel.md").read_text()
    assert "| a | CLIP-SVD | 1 | **85.00 ± 7.07** | **50.00 ± 0.00** | **62.96** |" in b2n_md
    comparison = (report_dir / "comparison.md").read_text()
    assert "zero-shot run reused for every pair" in comparison and "Wilcoxon" in comparison
    provenance = json.loads((report_dir / layout.REPORT_PROVENANCE).read_text())
    assert provenance["git_commits"] == ["abc123"] and provenance["config_hashes"] == ["cafe01"]
    html = (report_dir / layout.REPORT_HTML).read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count("<img ") == html.count("src='data:image/png;base64,")


@pytest.fixture(scope="session")
def chromium():
    path = ensure_chromium()
    if path is None:
        pytest.skip("chromium is not installed and could not be installed (needs root and "
                    "apt-get: `apt-get install -y chromium`)")
    return path


def test_html_report_renders_in_chromium(report_dir, chromium, tmp_path):
    # A copy of the page with a probe that marks each image as loaded once the page has loaded;
    # the report itself has no script.
    probe = ("<script>window.addEventListener('load',()=>{for(const i of document.images)"
             "i.setAttribute('data-loaded',String(i.complete&&i.naturalWidth>0));"
             "document.body.setAttribute('data-done','1')});</script>")
    page = tmp_path / "probe.html"
    page.write_text((report_dir / layout.REPORT_HTML).read_text().replace("</body>",
                                                                           probe + "</body>"))
    dom = run_chromium(chromium, tmp_path / "profile", "--virtual-time-budget=10000",
                       "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert 'data-done="1"' in html
    images = re.findall(r"<img [^>]*>", html)
    assert len(images) == 6  # accuracy, 2 reliability, 3 confusion
    assert all('src="data:image/png;base64,' in img for img in images)
    assert all('data-loaded="true"' in img for img in images), "a broken image"
    assert html.count("<table") >= 8
    assert "Paired comparison of CLIP-SVD" in html and "Provenance" in html
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "report_html.png"
    result = run_chromium(chromium, tmp_path / "profile2", "--hide-scrollbars",
                          f"--screenshot={shot}", "--window-size=1280,4000",
                          (report_dir / layout.REPORT_HTML).as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_report_of_the_default_study_matches_its_run_folders(local_default_study):
    """The default study's report (built by the workflow): every table row against the runs."""
    results = local_default_study / "results"
    study = next((results / "report").iterdir())
    run_dirs = sorted(p.parent for p in (results / "runs" / study.name).rglob(layout.METRICS))
    few = pd.read_csv(study / "few_shot.csv")
    metrics = ["accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece"]
    seen = set()
    for run_dir in run_dirs:
        setting, method, dataset = (run_dir.parents[i].name for i in (1, 2, 3))
        shots = int(run_dir.parent.name.removeprefix("shots"))
        if setting != "few_shot" or (dataset, method, shots) in seen:
            continue
        seen.add((dataset, method, shots))
        seeds = [json.loads((p / layout.METRICS).read_text()) for p in run_dir.parent.iterdir()]
        row = few[(few.dataset == dataset) & (few.method == method) & (few.shots == shots)]
        assert len(row) == 1 and row.n_seeds.item() == len(seeds)
        for metric in metrics:
            values = [m[metric] for m in seeds]
            assert row[f"{metric}_mean"].item() == pytest.approx(np.mean(values), abs=1e-6)
            std = np.std(values, ddof=1) if len(values) > 1 else 0.0
            assert row[f"{metric}_std"].item() == pytest.approx(std, abs=1e-6)
    assert len(few) == len(seen)
    comparison = pd.read_csv(study / "comparison.csv")
    n_svd = sum(1 for p in run_dirs if p.parents[2].name == "clip_svd")
    overall = comparison[(comparison.scope == "all") & (comparison.method == "zero_shot")]
    assert overall.n_pairs.tolist() == [n_svd]
    html = (study / layout.REPORT_HTML).read_text()
    assert html.count("src='data:image/png;base64,") >= 3 and "Provenance" in html
