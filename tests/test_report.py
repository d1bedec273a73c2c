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
    per_class = {}
    for i, name in enumerate(CLASSES):
        predicted = cm[0][i] + cm[1][i]
        per_class[name] = {"precision": cm[i][i] / predicted if predicted else 0.0,
                           "recall": cm[i][i] / 5, "support": 5}
    metrics = {"accuracy": accuracy, "balanced_accuracy": accuracy, "macro_f1": accuracy,
               "macro_auroc": 0.9, "ece": 0.1, "n_test": 10, "confusion_matrix": cm,
               "class_names": CLASSES, "per_class": per_class, **extra}
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
        "inputs": [{"name": dataset, "context": "test", "source": str(root / "stores" / dataset),
                    "digest": "0", "profile": {}}],
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


def test_base_to_novel_table_says_tip_adapters_score_novel_classes_as_zero_shot():
    from clipsvd.report.tables import base_to_novel

    def rows(methods):
        return pd.DataFrame([{"dataset": "a", "method": m, "shots": 4, "base_mean": 0.8,
                              "base_std": 0.01, "novel_mean": 0.4, "novel_std": 0.02, "hm": 0.53,
                              "n_seeds": 3, "n_datasets": np.nan} for m in methods])
    note = base_to_novel(rows(["clip_svd", "tip_adapter", "tip_adapter_f"])).note
    assert ("Tip-Adapter and Tip-Adapter-F: the cache holds base classes only, so novel classes "
            "are scored with zero-shot's logits") in note
    assert "Tip-Adapter" not in base_to_novel(rows(["clip_svd", "clip_adapter"])).note


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
    assert "| a | Zero-shot | 30.00 (n = 1 seed) | – | – |" in markdown  # no "± 0.00"
    assert "| a | CLIP-SVD | – | **53.33 ± 5.77** | **63.33 ± 5.77** |" in markdown
    latex = table.latex()
    for piece in ("\\begin{tabular}{llrrr}", "\\toprule", "\\midrule", "\\bottomrule",
                  "\\textbf{53.33 $\\pm$ 5.77}", "Zero-shot & 30.00 (n = 1 seed) & -- & --"):
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
    expected += [layout.REPORT_PLOT_VECTOR, layout.REPORT_BOOTSTRAP]
    for setting in ("few_shot", "base_to_novel"):
        expected += [layout.REPORT_SETTING_TABLE.format(setting=setting, ext=e)
                     for e in ("csv", "md", "tex")]
        expected += [layout.REPORT_METRICS_TABLE.format(setting=setting, ext=e)
                     for e in ("md", "tex")]
        expected += [layout.REPORT_RELIABILITY.format(setting=setting, ext=e)
                     for e in layout.FIGURE_FORMATS]
    for pattern in (layout.REPORT_COMPARISON, layout.REPORT_DATASETS, layout.REPORT_PER_CLASS):
        expected += [pattern.format(ext=e) for e in ("csv", "md", "tex")]
    expected += [layout.REPORT_CONFUSION.format(dataset=d, setting="few_shot", method=m, ext=e)
                 for d in "ab" for m in ("zero_shot", "linear_probe", "clip_svd")
                 for e in layout.FIGURE_FORMATS]
    expected += [layout.REPORT_CONFUSION.format(dataset="a", setting="base_to_novel", method=m,
                                                ext=e)
                 for m in ("zero_shot", "clip_svd") for e in layout.FIGURE_FORMATS]
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
    assert html.count("<img ") == html.count("src='data:image/svg+xml;base64,")  # vector


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
    assert len(images) == 11  # accuracy, 2 reliability, 8 confusion (one per method)
    assert all('src="data:image/svg+xml;base64,' in img for img in images)
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
    assert html.count("src='data:image/svg+xml;base64,") >= 3 and "Provenance" in html


# --- what a journal needs (issue 19) ---------------------------------------------------------

def test_figures_are_svg_and_300_dpi_png(report_dir):
    """Every report figure exists as SVG (vector) and as PNG at 300 dpi. Catches: a PNG-only
    figure, the old 110 dpi."""
    from PIL import Image

    pngs = sorted(report_dir.glob("*.png"))
    assert len(pngs) == 11
    for png in pngs:
        svg = png.with_suffix(".svg")
        assert svg.read_text(encoding="utf-8").lstrip().startswith("<?xml"), svg
        assert "<svg" in svg.read_text(encoding="utf-8")
        dpi = Image.open(png).info["dpi"]
        assert dpi == pytest.approx((300, 300), abs=0.5), png


