"""Interpretations over seeds: mean and spread of matrix and head changes, and how often each
description comes back, per (dataset, setting, shots).

Spread is the sample standard deviation over seeds (ddof 1; 0 with one seed), as in the
report's tables.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..io import atomic_path, read_json, write_text
from .figures import matrix_heatmap
from .run import DESCRIPTIONS, FOLDER, HEADS, MATRICES, RECORD

log = logging.getLogger(__name__)

GROUP = ["dataset", "setting", "shots"]
MATRIX_SEEDS = "matrix_changes_over_seeds.csv"
HEAD_SEEDS = "head_changes_over_seeds.csv"
DESCRIPTION_SEEDS = "head_descriptions_over_seeds.csv"
SUMMARY = "summary.md"
HEATMAP = "matrix_heatmap_{dataset}_{setting}_shots{shots}.png"


def _identity(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    return {"dataset": run_dir.parents[3].name, "method": run_dir.parents[2].name,
            "setting": run_dir.parents[1].name,
            "shots": int(run_dir.parent.name.removeprefix("shots")),
            "seed": int(run_dir.name.removeprefix("seed"))}


def _read(run_dirs: list[Path], name: str) -> pd.DataFrame:
    parts = []
    for run_dir in run_dirs:
        path = Path(run_dir) / FOLDER / name
        table = pd.read_csv(path, keep_default_na=True)
        for key, value in _identity(run_dir).items():
            table[key] = value
        parts.append(table)
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def _spread(table: pd.DataFrame, keys: list[str], columns: list[str]) -> pd.DataFrame:
    grouped = table.groupby(keys, sort=False)
    out = grouped.size().rename("n_seeds").reset_index()
    for column in columns:
        stats = grouped[column].agg(["mean", "std"]).reset_index(drop=True)
        out[f"{column}_mean"] = stats["mean"].to_numpy()
        out[f"{column}_std"] = stats["std"].fillna(0.0).to_numpy()
    return out


def _csv(table: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        table.to_csv(tmp, index=False, float_format="%.6g")


def aggregate_interpretations(run_dirs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Combine the interpret/ folders of ``run_dirs`` (CLIP-SVD run folders; those without an
    interpret/ folder are skipped with a warning) into ``out_dir``: per (dataset, setting,
    shots), mean ± std over seeds of every matrix's and head's change, the rank of each
    averaged, how many seeds give each head description, a heatmap of the mean matrix change
    per group, and summary.md. Returns {"groups", "files", "runs"}."""
    out_dir = Path(out_dir)
    present = [Path(r) for r in run_dirs if (Path(r) / FOLDER / RECORD).is_file()]
    for missing in sorted(set(map(Path, run_dirs)) - set(present)):
        log.warning("%s has no %s/ folder; left out of the aggregate", missing, FOLDER)
    if not present:
        raise ValueError("no run folder with an interpret/ folder to aggregate")
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[str] = []

    matrices = _read(present, MATRICES)
    matrix_keys = GROUP + ["encoder", "layer", "matrix", "key"]
    over_matrices = _spread(matrices, matrix_keys, ["rel_change", "delta_l2", "mean_abs_rel",
                                                    "mean_delta", "rank"])
    over_matrices = over_matrices.sort_values(GROUP + ["rel_change_mean"],
                                              ascending=[True] * len(GROUP) + [False],
                                              kind="stable").reset_index(drop=True)
    over_matrices.insert(len(GROUP), "order",
                         over_matrices.groupby(GROUP, sort=False).cumcount() + 1)
    _csv(over_matrices, out_dir / MATRIX_SEEDS)
    files.append(MATRIX_SEEDS)

    heads = _read(present, HEADS)
    if not heads.empty:
        head_keys = GROUP + ["encoder", "layer", "head"]
        over_heads = _spread(heads, head_keys, ["ov_change", "v_rel", "out_rel", "qk_change",
                                                "rank"])
        over_heads = over_heads.sort_values(GROUP + ["ov_change_mean"],
                                            ascending=[True] * len(GROUP) + [False],
                                            kind="stable").reset_index(drop=True)
        over_heads.insert(len(GROUP), "order",
                          over_heads.groupby(GROUP, sort=False).cumcount() + 1)
    else:
        over_heads = pd.DataFrame()
    _csv(over_heads, out_dir / HEAD_SEEDS)
    files.append(HEAD_SEEDS)

    descriptions = _read(present, DESCRIPTIONS)
    if not descriptions.empty:
        seeds = descriptions.groupby(GROUP)["seed"].nunique().rename("of_seeds").reset_index()
        over_desc = (descriptions.groupby(GROUP + ["layer", "head", "model", "description"],
                                          sort=False)
                     .agg(n_seeds=("seed", "nunique"), explained_mean=("explained", "mean"),
                          best_pick=("pick", "min")).reset_index().merge(seeds, on=GROUP))
        over_desc = over_desc.sort_values(GROUP + ["layer", "head", "model", "n_seeds",
                                                   "explained_mean"],
                                          ascending=[True] * 6 + [False, False],
                                          kind="stable").reset_index(drop=True)
    else:
        over_desc = pd.DataFrame()
    _csv(over_desc, out_dir / DESCRIPTION_SEEDS)
    files.append(DESCRIPTION_SEEDS)

    groups = []
    for values, part in over_matrices.groupby(GROUP, sort=True):
        group = dict(zip(GROUP, values))
        record = read_json(next(Path(r) for r in present if all(
            _identity(r)[g] == group[g] for g in GROUP)) / FOLDER / RECORD)
        depths = {e: int(p["layer"].max()) + 1 for e, p in part.groupby("encoder")}
        name = HEATMAP.format(**group)
        n = int(part["n_seeds"].max())
        matrix_heatmap(part, depths, out_dir / name, value="rel_change_mean",
                       spread="rel_change_std" if n > 1 else None,
                       title=f"{group['dataset']}, {group['setting']}, K={group['shots']}: "
                             f"relative change, mean{' ± std' if n > 1 else ''} over {n} seed"
                             f"{'s' if n != 1 else ''}")
        files.append(name)
        groups.append({**group, "n_seeds": n, "heatmap": name, "k": record.get("k"),
                       "n_images": record.get("n_images"),
                       "corpus_size": record.get("corpus_size")})
    write_text(out_dir / SUMMARY, _summary(groups, over_matrices, over_heads, over_desc))
    files.append(SUMMARY)
    log.info("interpretations of %d runs aggregated into %s (%d groups)", len(present), out_dir,
             len(groups))
    return {"groups": groups, "files": files, "runs": [str(r) for r in present]}


