"""The study's report: tables (CSV, Markdown, LaTeX), figures (PNG), statistics and one
self-contained HTML page, from the run folders alone (docs/report.md lists the files).

- aggregate: run folders → mean ± std over seeds, averages over datasets
- stats: paired comparison of CLIP-SVD with every other method
- tables, figures, html: presentation
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

import pandas as pd

from .. import layout
from ..io import atomic_path, read_json, write_json, write_text
from ..provenance import git_state, package_versions
from . import figures, tables
from .aggregate import (AVERAGE, METHOD_LABELS, average_all, average_over_datasets,
                        base_to_novel_table, best_shots, collect_runs, method_label, method_rank,
                        metrics_of, per_class, summarise, summarise_all, with_average)
from .bootstrap import test_set_bootstrap
from .datasets import dataset_summary
from .stats import paired_comparison

__all__ = ["AVERAGE", "METHOD_LABELS", "average_over_datasets", "build_report", "collect_runs",
           "summarise"]

log = logging.getLogger(__name__)
SETTINGS = ("few_shot", "base_to_novel")


def _csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")


def _accuracy_markdown(table: pd.DataFrame) -> str:
    """accuracy.md: the accuracy summary, one row per (dataset, method, setting, K)."""
    lines = ["| dataset | method | setting | K | accuracy (%) | seeds |",
             "|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.dataset} | {METHOD_LABELS.get(row.method, row.method)} | "
                     f"{row.setting} | {row.shots} | "
                     f"{tables.pm(row.mean, row.std, n_seeds=int(row.n_seeds))} "
                     f"| {row.n_seeds} |")
    return "\n".join(lines) + "\n"


def collect_provenance(runs: pd.DataFrame, config=None) -> dict[str, Any]:
    """What the runs were computed with (from each run.json) and what made the report."""
    commits, dirty, hashes, models, devices = set(), False, set(), set(), set()
    packages: dict[str, set[str]] = {}
    for run_dir in runs.run_dir:
        path = Path(run_dir) / layout.RUN_RECORD
        if not path.exists():
            continue
        record = read_json(path)
        prov, tags = record.get("provenance", {}), record.get("tags", {})
        if prov.get("git_commit"):
            commits.add(str(prov["git_commit"]))
        dirty = dirty or bool(prov.get("git_dirty"))
        for key, target in (("config_hash", hashes), ("device", devices)):
            if prov.get(key):
                target.add(str(prov[key]))
        if tags.get("model"):
            models.add(str(tags["model"]))
        for name, version in prov.get("packages", {}).items():
            packages.setdefault(name, set()).add(str(version))
    git = git_state()
    return {
        "report_date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "report_git_commit": git.get("git_commit", "unknown") + (
            " (uncommitted changes)" if git.get("git_dirty") else ""),
        "report_packages": package_versions(),
        "report_config_hash": config.fingerprint() if config is not None else "",
        "n_runs": int(len(runs)),
        "git_commits": sorted(commits), "git_dirty": dirty, "config_hashes": sorted(hashes),
        "models": sorted(models), "devices": sorted(devices),
        "packages": {name: sorted(v) for name, v in sorted(packages.items())},
    }


def _config_facts(runs: pd.DataFrame, config=None) -> list[tuple[str, str]]:
    """What the study ran. Shots and seeds are those of the methods that have them: zero-shot's
    K = 0 and seed 0 only name its single run and are listed apart."""
    facts = []
    if config is not None:
        facts += [("study", config.study), ("config hash", config.fingerprint()),
                  ("model", f"{config.model.name} ({config.model.pretrained or 'random weights'})")]
    trained = runs[runs.method != "zero_shot"]
    facts += [("datasets", ", ".join(sorted(runs.dataset.unique()))),
              ("methods", ", ".join(METHOD_LABELS.get(m, m) for m in
                                    sorted(runs.method.unique(), key=method_rank))),
              ("settings", ", ".join(sorted(runs.setting.unique())))]
    if len(trained):
        facts += [("shots per class (K)", ", ".join(map(str, sorted(trained.shots.unique())))),
                  ("seeds", ", ".join(map(str, sorted(trained.seed.unique()))))]
    if (runs.method == "zero_shot").any():
        facts.append(("zero-shot", "one run per dataset and setting, reported as K = 0 (no "
                                   "training, no seed)"))
    facts.append(("runs", str(len(runs))))
    return facts


def build_report(run_dirs: list[Path], out_dir: Path, config=None) -> pd.DataFrame:
    """Write every report file into out_dir; returns the accuracy summary (accuracy.csv)."""
    out_dir = Path(out_dir)
    runs = collect_runs(run_dirs)
    if runs.empty:
        raise ValueError("the report needs at least one run folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def out(name: str) -> Path:
        path = out_dir / name
        written.append(path)
        return path

    # The accuracy summary (b2n accuracy is the per-run HM), as before.
    accuracy = summarise(runs)
    _csv(accuracy, out(layout.REPORT_TABLE))
    write_text(out(layout.REPORT_TABLE_MD), _accuracy_markdown(accuracy))
    _csv(runs.drop(columns="run_dir"), out(layout.REPORT_RUNS))
    _csv(summarise_all(runs), out(layout.REPORT_SUMMARY))
    _csv(average_all(runs), out(layout.REPORT_SUMMARY_AVERAGE))

    bootstrap = test_set_bootstrap(runs)
    _csv(bootstrap, out(layout.REPORT_BOOTSTRAP))
    best = best_shots(accuracy)

    # The datasets: images, groups and classes per split, and the test images evaluated.
    dataset_facts = dataset_summary(runs)
    _csv(dataset_facts, out(layout.REPORT_DATASETS.format(ext="csv")))
    dataset_table = tables.datasets(dataset_facts)
    for ext in ("md", "tex"):
        write_text(out(layout.REPORT_DATASETS.format(ext=ext)), tables.render([dataset_table], ext))

    # Per setting: CSV (numbers), Markdown and LaTeX (presentation), per dataset and averaged.
    html_sections = []
    class_metrics = per_class(runs)
    _csv(class_metrics, out(layout.REPORT_PER_CLASS.format(ext="csv")))
    class_tables = []
    for setting in [s for s in SETTINGS if s in set(runs.setting)]:
        wide = with_average(runs, setting)
        averaged = wide[wide.dataset == AVERAGE]
        shown = [tables.accuracy_by_shots(part, setting, bootstrap) for part in (averaged, wide[
            wide.dataset != AVERAGE]) if len(part)]
        if setting == "base_to_novel":
            b2n = base_to_novel_table(runs)
            _csv(b2n, out(layout.REPORT_SETTING_TABLE.format(setting=setting, ext="csv")))
            shown.append(tables.base_to_novel(b2n))
        else:
            _csv(wide, out(layout.REPORT_SETTING_TABLE.format(setting=setting, ext="csv")))
        shown_metrics = [m for m in metrics_of(runs[runs.setting == setting], setting)
                         if setting == "few_shot" or m != "accuracy"]  # b2n accuracy is the HM
        detail = tables.all_metrics(wide, setting, shown_metrics)
        for ext in ("md", "tex"):
            write_text(out(layout.REPORT_SETTING_TABLE.format(setting=setting, ext=ext)),
                       tables.render(shown, ext))
            write_text(out(layout.REPORT_METRICS_TABLE.format(setting=setting, ext=ext)),
                       tables.render([detail], ext))
        classes = [t for t in [tables.per_class(class_metrics, best, setting)] if t.rows]
        class_tables += classes
        html_sections.append((tables.SETTING_LABELS.get(setting, setting),
                              shown + [detail] + classes))
    for ext in ("md", "tex"):
        write_text(out(layout.REPORT_PER_CLASS.format(ext=ext)), tables.render(class_tables, ext)
                   if class_tables else "No per-class metrics in the runs' metrics.json.\n")

    # Paired comparison with CLIP-SVD.
    comparison = paired_comparison(runs)
    comparison_table = tables.comparison(comparison) if not comparison.empty else None
    _csv(comparison, out(layout.REPORT_COMPARISON.format(ext="csv")))
    for ext in ("md", "tex"):
        text = (tables.render([comparison_table], ext) if comparison_table is not None else
                "No paired comparison: no CLIP-SVD runs or no other method with matching runs.\n")
        write_text(out(layout.REPORT_COMPARISON.format(ext=ext)), text)

    # Figures: SVG (shown on the page) and 300 dpi PNG of each.
    figure_list = []

    def figure(pattern: str, caption: str, **fields) -> Path:
        paths = [out(pattern.format(ext=ext, **fields)) for ext in layout.FIGURE_FORMATS]
        figure_list.append((paths[0], caption))
        return paths[0]

    average = average_over_datasets(runs)
    figures.accuracy_vs_shots(accuracy, average, figure(
        layout.REPORT_FIGURE, "Accuracy versus shots per class (K): mean over seeds, band "
        "± 1 std; zero-shot is the square at K=0 and the dashed line. Base-to-novel panels show "
        "the harmonic mean of base and novel accuracy."))
    for setting in [s for s in SETTINGS if s in set(runs.setting)]:
        figures.reliability_curves(runs, best, setting, figure(
            layout.REPORT_RELIABILITY, f"Reliability curves ({setting}): test accuracy per "
            f"confidence bin ({figures.RELIABILITY_BINS} equal-width bins), each method at its "
            "best K with the predictions of all its seeds pooled; the dotted diagonal is "
            "perfect calibration.", setting=setting))
        for dataset in sorted(runs[runs.setting == setting].dataset.unique()):
            here = runs[(runs.setting == setting) & (runs.dataset == dataset)]
            for method in sorted(here.method.unique(), key=method_rank):
                figures.confusion_matrix(runs, best, dataset, setting, method, figure(
                    layout.REPORT_CONFUSION, f"Confusion matrix of {method_label(method)} on "
                    f"{dataset} ({setting}) at its best K (highest mean accuracy), summed over "
                    "that K's seeds; cells are % of the true class (count).", dataset=dataset,
                    setting=setting, method=method))

    interpretation = _interpretation(runs, out_dir)  # issue 9: CLIP-SVD interpret/ folders

    # Provenance and the HTML page.
    provenance = collect_provenance(runs, config)
    write_json(out(layout.REPORT_PROVENANCE), provenance)
    study = config.study if config is not None else Path(run_dirs[0]).parents[4].name
    page = _render_html(study, runs, config, html_sections, comparison_table, figure_list,
                        provenance, interpretation, dataset_table)
    write_text(out(layout.REPORT_HTML), page)
    log.info("report of %d runs: %d files written to %s", len(runs), len(written), out_dir)
    return accuracy


def _render_html(study, runs, config, sections, comparison_table, figure_list, provenance,
                 interpretation="", dataset_table=None):
    from .html import render_page

    return render_page(study, config.as_dict() if config is not None else None,
                       _config_facts(runs, config), sections, comparison_table, figure_list,
                       provenance, interpretation, dataset_table)


def _interpretation(runs: pd.DataFrame, out_dir: Path) -> str:
    """Aggregate the interpret/ folders of the CLIP-SVD runs (if any) into out_dir/interpret/
    and return the report's HTML section for them (empty when no run has one)."""
    from ..interpret import FOLDER, aggregate_interpretations
    from .html import interpretation_section

    interpreted = [Path(d) for d in runs[runs.method == "clip_svd"].run_dir
                   if (Path(d) / FOLDER / "interpret.json").is_file()]
    if not interpreted:
        return ""
    result = aggregate_interpretations(interpreted, out_dir / FOLDER)
    return interpretation_section(out_dir / FOLDER, result)