def test_figures_are_byte_identical_when_rebuilt(tmp_path, report_dir):
    """The same runs give the same figure bytes (no dates, fixed SVG ids). Catches: a missing
    svg.hashsalt or date metadata."""
    root = tmp_path / "again"
    root.mkdir()
    out = root / "report"
    build_report(study_runs(root), out)
    for name in ("accuracy_vs_shots.svg", "accuracy_vs_shots.png", "reliability_few_shot.svg"):
        assert (out / name).read_bytes() == (report_dir / name).read_bytes(), name


def _overlaps(a, b) -> bool:
    return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def test_legends_sit_outside_the_data(tmp_path):
    """No legend box overlaps any panel of the accuracy and reliability figures. Catches: a
    legend placed inside the axes (loc='best', 'upper left'), as before."""
    from clipsvd.report import figures

    runs = collect_runs(study_runs(tmp_path))
    accuracy = summarise(runs)
    built = [figures.accuracy_vs_shots_figure(accuracy, average_over_datasets(runs)),
             figures.reliability_figure(runs, best_shots(accuracy), "few_shot")]
    for fig in built:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.get_visible()]
        legends = list(fig.legends) + [ax.get_legend() for ax in axes if ax.get_legend()]
        assert legends
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert not any(_overlaps(box, ax.get_window_extent(renderer)) for ax in axes)


def test_one_readable_confusion_matrix_per_method(report_dir):
    """A figure per (dataset, setting, method): one matrix (base-to-novel: base and novel), at
    least ~0.6 inch per cell. Catches: the old one-figure-for-all-methods layout."""
    from PIL import Image

    few = sorted(report_dir.glob("confusion_a_few_shot_*.png"))
    assert [p.stem.removeprefix("confusion_a_few_shot_") for p in few] == [
        "clip_svd", "linear_probe", "zero_shot"]
    single = Image.open(few[0]).size
    b2n = Image.open(report_dir / "confusion_a_base_to_novel_clip_svd.png").size
    assert b2n[0] > 1.6 * single[0]  # base and novel side by side
    assert single[0] / 300 <= 5.5  # one 2-class matrix fits a column (inches at 300 dpi)


def test_configuration_lists_no_placeholder_shots_or_seeds(tmp_path):
    """Zero-shot's K = 0 and seed 0 name its single run: they are not study shots or seeds.
    Catches: shots and seeds collected over every run (the old '0, 1, 2, 3')."""
    from clipsvd.report import _config_facts

    facts = dict(_config_facts(collect_runs(study_runs(tmp_path))))
    assert facts["seeds"] == "1, 2, 3"
    assert facts["shots per class (K)"] == "1, 2"
    assert "K = 0" in facts["zero-shot"]


def test_html_configuration_table_has_no_placeholder_seeds(report_dir):
    html = (report_dir / layout.REPORT_HTML).read_text()
    config = html[html.index("id='config'"):html.index("id='datasets'")]
    assert "<td>seeds</td><td>1, 2, 3</td>" in config
    assert "<td>shots per class (K)</td><td>1, 2</td>" in config


def test_single_runs_say_n_1_seed_and_few_seeds_get_test_set_intervals(tmp_path):
    """A cell of one run shows no '± 0.00' but '(n = 1 seed)' and its test-set bootstrap
    interval; cells with fewer than 3 seeds get the interval too. Catches: pm without n_seeds,
    intervals not passed to the table."""
    dirs = [fake_run(tmp_path, "zero_shot", 0, 0, 0.3), fake_run(tmp_path, "clip_svd", 1, 1, 0.6),
            fake_run(tmp_path, "clip_svd", 1, 2, 0.8)]
    out = tmp_path / "report"
    build_report(dirs, out)
    markdown = (out / "few_shot.md").read_text()
    assert "± 0.00" not in markdown
    row = next(line for line in markdown.splitlines() if "Zero-shot" in line)
    assert re.search(r"30\.00 \[\d+\.\d, \d+\.\d\] \(n = 1 seed\)", row), row
    row = next(line for line in markdown.splitlines() if "CLIP-SVD" in line)
    assert re.search(r"70\.00 ± 14\.14 \[\d+\.\d, \d+\.\d\]", row), row
    assert "bootstrap of the test images" in markdown