def _select(table: pd.DataFrame, group: dict[str, Any]) -> pd.DataFrame:
    if table.empty:
        return table
    mask = np.ones(len(table), dtype=bool)
    for key in GROUP:
        mask &= (table[key] == group[key]).to_numpy()
    return table[mask]


def _summary(groups, matrices, heads, descriptions, top: int = 8, top_heads: int = 3) -> str:
    lines = ["# CLIP-SVD interpretation over seeds", "",
             "Mean ± sample std over seeds. Matrix change = ‖Δs‖/‖s0‖; head change = relative "
             "change of the head's value-output circuit. Descriptions: adapted model, the "
             "number of seeds whose top descriptions include the text.", ""]
    for group in groups:
        lines += [f"## {group['dataset']}, {group['setting']}, K = {group['shots']} "
                  f"({group['n_seeds']} seeds)", "", "| # | matrix | change (%) | mean rank |",
                  "|---|---|---|---|"]
        for r in _select(matrices, group).head(top).itertuples():
            lines.append(f"| {r.order} | {r.key} | {100 * r.rel_change_mean:.2f} ± "
                         f"{100 * r.rel_change_std:.2f} | {r.rank_mean:.1f} |")
        part = _select(heads, group)
        if len(part):
            lines += ["", "| # | encoder | layer | head | OV change (%) | mean rank |",
                      "|---|---|---|---|---|---|"]
            for r in part.head(top).itertuples():
                lines.append(f"| {r.order} | {r.encoder} | {r.layer} | {r.head} | "
                             f"{100 * r.ov_change_mean:.2f} ± {100 * r.ov_change_std:.2f} | "
                             f"{r.rank_mean:.1f} |")
            described = _select(descriptions, group)
            vision = part[part.encoder == "vision"]
            if len(described):
                keys = set(zip(described.layer, described["head"]))
                vision = vision[[(a, b) in keys for a, b in zip(vision.layer, vision["head"])]]
            for r in vision.head(top_heads).itertuples() if len(described) else []:
                lines += ["", f"Vision layer {r.layer}, head {r.head}:", ""]
                for model in ("original", "adapted"):
                    rows = described[(described.layer == r.layer) & (described["head"] == r.head)
                                     & (described.model == model)].head(6)
                    texts = "; ".join(f"{d.description} ({d.n_seeds}/{d.of_seeds})"
                                      for d in rows.itertuples())
                    lines.append(f"- {model}: {texts}")
        lines.append("")
    return "\n".join(lines)
