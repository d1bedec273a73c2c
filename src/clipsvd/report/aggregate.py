"""From run folders to summary tables: mean ± std over seeds, and the average over datasets.

Conventions (also written into the report):

- Per (dataset, method, setting, shots): mean and *sample* standard deviation (ddof = 1) over
  seeds; a single run (zero-shot has one, at K = 0 and seed 0) has std 0.
- Average over datasets per (method, setting, shots), as in the paper's tables: the mean is the
  unweighted average of the per-dataset means. Its std is the sample std over seeds of the
  per-seed dataset average (for each seed, average the metric over the datasets, then take the
  std of those averages), using the seeds every dataset has; 0 with one seed.
- Base-to-novel: ``accuracy`` of a run is its harmonic mean (HM) of base and novel accuracy.
  The tables' HM column follows CoOp/CoCoOp/CLIP-SVD: the HM of the mean base and mean novel
  accuracy (per dataset; for the average, of the averaged base and novel accuracy).
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from .. import layout
from ..io import read_json

KEYS = ["dataset", "method", "setting", "shots"]
METHOD_ORDER = ["zero_shot", "linear_probe", "lp_pp", "tip_adapter", "tip_adapter_f",
                "clip_adapter", "coop", "cocoop", "kgcoop", "biomedcoop", "clip_lora", "comp_lora", "clip_svd",
                "full_finetune"]
METHOD_LABELS = {"zero_shot": "Zero-shot", "linear_probe": "Linear probe", "clip_lora": "CLIP-LoRA",
                 "comp_lora": "Comp-LoRA", "clip_svd": "CLIP-SVD", "tip_adapter": "Tip-Adapter",
                 "tip_adapter_f": "Tip-Adapter-F", "lp_pp": "LP++", "clip_adapter": "CLIP-Adapter",
                 "full_finetune": "Full fine-tuning", "coop": "CoOp",
                 "cocoop": "CoCoOp", "kgcoop": "KgCoOp",
                 "biomedcoop": "BiomedCoOp"}
SETTING_LABELS = {"few_shot": "Few-shot", "base_to_novel": "Base-to-novel"}
REFERENCE = "clip_svd"
AVERAGE = "Average"  # the dataset name of rows averaged over datasets

# Scalar metrics summarised per setting (base_/novel_ variants exist only for base-to-novel).
FEW_SHOT_METRICS = ["accuracy", "balanced_accuracy", "macro_f1", "macro_auroc", "ece"]
B2N_METRICS = ["base_accuracy", "novel_accuracy", "harmonic_mean", "base_balanced_accuracy",
               "novel_balanced_accuracy", "base_macro_f1", "novel_macro_f1", "base_macro_auroc",
               "novel_macro_auroc", "base_ece", "novel_ece"]
METRIC_LABELS = {"accuracy": "Accuracy", "balanced_accuracy": "Balanced acc.",
                 "macro_f1": "Macro-F1", "macro_auroc": "Macro AUROC", "ece": "ECE",
                 "base_accuracy": "Base", "novel_accuracy": "Novel",
                 "harmonic_mean": "HM (per run)"}
for _group in ("base", "novel"):
    for _metric in ("balanced_accuracy", "macro_f1", "macro_auroc", "ece"):
        METRIC_LABELS[f"{_group}_{_metric}"] = f"{_group.title()} {METRIC_LABELS[_metric]}"


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def method_rank(method: str) -> int:
    return METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER)


def run_identity(run_dir: Path) -> dict:
    """dataset, method, setting, shots and seed from the run folder's place in the layout."""
    run_dir = Path(run_dir)
    setting, method, dataset = (run_dir.parents[i].name for i in (1, 2, 3))
    return {"dataset": dataset, "method": method, "setting": setting,
            "shots": int(run_dir.parent.name.removeprefix("shots")),
            "seed": int(run_dir.name.removeprefix("seed"))}