def test_test_set_bootstrap_and_significance_marks(tmp_path):
    """Paired test-set bootstrap: CLIP-SVD at 90% against a probe at 10% on the same 10 images
    differs (interval excludes 0, † in the table); 60% against 50% (one image apart) does not.
    Intervals contain the mean, a perfect run's interval is [1, 1], and the result repeats.
    Catches: unpaired resampling, marks not drawn, a mark on the wrong cell."""
    from clipsvd.report.bootstrap import test_set_bootstrap

    dirs = []
    for seed in (1, 2, 3):
        dirs += [fake_run(tmp_path, "clip_svd", 1, seed, 0.9),
                 fake_run(tmp_path, "linear_probe", 1, seed, 0.1),
                 fake_run(tmp_path, "clip_svd", 2, seed, 0.6),
                 fake_run(tmp_path, "linear_probe", 2, seed, 0.5)]
    dirs.append(fake_run(tmp_path, "zero_shot", 0, 0, 1.0))
    runs = collect_runs(dirs)
    table = test_set_bootstrap(runs)
    assert table.equals(test_set_bootstrap(runs))
    probe = table[table.method == "linear_probe"].set_index("shots")
    assert bool(probe.loc[1, "significant"]) and not bool(probe.loc[2, "significant"])
    assert probe.loc[1, "difference"] == pytest.approx(0.8)
    assert probe.loc[1, "difference_ci_low"] > 0
    assert probe.loc[2, "difference_ci_low"] <= 0 < probe.loc[2, "difference_ci_high"]
    assert (table.ci_low <= table["mean"]).all() and (table["mean"] <= table.ci_high).all()
    zero = table[table.method == "zero_shot"]
    assert (zero.ci_low == 1.0).all() and (zero.ci_high == 1.0).all()
    assert sorted(zero.reference_shots) == [1, 2]  # zero-shot against every CLIP-SVD K
    shown = accuracy_by_shots(with_average(runs, "few_shot"), "few_shot", table).markdown()
    lines = {line.split("|")[2].strip(): line for line in shown.splitlines()
             if line.startswith("| ds")}
    assert "10.00 ± 0.00†" in lines["Linear probe"] and "50.00 ± 0.00 |" in lines["Linear probe"]
    assert "†" not in lines["CLIP-SVD"] and "†" not in lines["Zero-shot"]


def test_each_settings_table_shows_its_own_intervals_and_marks(tmp_path):
    """A dataset in both settings: the few-shot table's intervals and † come from the few-shot
    runs, the base-to-novel table's from the base-to-novel runs. Caught when tried: the lookup
    keyed by (dataset, method, K) without the setting showed few-shot zero-shot's interval
    beside the base-to-novel harmonic mean, and marked CLIP-LoRA there for its few-shot
    difference (the miniature study's report)."""
    dirs = [fake_run(tmp_path, "zero_shot", 0, 0, 0.3),
            fake_run(tmp_path, "zero_shot", 0, 0, 1.0, setting="base_to_novel")]
    for seed in (1, 2):
        dirs += [fake_run(tmp_path, "clip_svd", 1, seed, 0.9),
                 fake_run(tmp_path, "clip_lora", 1, seed, 0.1),
                 fake_run(tmp_path, "clip_svd", 1, seed, 0.6, setting="base_to_novel"),
                 fake_run(tmp_path, "clip_lora", 1, seed, 0.6, setting="base_to_novel")]
    out = tmp_path / "report"
    build_report(dirs, out)
    rows = {setting: {line.split("|")[2].strip(): line for line in
                      (out / f"{setting}.md").read_text().splitlines() if line.startswith("| ds")}
            for setting in ("few_shot", "base_to_novel")}
    few, b2n = rows["few_shot"], rows["base_to_novel"]
    assert "30.00 [" in few["Zero-shot"] and "[100.0, 100.0]" not in few["Zero-shot"]
    assert "100.00 [100.0, 100.0]" in b2n["Zero-shot"], b2n["Zero-shot"]
    assert "†" in few["CLIP-LoRA"] and "†" not in b2n["CLIP-LoRA"], (few, b2n)


def _store(path: Path, with_splits: bool) -> None:
    """A minimal prepared store: 6 images, 2 classes, groups (patients) per split."""
    path.mkdir(parents=True)
    index = pd.DataFrame({"sample_id": [f"s{i}" for i in range(6)],
                          "source_path": [f"x{i}.png" for i in range(6)],
                          "label": [0, 1, 0, 1, 0, 1],
                          "class_name": ["cyst", "tumor"] * 3,
                          "split": ["train", "train", "train", "train", "val", "test"],
                          "group": ["p1", "p1", "p2", "p3", "p4", "p5"]})
    index.to_csv(path / "index.csv", index=False)
    np.save(path / "images.npy", np.zeros((6, 3, 4, 4), dtype=np.uint8))
    (path / "classes.json").write_text(json.dumps({"classes": CLASSES}))
    provenance = {"dataset": path.name}
    if with_splits:
        from clipsvd.data.store import split_summary

        provenance["splits"] = split_summary(index)
        provenance["splits"]["train"]["groups"] = 99  # tells which source the table used
    (path / "provenance.json").write_text(json.dumps(provenance))


