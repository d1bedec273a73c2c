"""Choose a method's learning rate on validation data: the same rule for every method.

A grid is run as one study per learning rate (the same split files, ``--until adapt``; the
command is in docs/miniature.md). Every adapter run records its accuracy on the split's
validation support set (``val_accuracy`` in its ``train.json``); the test set is never read.
Per (dataset, method) the chosen rate is the one with the highest mean validation accuracy over
its runs; among rates tied on it, the smallest (the model closest to the pretrained one).
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from . import layout
from .errors import DataError
from .io import read_json, write_text


def read_grid(folders: list[Path]) -> dict[tuple[str, str], dict[float, list[float]]]:
    """Validation accuracies by (dataset, method) and learning rate, from every run's
    train.json under ``folders``."""
    grid: dict[tuple[str, str], dict[float, list[float]]] = defaultdict(lambda: defaultdict(list))
    for folder in folders:
        summaries = sorted(Path(folder).rglob(layout.TRAIN_SUMMARY))
        if not summaries:
            raise DataError(f"{folder}: no {layout.TRAIN_SUMMARY} below it; give the run folders "
                            "of the grid's studies (results/runs/<study>)")
        for path in summaries:
            summary = read_json(path)
            if summary.get("val_accuracy") is None:
                raise DataError(f"{path}: no val_accuracy (a run without a validation support "
                                "set, or made before clipsvd recorded it); rerun it")
            grid[summary["dataset"], summary["method"]][float(summary["lr"])].append(
                float(summary["val_accuracy"]))
    return grid


def choose(by_lr: dict[float, list[float]]) -> float:
    means = {lr: sum(values) / len(values) for lr, values in by_lr.items()}
    best = max(means.values())
    return min(lr for lr, mean in means.items() if math.isclose(mean, best, abs_tol=1e-12))


def selection_table(grid: dict[tuple[str, str], dict[float, list[float]]]) -> str:
    """A Markdown table: mean validation accuracy (%) by rate, runs per cell, the choice."""
    rates = sorted({lr for by_lr in grid.values() for lr in by_lr})
    lines = ["| dataset | method | " + " | ".join(f"lr {lr:g}" for lr in rates) + " | chosen |",
             "|---|---|" + "---|" * len(rates) + "---|"]
    for (dataset, method), by_lr in sorted(grid.items()):
        chosen = choose(by_lr)
        cells = []
        for lr in rates:
            values = by_lr.get(lr)
            if not values:
                cells.append("–")
                continue
            text = f"{100 * sum(values) / len(values):.2f} (n = {len(values)})"
            cells.append(f"**{text}**" if lr == chosen else text)
        lines.append(f"| {dataset} | {method} | " + " | ".join(cells) + f" | {chosen:g} |")
    return "\n".join(lines) + "\n"


def select(folders: list[Path], out: Path | None = None) -> dict[str, Any]:
    grid = read_grid(folders)
    table = selection_table(grid)
    if out is not None:
        write_text(out, table)
    print(table, end="")
    return {f"{dataset}/{method}": choose(by_lr) for (dataset, method), by_lr in grid.items()}