def collect_runs(run_dirs: list[Path]) -> pd.DataFrame:
    """One row per run folder: its identity, its scalar metrics, and ``run_dir``.

    Non-scalar metrics (per-class values, confusion matrices) stay in metrics.json and are read
    where a figure needs them.
    """
    rows = []
    for run_dir in run_dirs:
        metrics = read_json(Path(run_dir) / layout.METRICS)
        scalars = {k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        rows.append({**run_identity(run_dir), **scalars, "run_dir": str(run_dir)})
    runs = pd.DataFrame(rows)
    if runs.empty:
        return runs
    return sort_rows(runs, KEYS + ["seed"])


def sort_rows(table: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Sort by the keys, methods in the paper's order (zero-shot first, CLIP-SVD last)."""
    def key(column: pd.Series):
        return column.map(method_rank) if column.name == "method" else column

    return table.sort_values(keys, key=key, kind="stable").reset_index(drop=True)


def metrics_of(runs: pd.DataFrame, setting: str) -> list[str]:
    wanted = B2N_METRICS + ["accuracy"] if setting == "base_to_novel" else FEW_SHOT_METRICS
    return [m for m in wanted if m in runs.columns]


def summarise(runs: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Mean and sample std over seeds of one metric: dataset, method, setting, shots, mean, std,
    n_seeds (the columns of accuracy.csv)."""
    grouped = runs.dropna(subset=[metric]).groupby(KEYS, sort=False)[metric]
    table = grouped.agg(mean="mean", std="std", n_seeds="count").reset_index()
    table["std"] = table["std"].fillna(0.0)
    return sort_rows(table, KEYS)


def _for_every_metric(runs: pd.DataFrame, table_of, keys: list[str], values: list[str],
                      order: list[str]) -> pd.DataFrame:
    """``table_of(runs, metric)`` for every scalar metric of each setting, stacked long with a
    ``metric`` column between ``keys`` and ``values``, sorted by ``order`` then metric."""
    parts = []
    for setting, part in runs.groupby("setting", sort=False):
        for metric in metrics_of(part, setting):
            table = table_of(part, metric)
            table.insert(len(keys), "metric", metric)
            parts.append(table)
    if not parts:
        return pd.DataFrame(columns=keys + ["metric"] + values)
    return sort_rows(pd.concat(parts, ignore_index=True), order + ["metric"])


def summarise_all(runs: pd.DataFrame) -> pd.DataFrame:
    """Long table over every scalar metric: KEYS, metric, mean, std, n_seeds."""
    return _for_every_metric(runs, summarise, KEYS, ["mean", "std", "n_seeds"], KEYS)


def average_over_datasets(runs: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Per (method, setting, shots): mean of per-dataset means, std over seeds of the per-seed
    dataset average (seeds common to all datasets), n_datasets, n_seeds."""
    per_dataset = summarise(runs, metric)
    rows = []
    for (method, setting, shots), part in per_dataset.groupby(KEYS[1:], sort=False):
        datasets = sorted(part.dataset)
        seeded = runs[(runs.method == method) & (runs.setting == setting) & (runs.shots == shots)
                      & runs.dataset.isin(datasets)].dropna(subset=[metric])
        by_seed = seeded.pivot_table(index="seed", columns="dataset", values=metric)
        complete = by_seed.dropna()  # seeds present for every dataset
        per_seed_average = complete.mean(axis=1)
        std = float(per_seed_average.std(ddof=1)) if len(per_seed_average) > 1 else 0.0
        rows.append({"method": method, "setting": setting, "shots": int(shots),
                     "mean": float(part["mean"].mean()), "std": std,
                     "n_datasets": len(datasets), "n_seeds": len(complete)})
    table = pd.DataFrame(rows, columns=["method", "setting", "shots", "mean", "std",
                                        "n_datasets", "n_seeds"])
    return sort_rows(table, ["setting", "method", "shots"]) if len(table) else table


def average_all(runs: pd.DataFrame) -> pd.DataFrame:
    """average_over_datasets for every scalar metric, long: method, setting, shots, metric, …"""
    return _for_every_metric(runs, average_over_datasets, ["method", "setting", "shots"],
                             ["mean", "std", "n_datasets", "n_seeds"], ["setting", "method", "shots"])


def harmonic(base: float, novel: float) -> float:
    if any(map(math.isnan, (base, novel))):
        return float("nan")
    return 2 * base * novel / (base + novel) if base + novel > 0 else 0.0


def base_to_novel_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset incl. 'Average', method, shots): base and novel mean ± std, the HM of the
    means (the paper's convention), and the mean ± std of the per-run HM."""
    b2n = runs[runs.setting == "base_to_novel"]
    if b2n.empty or "base_accuracy" not in b2n:
        return pd.DataFrame()
    columns = {}
    for metric in ("base_accuracy", "novel_accuracy", "harmonic_mean"):
        per = summarise(b2n, metric).set_index(["dataset", "method", "setting", "shots"])
        if b2n.dataset.nunique() > 1:
            avg = average_over_datasets(b2n, metric).assign(dataset=AVERAGE)
            per = pd.concat([avg.set_index(["dataset", "method", "setting", "shots"]), per])
        columns[metric] = per
    base, novel, hm = columns["base_accuracy"], columns["novel_accuracy"], columns["harmonic_mean"]
    table = pd.DataFrame({
        "base_mean": base["mean"], "base_std": base["std"],
        "novel_mean": novel["mean"], "novel_std": novel["std"],
        "hm": [harmonic(b, n) for b, n in zip(base["mean"], novel["mean"])],
        "hm_per_run_mean": hm["mean"], "hm_per_run_std": hm["std"],
        "n_seeds": base["n_seeds"],
        "n_datasets": (base["n_datasets"].fillna(1).astype(int) if "n_datasets" in base
                       else 1)}).reset_index()
    return table.drop(columns="setting")


def with_average(runs: pd.DataFrame, setting: str) -> pd.DataFrame:
    """Wide table of a setting's metrics: one row per (dataset incl. 'Average', method, shots),
    columns ``<metric>_mean`` and ``<metric>_std``, then n_seeds (and n_datasets)."""
    part = runs[runs.setting == setting]
    if part.empty:
        return pd.DataFrame()
    frames = [summarise_all(part).assign(n_datasets=1)]
    if part.dataset.nunique() > 1:
        frames.insert(0, average_all(part).assign(dataset=AVERAGE))
    long = pd.concat(frames, ignore_index=True)
    long["n_datasets"] = long["n_datasets"].astype(int)
    index = ["dataset", "method", "shots"]
    wide = long.pivot_table(index=index, columns="metric", values=["mean", "std"], sort=False)
    wide.columns = [f"{metric}_{stat}" for stat, metric in wide.columns]
    order = [f"{m}_{s}" for m in metrics_of(part, setting) for s in ("mean", "std")]
    counts = long.groupby(index, sort=False)[["n_seeds", "n_datasets"]].max()
    wide = wide[[c for c in order if c in wide.columns]].join(counts).reset_index()
    wide["_avg"] = wide.dataset != AVERAGE
    wide = sort_rows(wide, ["_avg", "dataset", "method", "shots"]).drop(columns="_avg")
    return wide


def best_shots(summary: pd.DataFrame) -> dict[tuple[str, str, str], int]:
    """(dataset, setting, method) → the K with the highest mean accuracy (ties: the smaller K)."""
    best = {}
    for (dataset, setting, method), part in summary.groupby(["dataset", "setting", "method"]):
        top = part.sort_values(["mean", "shots"], ascending=[False, True]).iloc[0]
        best[(dataset, setting, method)] = int(top.shots)
    return best


PER_CLASS_GROUPS = {"few_shot": [("", "all")],
                    "base_to_novel": [("base_", "base"), ("novel_", "novel")]}


def per_class(runs: pd.DataFrame) -> pd.DataFrame:
    """Per (dataset, setting, class group, method, shots, class): support, and the mean and
    sample std over seeds of precision, recall and F1 (= 2PR / (P + R) of each run, 0 when both
    are 0), from each run's metrics.json; classes in the metrics' order."""
    rows = []
    for run in runs.itertuples(index=False):
        metrics = read_json(Path(run.run_dir) / layout.METRICS)
        for prefix, group in PER_CLASS_GROUPS.get(run.setting, [("", "all")]):
            for order, (name, values) in enumerate((metrics.get(f"{prefix}per_class")
                                                    or {}).items()):
                p, r = float(values["precision"]), float(values["recall"])
                rows.append({"dataset": run.dataset, "setting": run.setting, "group": group,
                             "method": run.method, "shots": int(run.shots), "seed": run.seed,
                             "order": order, "class_name": name,
                             "support": int(values["support"]), "precision": p, "recall": r,
                             "f1": 2 * p * r / (p + r) if p + r > 0 else 0.0})
    keys = ["dataset", "setting", "group", "method", "shots", "order", "class_name"]
    columns = keys + ["support"] + [f"{m}_{s}" for m in ("precision", "recall", "f1")
                                    for s in ("mean", "std")] + ["n_seeds"]
    if not rows:
        return pd.DataFrame(columns=[c for c in columns if c != "order"])
    long = pd.DataFrame(rows)
    grouped = long.groupby(keys, sort=False)
    table = grouped[["precision", "recall", "f1"]].agg(["mean", "std"])
    table.columns = [f"{m}_{s}" for m, s in table.columns]
    table = table.fillna(0.0)
    table["support"] = grouped["support"].max()
    table["n_seeds"] = grouped["seed"].count()
    table = table.reset_index()[columns]
    return sort_rows(table, ["dataset", "setting", "group", "method", "shots", "order"]).drop(
        columns="order")