@pytest.mark.parametrize("with_splits", [True, False])
def test_dataset_table_per_split_and_test_n(tmp_path, with_splits):
    """Images, groups and classes per split from the store's provenance 'splits' (or, for an
    older store, its index.csv), and the evaluated test images per setting. Catches: a table
    missing splits, groups or the evaluated n; ignoring provenance['splits']."""
    _store(tmp_path / "stores" / "ds", with_splits)
    out = tmp_path / "report"
    build_report([fake_run(tmp_path, "zero_shot", 0, 0, 0.3),
                  fake_run(tmp_path, "clip_svd", 1, 1, 0.6)], out)
    table = pd.read_csv(out / "datasets.csv")
    totals = table[table.class_name == "(all)"].set_index("split")
    assert totals.loc["train", "images"] == 4 and totals.loc["val", "images"] == 1
    assert totals.loc["train", "groups"] == (99 if with_splits else 3)
    assert totals.loc["test", "classes"] == 1
    assert totals.loc["evaluated: few_shot", "images"] == 10  # the runs' n_test
    per_class = table[(table.split == "train") & (table.class_name != "(all)")]
    assert dict(zip(per_class.class_name, per_class.images)) == {"cyst": 2, "tumor": 2}
    markdown = (out / "datasets.md").read_text()
    assert "| ds | train | 4 |" in markdown and "| ds | evaluated: few_shot | 10 |" in markdown
    assert "id='datasets'" in (out / layout.REPORT_HTML).read_text()


def test_per_class_metrics(report_dir):
    """per_class.csv: precision, recall and F1 per class from metrics.json, over seeds; the
    Markdown table shows each method at its best K. Catches: per-class values only in
    metrics.json (as before), F1 taken as the mean of P and R."""
    table = pd.read_csv(report_dir / "per_class.csv")
    row = table[(table.dataset == "a") & (table.method == "clip_svd") & (table.shots == 2)
                & (table.class_name == "tumor") & (table.setting == "few_shot")].iloc[0]
    # Seeds 1, 2 at 0.6 and seed 3 at 0.7 on 10 images (fake_run's confusion matrices).
    recalls = [0.2, 0.2, 0.4]
    precisions = [1.0, 1.0, 1.0]
    f1 = [2 * p * r / (p + r) for p, r in zip(precisions, recalls)]
    assert row.recall_mean == pytest.approx(np.mean(recalls), abs=1e-6)  # CSV: 6 decimals
    assert row.recall_std == pytest.approx(np.std(recalls, ddof=1), abs=1e-6)
    assert row.f1_mean == pytest.approx(np.mean(f1), abs=1e-6) and row.support == 5
    markdown = (report_dir / "per_class.md").read_text()
    assert "| a | CLIP-SVD | 2 | tumor | 5 |" in markdown
    assert "| a | CLIP-SVD | 1 | tumor |" not in markdown  # only the best K


def test_report_sections_in_chromium(report_dir, chromium, tmp_path):
    """A screenshot of every section of the HTML page (test-artifacts/report_<section>.png),
    each section present and non-empty."""
    from browser import WebDriver, ensure_chromedriver

    driver_path = ensure_chromedriver()
    if driver_path is None:
        pytest.skip("chromedriver is not installed (apt-get install -y chromium-driver)")
    sections = ["config", "datasets", "tables", "statistics", "figures", "provenance"]
    ARTIFACTS.mkdir(exist_ok=True)
    with WebDriver(chromium, driver_path, tmp_path / "profile", 1400, 1000) as page:
        page.get((report_dir / layout.REPORT_HTML).as_uri())
        assert page.wait_for("return document.readyState === 'complete'")
        for section in sections:
            height = page.script(
                "const h = document.getElementById(arguments[0]); h.scrollIntoView();"
                "let n = h.nextElementSibling, size = 0;"
                "while (n && n.tagName !== 'H2') { size += n.offsetHeight; n = n.nextElementSibling; }"
                "return size;", section)
            assert height > 20, section
            page.screenshot(ARTIFACTS / f"report_{section}.png")
            assert (ARTIFACTS / f"report_{section}.png").read_bytes()[:4] == b"\x89PNG"
