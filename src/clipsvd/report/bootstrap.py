"""Test-set bootstrap: how much a table cell could move with another draw of test images.

With few seeds the spread over seeds says little (one seed: nothing), yet every cell rests on a
finite test set. Per (dataset, setting) the test images are resampled with replacement (a
multinomial count per image, fixed seed); each resample gives every run its accuracy on those
images (base-to-novel: base and novel images resampled separately, the run's harmonic mean),
the cell's statistic is the mean over its seeds, and the 2.5 and 97.5 percentiles over the
resamples are its 95% interval.

Paired differences use the *same* resamples for CLIP-SVD and the other method at the same
(dataset, setting, shots), over the seeds both have (zero-shot: its one run against every
CLIP-SVD K). A difference is marked significant when its 95% interval excludes 0. This covers
the test-set sampling only, not the training randomness the seeds stand for; the paired
comparison over seeds (stats.py) covers that.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import layout
from .aggregate import REFERENCE, sort_rows

N_TEST_RESAMPLES = 2000
TEST_BOOTSTRAP_SEED = 0
FEW_SEEDS = 3  # cells with fewer seeds show their test-set interval in the tables
_CHUNK = 250  # resamples per block, to bound memory on large test sets
COLUMNS = ["dataset", "setting", "method", "shots", "n_seeds", "mean", "ci_low", "ci_high",
           "reference_shots", "n_pairs", "difference", "difference_ci_low",
           "difference_ci_high", "significant"]


def _correct(run_dir: str) -> dict[str, pd.Series] | None:
    """Per test group (all; base, novel): 1/0 per test image, indexed by sample id."""
    path = Path(run_dir) / layout.PREDICTIONS
    if not path.exists():
        return None
    table = pd.read_csv(path, dtype={"sample_id": str, "group": str}, keep_default_na=False)
    correct = (table["prediction"] == table["label"]).astype(float)
    return {group: correct[rows.index].set_axis(rows["sample_id"]).sort_index()
            for group, rows in table.groupby("group", sort=True)}


def _statistic(per_group: dict[str, np.ndarray]) -> np.ndarray:
    """The run's accuracy per resample: the one group's, or the HM of base and novel."""
    if set(per_group) == {"base", "novel"}:
        base, novel = per_group["base"], per_group["novel"]
        total = base + novel
        return np.divide(2 * base * novel, total, out=np.zeros_like(total), where=total > 0)
    (only,) = per_group.values()
    return only


def _resampled(correct: dict[str, np.ndarray], counts: dict[str, np.ndarray]) -> np.ndarray:
    """A run's statistic on each resample of the test images (counts: resamples × images)."""
    per_group = {g: (counts[g] @ correct[g]) / counts[g][0].sum() for g in correct}
    return _statistic(per_group)


def _resample_runs(loaded: dict[str, dict[str, pd.Series]], n_resamples: int,
                   rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Every run's statistic on the same n_resamples resamples of the shared test images."""
    first = next(iter(loaded.values()))
    sizes = {g: len(first[g]) for g in first}
    values: dict[str, list[np.ndarray]] = {d: [] for d in loaded}
    for start in range(0, n_resamples, _CHUNK):
        block = min(_CHUNK, n_resamples - start)
        counts = {g: rng.multinomial(n, np.full(n, 1.0 / n), size=block).astype(np.float32)
                  for g, n in sizes.items()}
        for run_dir, correct in loaded.items():
            arrays = {g: correct[g].to_numpy(np.float32) for g in sizes}
            values[run_dir].append(_resampled(arrays, counts))
    return {d: np.concatenate(v) for d, v in values.items()}


def _interval(values: np.ndarray) -> tuple[float, float]:
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def test_set_bootstrap(runs: pd.DataFrame, n_resamples: int = N_TEST_RESAMPLES,
                       seed: int = TEST_BOOTSTRAP_SEED) -> pd.DataFrame:
    """One row per (dataset, setting, method, shots): the seed-mean accuracy with its test-set
    95% interval, and (methods other than CLIP-SVD, once per CLIP-SVD K they are compared at)
    the paired difference CLIP-SVD − method with its interval and whether that excludes 0.
    Runs that lack predictions or do not share the first run's test images are left out."""
    rows = []
    for number, ((dataset, setting), part) in enumerate(
            runs.groupby(["dataset", "setting"], sort=True)):
        loaded = {d: c for d in part.run_dir if (c := _correct(d)) is not None}
        if not loaded:
            continue
        first = next(iter(loaded.values()))
        loaded = {d: c for d, c in loaded.items() if sorted(c) == sorted(first) and all(
            c[g].index.equals(first[g].index) for g in first)}
        if min(len(v) for v in first.values()) == 0:
            continue
        resampled = _resample_runs(loaded, n_resamples, np.random.default_rng([seed, number]))
        cells: dict[tuple[str, int], dict[int, tuple[float, np.ndarray]]] = {}
        for run in part[part.run_dir.isin(list(loaded))].itertuples():
            cells.setdefault((run.method, int(run.shots)), {})[int(run.seed)] = (
                float(run.accuracy), resampled[run.run_dir])
        reference = {k: v for (m, k), v in cells.items() if m == REFERENCE}
        for (method, shots), by_seed in cells.items():
            low, high = _interval(np.mean([v for _, v in by_seed.values()], axis=0))
            row = {"dataset": dataset, "setting": setting, "method": method, "shots": shots,
                   "n_seeds": len(by_seed), "mean": float(np.mean([a for a, _ in
                                                                     by_seed.values()])),
                   "ci_low": low, "ci_high": high}
            zero_shot = method == "zero_shot"
            targets = [] if method == REFERENCE else sorted(reference) if zero_shot else [
                k for k in [shots] if k in reference]
            compared = False
            for k in targets:
                seeds = sorted(reference[k]) if zero_shot else sorted(set(reference[k]) &
                                                                        set(by_seed))
                if not seeds:
                    continue
                other = list(by_seed.values()) if zero_shot else [by_seed[s] for s in seeds]
                ours = [reference[k][s] for s in seeds]
                diff = (np.mean([v for _, v in ours], axis=0)
                        - np.mean([v for _, v in other], axis=0))
                d_low, d_high = _interval(diff)
                rows.append({**row, "reference_shots": k, "n_pairs": len(seeds),
                             "difference": float(np.mean([a for a, _ in ours])
                                                 - np.mean([a for a, _ in other])),
                             "difference_ci_low": d_low, "difference_ci_high": d_high,
                             "significant": bool(d_low > 0 or d_high < 0)})
                compared = True
            if not compared:
                rows.append(row)
    table = pd.DataFrame(rows, columns=COLUMNS)
    if table.empty:
        return table
    return sort_rows(table, ["dataset", "setting", "method", "shots", "reference_shots"])
