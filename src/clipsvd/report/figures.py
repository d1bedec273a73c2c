"""Figures of the report, each as SVG (vector) and 300 dpi PNG: accuracy versus shots,
confusion matrices (one figure per method), reliability curves. Legends sit outside the data."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import layout
from ..config import METHOD_COLORS
from ..io import atomic_path, read_json
from .aggregate import AVERAGE, SETTING_LABELS, method_label, method_rank

FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "legend.fontsize": 10,
        "xtick.labelsize": 10, "ytick.labelsize": 10}
# Same figure, same bytes: SVG element ids from a fixed salt, no creation date in the files.
REPRODUCIBLE = {"svg.hashsalt": "clipsvd"}
RELIABILITY_BINS = 10
PNG_DPI = 300


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({**FONT, **REPRODUCIBLE})
    return plt


def save_figure(fig, path: Path, vector: bool = True) -> list[Path]:
    """``path`` as a 300 dpi PNG, and (``vector``) the same figure as SVG next to it; legends
    placed outside the axes are kept (tight bounding box). Returns the files written."""
    plt = _pyplot()
    path = Path(path)
    written = [path.with_suffix(".png")]
    if vector:
        written.append(path.with_suffix(".svg"))
    for target in written:
        kind = target.suffix[1:]
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=kind, dpi=PNG_DPI, bbox_inches="tight", pad_inches=0.05,
                        metadata={"Date": None} if kind == "svg" else {"Software": None})
    plt.close(fig)
    return written


def _colors(methods) -> dict[str, str]:
    extra = iter(["#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d"])
    return {m: METHOD_COLORS.get(m) or next(extra, "#000000") for m in methods}


def _figure_legend(fig, axes) -> None:
    """One legend for all panels, below them (outside every axes), each label once."""
    handles: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncols=min(len(handles), 3), frameon=False)


def accuracy_vs_shots_figure(summary: pd.DataFrame, average: pd.DataFrame):
    """One panel per (setting, dataset) plus an 'Average' panel per setting (when there is more
    than one dataset); a line per method with a ± std band; zero-shot a marker at K = 0 and a
    dashed line. The K axis is evenly spaced (0, 1, 2, 4, …); one legend below the panels."""
    plt = _pyplot()
    panels = []
    for setting in sorted(summary.setting.unique(), key=lambda s: s != "few_shot"):
        part = summary[summary.setting == setting]
        datasets = sorted(part.dataset.unique())
        if len(datasets) > 1:
            panels.append((setting, AVERAGE, average[average.setting == setting]))
        panels += [(setting, d, part[part.dataset == d]) for d in datasets]
    n = len(panels)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows + 0.6), squeeze=False,
                             layout="constrained")
    colors = _colors(sorted(summary.method.unique(), key=method_rank))
    for ax, (setting, dataset, part) in zip(axes.flat, panels):
        ks = sorted(part.shots.unique())
        pos = {k: i for i, k in enumerate(ks)}
        for method in sorted(part.method.unique(), key=method_rank):
            rows_m = part[part.method == method].sort_values("shots")
            x = np.array([pos[k] for k in rows_m.shots])
            mean, std = 100 * rows_m["mean"].to_numpy(), 100 * rows_m["std"].to_numpy()
            color = colors[method]
            if method == "zero_shot":
                ax.axhline(mean[0], linestyle="--", color=color, linewidth=1.2)
                ax.plot(x, mean, marker="s", markersize=8, linestyle="none", color=color,
                        label=f"{method_label(method)} (K=0)")
                continue
            ax.plot(x, mean, marker="o", color=color, label=method_label(method))
            ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=color, linewidth=0)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("shots per class (K)")
        ylabel = "HM of base/novel accuracy (%)" if setting == "base_to_novel" else "accuracy (%)"
        ax.set_ylabel(ylabel)
        title = "Average over datasets" if dataset == AVERAGE else dataset
        ax.set_title(f"{title} — {SETTING_LABELS.get(setting, setting)}")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    _figure_legend(fig, list(axes.flat)[:n])
    return fig


def accuracy_vs_shots(summary: pd.DataFrame, average: pd.DataFrame, path: Path) -> list[Path]:
    return save_figure(accuracy_vs_shots_figure(summary, average), path)


def _confusion_groups(setting: str) -> list[tuple[str, str]]:
    """(metrics key prefix, label) of the confusion matrices a run of the setting has."""
    if setting == "base_to_novel":
        return [("base_", "base classes"), ("novel_", "novel classes")]
    return [("", "")]


def _draw_confusion(ax, total: np.ndarray, names: list[str]) -> None:
    """Row-normalised (% of the true class) with counts."""
    support = total.sum(axis=1, keepdims=True)
    share = np.divide(total, support, out=np.zeros_like(total), where=support > 0)
    ax.imshow(100 * share, cmap="Blues", vmin=0, vmax=100)
    for i in range(total.shape[0]):
        for j in range(total.shape[1]):
            ax.text(j, i, f"{100 * share[i, j]:.0f}%\n({int(total[i, j])})", ha="center",
                    va="center", fontsize=8 if len(names) > 6 else 9,
                    color="white" if share[i, j] > 0.6 else "black")
    ticks = range(len(names))
    ax.set_xticks(ticks, names, rotation=45, ha="right")
    ax.set_yticks(ticks, names)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")


def run_confusion_matrix(metrics: dict, title: str, path: Path) -> None:
    """The confusion matrices of one run (base and novel for base-to-novel), one 300 dpi PNG."""
    plt = _pyplot()
    panels = [(prefix, label) for prefix, label in (("", ""), ("base_", "base"), ("novel_", "novel"))
              if f"{prefix}confusion_matrix" in metrics]
    size = _matrix_size(max(len(metrics[f"{p}class_names"]) for p, _ in panels))
    fig, axes = plt.subplots(1, len(panels), figsize=(size * len(panels), size), squeeze=False,
                             layout="constrained")
    for ax, (prefix, label) in zip(axes[0], panels):
        _draw_confusion(ax, np.asarray(metrics[f"{prefix}confusion_matrix"], dtype=float),
                        metrics[f"{prefix}class_names"])
        ax.set_title(f"{title}{', ' + label if label else ''}", fontsize=11)
    save_figure(fig, path, vector=False)


def _matrix_size(n_classes: int) -> float:
    """Inches per matrix panel: room for ~0.6 inch per cell and the class names."""
    return max(3.8, 0.62 * n_classes + 2.4)


def confusion_matrix_figure(runs: pd.DataFrame, best: dict, dataset: str, setting: str,
                            method: str):
    """One method's confusion matrix at its best K, summed over that K's seeds, row-normalised
    (% of the true class) with counts; base-to-novel: base and novel side by side. Returns the
    figure and what was drawn (method, shots, seeds)."""
    plt = _pyplot()
    part = runs[(runs.dataset == dataset) & (runs.setting == setting) & (runs.method == method)]
    k = best[(dataset, setting, method)]
    chosen = part[part.shots == k]
    seeds = sorted(chosen.seed.tolist())
    drawn = {"method": method, "shots": k, "seeds": seeds}
    panels = []
    for prefix, group_label in _confusion_groups(setting):
        total, names = None, None
        for run_dir in chosen.run_dir:
            metrics = read_json(Path(run_dir) / layout.METRICS)
            if f"{prefix}confusion_matrix" not in metrics:
                continue
            cm = np.asarray(metrics[f"{prefix}confusion_matrix"], dtype=float)
            total = cm if total is None else total + cm
            names = metrics.get(f"{prefix}class_names") or [str(i) for i in range(len(cm))]
        if total is not None:
            panels.append((total, names, group_label))
    size = _matrix_size(max((len(n) for _, n, _ in panels), default=2))
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(size * max(len(panels), 1), size),
                             squeeze=False, layout="constrained")
    for ax, (total, names, group_label) in zip(axes[0], panels):
        _draw_confusion(ax, total, names)
        if group_label:
            ax.set_title(group_label, fontsize=11)
    which = (f"{len(seeds)} seeds summed" if len(seeds) > 1 else f"seed {seeds[0]}" if
             method != "zero_shot" and seeds else "one run")
    fig.suptitle(f"{dataset} — {SETTING_LABELS.get(setting, setting)}: {method_label(method)}, "
                 f"K={k} ({which})", fontsize=12)
    return fig, drawn


def confusion_matrix(runs: pd.DataFrame, best: dict, dataset: str, setting: str, method: str,
                     path: Path) -> dict:
    fig, drawn = confusion_matrix_figure(runs, best, dataset, setting, method)
    save_figure(fig, path)
    return drawn


def reliability(predictions: pd.DataFrame, bins: int = RELIABILITY_BINS) -> pd.DataFrame:
    """Per equal-width confidence bin: mean confidence, accuracy and count (non-empty bins)."""
    probs = predictions[[c for c in predictions.columns if c.startswith("p_")]]
    confidence = probs.max(axis=1, skipna=True).to_numpy(dtype=float)
    correct = (predictions.prediction.to_numpy() == predictions.label.to_numpy()).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    rows = []
    for b in range(bins):
        members = which == b
        if members.any():
            rows.append({"bin": b, "confidence": confidence[members].mean(),
                         "accuracy": correct[members].mean(), "count": int(members.sum())})
    return pd.DataFrame(rows)


def reliability_figure(runs: pd.DataFrame, best: dict, setting: str):
    """Panel per dataset: accuracy versus confidence per method, at its best K, predictions of
    all that K's seeds pooled (base-to-novel: base and novel test images pooled), with the
    diagonal of perfect calibration; each panel's legend (with the mean ECE over those seeds)
    sits below it."""
    plt = _pyplot()
    part = runs[runs.setting == setting]
    datasets = sorted(part.dataset.unique())
    cols = min(len(datasets), 3)
    rows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.8 * cols, 5.6 * rows), squeeze=False,
                             layout="constrained")
    colors = _colors(sorted(part.method.unique(), key=method_rank))
    for ax, dataset in zip(axes.flat, datasets):
        ax.plot([0, 1], [0, 1], linestyle=":", color="black", linewidth=1, label="perfect")
        here = part[part.dataset == dataset]
        for method in sorted(here.method.unique(), key=method_rank):
            k = best[(dataset, setting, method)]
            chosen = here[(here.method == method) & (here.shots == k)]
            frames = [pd.read_csv(Path(d) / layout.PREDICTIONS) for d in chosen.run_dir
                      if (Path(d) / layout.PREDICTIONS).exists()]
            if not frames:
                continue
            curve = reliability(pd.concat(frames, ignore_index=True))
            ece_key = "base_ece" if setting == "base_to_novel" else "ece"
            ece = chosen[ece_key].mean() if ece_key in chosen else float("nan")
            which = "base ECE" if setting == "base_to_novel" else "ECE"
            label = f"{method_label(method)} K={k} ({which} {100 * ece:.1f}%)"
            ax.plot(curve.confidence, curve.accuracy, marker="o", color=colors[method],
                    label=label)
        ax.set_xlim(0, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.set_aspect("equal")
        ax.set_xlabel("confidence (max. class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{dataset} — {SETTING_LABELS.get(setting, setting)}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=9, frameon=False)
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)
    return fig


def reliability_curves(runs: pd.DataFrame, best: dict, setting: str, path: Path) -> list[Path]:
    return save_figure(reliability_figure(runs, best, setting), path)
