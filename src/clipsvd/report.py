"""The study's report: mean ± std over seeds per (dataset, method, setting, shots), and a plot."""
from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd

from . import layout
from .io import atomic_path, read_json, write_text

log = logging.getLogger(__name__)

METHOD_LABELS = {"zero_shot": "Zero-shot", "clip_svd": "CLIP-SVD"}


def collect_runs(run_dirs: list[Path]) -> pd.DataFrame:
    """One row per run folder: its identity (from the path layout) and its metrics."""
    rows = []
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        seed_dir, shots_dir = run_dir.name, run_dir.parent.name
        setting, method, dataset = (run_dir.parents[i].name for i in (1, 2, 3))
        metrics = read_json(run_dir / layout.METRICS)
        rows.append({"dataset": dataset, "method": method, "setting": setting,
                     "shots": int(shots_dir.removeprefix("shots")),
                     "seed": int(seed_dir.removeprefix("seed")), **metrics})
    return pd.DataFrame(rows)


def summarise(runs: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """Mean and sample standard deviation over seeds (std 0 for a single run, e.g. zero-shot)."""
    grouped = runs.groupby(["dataset", "method", "setting", "shots"], sort=True)[metric]
    table = grouped.agg(mean="mean", std="std", n_seeds="count").reset_index()
    table["std"] = table["std"].fillna(0.0)
    return table


def _markdown(table: pd.DataFrame) -> str:
    lines = ["| dataset | method | setting | K | accuracy (%) | seeds |", "|---|---|---|---|---|---|"]
    for row in table.itertuples():
        lines.append(f"| {row.dataset} | {METHOD_LABELS.get(row.method, row.method)} | "
                     f"{row.setting} | {row.shots} | {100 * row.mean:.2f} ± {100 * row.std:.2f} "
                     f"| {row.n_seeds} |")
    return "\n".join(lines) + "\n"


def _plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted(table[["dataset", "setting"]].drop_duplicates().itertuples(index=False))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (dataset, setting) in zip(axes[0], panels):
        part = table[(table.dataset == dataset) & (table.setting == setting)]
        for method, rows in part.groupby("method"):
            rows = rows.sort_values("shots")
            label = METHOD_LABELS.get(method, method)
            x, mean, std = rows.shots.to_numpy(), 100 * rows["mean"].to_numpy(), 100 * rows["std"].to_numpy()
            if method == "zero_shot":
                ax.axhline(mean[0], linestyle="--", color="gray", label=f"{label} (K=0)")
                continue
            line, = ax.plot(x, mean, marker="o", label=label)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
        shots = sorted(s for s in part.shots.unique() if s > 0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(shots, [str(s) for s in shots])
        ax.set_xlabel("shots per class (K)", fontsize=11)
        ax.set_ylabel("accuracy (%)", fontsize=11)
        ax.set_title(f"{dataset} — {setting}", fontsize=12)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def build_report(run_dirs: list[Path], out_dir: Path) -> pd.DataFrame:
    runs = collect_runs(run_dirs)
    table = summarise(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(out_dir / layout.REPORT_TABLE) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    write_text(out_dir / layout.REPORT_TABLE_MD, _markdown(table))
    _plot(table, out_dir / layout.REPORT_PLOT)
    log.info("report of %d runs written to %s", len(runs), out_dir)
    return table
