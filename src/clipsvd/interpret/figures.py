"""Heatmaps of what CLIP-SVD changed: layers × matrices and layers × heads, one panel per encoder."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..adapters.svd import ENCODERS, MATRICES
from ..io import atomic_path

FONT = {"font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11, "xtick.labelsize": 10,
        "ytick.labelsize": 10}
MATRIX_LABELS = {"q": "query", "k": "key", "v": "value", "out": "attn out", "mlp_fc": "MLP in",
                 "mlp_proj": "MLP out"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(FONT)
    return plt


def _grid(table: pd.DataFrame, value: str, columns: list, column: str, depth: int) -> np.ndarray:
    grid = np.full((depth, len(columns)), np.nan)
    for row in table.itertuples(index=False):
        layer, col = int(getattr(row, "layer")), getattr(row, column)
        if col in columns and 0 <= layer < depth:
            grid[layer, columns.index(col)] = float(getattr(row, value))
    return grid


# The cell labels' size in points at the figure's own size, which fits a printed page's width
# (PAGE_WIDTH inches) without scaling: panels are stacked, not put side by side.
CELL_FONT_SIZE = 9
PAGE_WIDTH = 7.0


def cell_label(value: float, spread: float | None = None) -> str:
    """A heatmap cell's text: plain decimals with two significant digits (no scientific
    notation below 10⁴), and the spread on a second line in the same style."""
    def plain(v: float) -> str:
        if v == 0 or not np.isfinite(v):
            return f"{v:.0f}"
        if abs(v) >= 1e4:
            return f"{v:.1e}"
        digits = max(0, 1 - int(np.floor(np.log10(abs(v)))))
        return f"{v:.{digits}f}"

    text = plain(value)
    if spread is not None and np.isfinite(spread):
        text += f"\n±{plain(spread)}"
    return text


def _panels(plt, grids: list[tuple[str, np.ndarray, list[str]]], title: str, colorbar: str,
            xlabel: str, path: Path, spread: list[np.ndarray | None] | None = None) -> None:
    cmap = plt.get_cmap("viridis").with_extremes(bad="#dddddd")
    columns = max(len(labels) for _, _, labels in grids)
    width = min(PAGE_WIDTH, max(3.6, 0.8 * columns + 2.2))
    heights = [max(2.4, 0.45 * g.shape[0] + 1.3) for _, g, _ in grids]
    fig, axes = plt.subplots(len(grids), 1, figsize=(width, sum(heights) + 0.6), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for i, (encoder, grid, labels) in enumerate(grids):
        ax = axes[i][0]
        finite = grid[np.isfinite(grid)]
        vmax = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=0.0, vmax=vmax,
                          aspect="auto", origin="lower")
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=35 if len(labels) > 4 else 0, ha="right"
                           if len(labels) > 4 else "center")
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("layer (0 = input side)")
        ax.set_title(f"{encoder} encoder")
        if grid.size <= 160:
            for (r, c), v in np.ndenumerate(grid):
                if np.isfinite(v):
                    text = cell_label(v, None if spread is None or spread[i] is None
                                      else spread[i][r, c])
                    ax.text(c, r, text, ha="center", va="center", fontsize=CELL_FONT_SIZE,
                            color="white" if v < 0.6 * vmax else "black")
        bar = fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(colorbar)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=200, format="png")
    plt.close(fig)


def matrix_heatmap(matrices: pd.DataFrame, depths: dict[str, int], path: Path,
                   value: str = "rel_change", spread: str | None = None,
                   title: str = "CLIP-SVD: relative change of each matrix, ‖ΔW‖_F / ‖W‖_F") -> Path:
    """Layers × matrices per encoder; cell = 100 · ``value`` (default ‖Δs‖/‖s0‖ in %), grey
    where the matrix was not adapted; ``spread`` (a column, e.g. a std over seeds) is printed
    under each value."""
    plt = _pyplot()
    grids, spreads = [], []
    for encoder in [e for e in ENCODERS if e in set(matrices["encoder"])]:
        part = matrices[matrices["encoder"] == encoder].copy()
        part["cell_value"] = 100 * part[value]
        columns = [m for m in MATRICES if m in set(part["matrix"])]
        depth = depths.get(encoder, int(part["layer"].max()) + 1)
        grids.append((encoder, _grid(part, "cell_value", columns, "matrix", depth),
                      [MATRIX_LABELS.get(m, m) for m in columns]))
        if spread is not None:
            part["cell_spread"] = 100 * part[spread]
            spreads.append(_grid(part, "cell_spread", columns, "matrix", depth))
        else:
            spreads.append(None)
    _panels(plt, grids, title, "‖Δs‖ / ‖s0‖ (%)", "matrix", Path(path),
            spreads)
    return Path(path)


def head_heatmap(heads: pd.DataFrame, depths: dict[str, int], path: Path,
                 value: str = "ov_change") -> Path:
    """Layers × heads per encoder; cell = 100 · relative change of the head's OV circuit."""
    plt = _pyplot()
    grids = []
    for encoder in [e for e in ENCODERS if e in set(heads["encoder"])]:
        part = heads[heads["encoder"] == encoder].copy()
        part["cell_value"] = 100 * part[value]
        count = int(part["num_heads"].max())
        depth = depths.get(encoder, int(part["layer"].max()) + 1)
        grids.append((encoder, _grid(part, "cell_value", list(range(count)), "head", depth),
                      [str(h) for h in range(count)]))
    _panels(plt, grids, "CLIP-SVD: change of each attention head's value-output circuit",
            "‖ΔOV‖ / ‖OV‖ (%)", "head", Path(path))
    return Path(path)
