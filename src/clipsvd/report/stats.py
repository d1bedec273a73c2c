"""Paired comparison of CLIP-SVD against every other method of a study.

Pairs are runs matched on (dataset, setting, shots, seed): the difference is CLIP-SVD's metric
minus the other method's. Zero-shot has one run per (dataset, setting) (K = 0, seed 0), so it is
matched to *every* CLIP-SVD run of that dataset and setting; its side of each pair is then the
same number repeated.

Per group of pairs: the mean difference, a percentile bootstrap 95% confidence interval of it
(pairs resampled with replacement, a fixed seed, 10,000 resamples), and the two-sided Wilcoxon
signed-rank p-value of scipy.stats.wilcoxon (zero differences discarded, "wilcox"; exact null
distribution for n ≤ 50 distinct non-zero differences, exhaustive permutations when there are
ties or zeros and n ≤ 13, the normal approximation otherwise).

What this assumes: pairs are independent and the differences are symmetric about their median
under the null hypothesis. Runs of one dataset share its test set, and pooled groups mix shots
and datasets, so the pairs are not fully independent; read the p-values as descriptive, not as
confirmatory tests, and always together with the number of pairs.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from .aggregate import REFERENCE, sort_rows

N_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
MIN_SIGNIFICANT_N = 6  # with fewer non-zero differences a two-sided p is never below 0.05

ASSUMPTIONS = (
    "Differences are CLIP-SVD minus the other method, on runs matched by dataset, setting, shots "
    "and seed. Zero-shot has a single run per dataset and setting (K = 0, seed 0) and is matched "
    "to every CLIP-SVD run of that dataset and setting. CI: percentile bootstrap over pairs "
    f"({N_RESAMPLES:,} resamples, seed {BOOTSTRAP_SEED}). p: two-sided Wilcoxon signed-rank test "
    "(scipy.stats.wilcoxon; zero differences discarded). Both treat pairs as independent and the "
    "test assumes differences symmetric about their median; runs of one dataset share a test set "
    "and pooled rows mix datasets and shots, so read p-values as descriptive. With fewer than "
    f"{MIN_SIGNIFICANT_N} non-zero differences no two-sided p-value can fall below 0.05.")


def bootstrap_ci(differences, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean (scipy.stats.bootstrap); NaN for fewer than 2 values,
    the value itself when all differences are equal."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return float("nan"), float("nan")
    if np.all(d == d[0]):
        return float(d[0]), float(d[0])
    result = stats.bootstrap((d,), np.mean, n_resamples=n_resamples, method="percentile",
                             confidence_level=confidence, rng=np.random.default_rng(seed),
                             vectorized=True)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def wilcoxon_test(differences) -> dict:
    """Two-sided Wilcoxon signed-rank test of the paired differences.

    Returns the statistic, p-value, n_nonzero, how p was computed, and a note for edge cases:
    all differences zero (p = 1, no evidence of a difference) or no pairs (p = NaN).
    """
    d = np.asarray(differences, dtype=float)
    nonzero = d[d != 0]
    out = {"statistic": float("nan"), "p_value": float("nan"), "n_nonzero": int(len(nonzero)),
           "test_method": "", "note": ""}
    if len(d) == 0:
        out["note"] = "no pairs"
        return out
    if len(nonzero) == 0:
        out.update(p_value=1.0, statistic=0.0, test_method="none",
                   note="all differences are zero")
        return out
    ties = len(np.unique(np.abs(nonzero))) < len(nonzero)
    zeros = len(nonzero) < len(d)
    if len(d) <= 50 and not (ties or zeros):
        how = "exact"
    elif (ties or zeros) and len(d) <= 13:
        how = "exhaustive permutation (ties or zeros)"
    else:
        how = "normal approximation"
    result = stats.wilcoxon(d, zero_method="wilcox", alternative="two-sided", method="auto")
    notes = []
    if len(nonzero) < MIN_SIGNIFICANT_N:
        notes.append(f"only {len(nonzero)} non-zero difference(s): p ≥ "
                     f"{2.0 ** (1 - len(nonzero)):.4g}")
    if zeros:
        notes.append(f"{len(d) - len(nonzero)} zero differences discarded")
    out.update(statistic=float(result.statistic), p_value=float(result.pvalue), test_method=how,
               note="; ".join(notes))
    return out


def matched_pairs(runs: pd.DataFrame, other: str, metric: str = "accuracy") -> pd.DataFrame:
    """CLIP-SVD runs joined with the other method's matched runs: dataset, setting, shots, seed,
    reference, other, difference."""
    ref = runs[runs.method == REFERENCE][["dataset", "setting", "shots", "seed", metric]]
    oth = runs[runs.method == other]
    if other == "zero_shot":
        oth = oth[["dataset", "setting", metric]].drop_duplicates(["dataset", "setting"])
        pairs = ref.merge(oth, on=["dataset", "setting"], suffixes=("_ref", "_other"))
    else:
        oth = oth[["dataset", "setting", "shots", "seed", metric]]
        pairs = ref.merge(oth, on=["dataset", "setting", "shots", "seed"],
                          suffixes=("_ref", "_other"))
    pairs = pairs.rename(columns={f"{metric}_ref": "reference", f"{metric}_other": "other"})
    pairs = pairs.dropna(subset=["reference", "other"])
    pairs["difference"] = pairs.reference - pairs.other
    return pairs


def compare_pairs(differences, reference=None, other=None) -> dict:
    d = np.asarray(differences, dtype=float)
    low, high = bootstrap_ci(d)
    row = {"n_pairs": int(len(d)),
           "mean_reference": float(np.mean(reference)) if reference is not None else float("nan"),
           "mean_other": float(np.mean(other)) if other is not None else float("nan"),
           "mean_difference": float(np.mean(d)) if len(d) else float("nan"),
           "ci_low": low, "ci_high": high}
    row.update(wilcoxon_test(d))
    return row


def paired_comparison(runs: pd.DataFrame, metric: str = "accuracy") -> pd.DataFrame:
    """One row per (setting, other method, scope): scope 'all' pools datasets and shots,
    'shots=K' pools datasets, 'dataset=X' pools shots. Values in the metric's units (fractions)."""
    rows = []
    if REFERENCE not in set(runs.method):
        return pd.DataFrame()
    for other in sorted(set(runs.method) - {REFERENCE}):
        pairs = matched_pairs(runs, other, metric)
        for setting, part in pairs.groupby("setting", sort=True):
            scopes = [("all", part)]
            scopes += [(f"shots={k}", g) for k, g in part.groupby("shots", sort=True)]
            if part.dataset.nunique() > 1:
                scopes += [(f"dataset={k}", g) for k, g in part.groupby("dataset", sort=True)]
            for scope, group in scopes:
                rows.append({"setting": setting, "method": other, "scope": scope,
                             "metric": metric, "zero_shot_reused": other == "zero_shot",
                             **compare_pairs(group.difference, group.reference, group.other)})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    table["_scope"] = table.scope.map(lambda s: 0 if s == "all" else 1 if s.startswith("shots")
                                      else 2)
    table["_setting"] = table.setting != "few_shot"
    return sort_rows(table, ["_setting", "method", "_scope"]).drop(columns=["_scope", "_setting"])
