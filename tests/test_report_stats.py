"""The report's paired statistics against values derived here from their definitions (sign
enumeration, the exact bootstrap distribution, the normal approximation written out), never
from the scipy call the code makes."""
import itertools
import math

import numpy as np
import pytest

from clipsvd.report.stats import bootstrap_ci, wilcoxon_test

DIFFS = [0.05, 0.10, -0.02, 0.08, 0.12, 0.03, 0.07, -0.01, 0.09, 0.04]


def midranks(values):
    """Ranks 1..n of the values, tied values sharing the mean of their positions."""
    order = sorted(values)
    return [sum(i + 1 for i, v in enumerate(order) if v == x) / order.count(x) for x in values]


def signed_rank_by_enumeration(differences):
    """Two-sided Wilcoxon signed-rank test by its definition: zeros dropped, |d| ranked (mid-
    ranks for ties), T+ = the rank sum of the positive differences; under H0 every sign pattern
    is equally likely, so enumerate all 2^n of them. Returns (min(T+, T-), p)."""
    nonzero = [d for d in differences if d != 0]
    ranks = midranks([abs(d) for d in nonzero])
    t_plus = sum(r for r, d in zip(ranks, nonzero) if d > 0)
    null = [sum(r for r, s in zip(ranks, signs) if s) for signs in
            itertools.product((0, 1), repeat=len(ranks))]
    below = sum(t <= t_plus + 1e-9 for t in null) / len(null)
    above = sum(t >= t_plus - 1e-9 for t in null) / len(null)
    return min(t_plus, sum(ranks) - t_plus), min(1.0, 2 * min(below, above))


def test_exact_signed_rank_p_by_enumeration():
    """No ties, no zeros (scipy's exact branch). Catches a one-sided p and the normal
    approximation used instead of the exact distribution; the statistic is min(T+, T-)."""
    statistic, p = signed_rank_by_enumeration(DIFFS)
    # By hand: the negative differences have ranks 2 (-0.02) and 1 (-0.01), so T- = 3 and
    # the 2^10 = 1024 sign patterns with T- <= 3 are {}, {1}, {2}, {3}, {1, 2}: p = 2 * 5/1024.
    assert (statistic, p) == (3, 10 / 1024)
    result = wilcoxon_test(DIFFS)
    assert result["statistic"] == statistic
    assert result["p_value"] == pytest.approx(p, rel=1e-12)
    assert result["test_method"] == "exact" and result["n_nonzero"] == 10
    assert wilcoxon_test([1, 2, 3, 4, 5])["p_value"] == pytest.approx(2 / 2 ** 5)


def test_ties_and_zeros_by_enumeration():
    """Zeros discarded, ties given midranks, p from all 2^5 sign patterns. Catches zeros kept
    in the ranking (Pratt's method) and the normal approximation used for a small tied
    sample."""
    with_zeros = [0.1, 0.1, 0.0, 0.2, -0.1, 0.3, 0.0]
    statistic, p = signed_rank_by_enumeration(with_zeros)
    # |d| = 0.1, 0.1, 0.2, 0.1, 0.3 -> midranks 2, 2, 4, 2, 5; T- = 2 (the -0.1); patterns with
    # T- <= 2: {}, and each of the three rank-2 values alone: 4 of 32, p = 2 * 4/32.
    assert (statistic, p) == (2, 0.25)
    result = wilcoxon_test(with_zeros)
    assert result["statistic"] == statistic and result["p_value"] == pytest.approx(p, rel=1e-12)
    assert result["n_nonzero"] == 5 and "2 zero differences discarded" in result["note"]
    assert "only 5 non-zero difference(s): p ≥ 0.0625" in result["note"]  # 2 / 2^5
    zero = wilcoxon_test([0.0, 0.0, 0.0])
    assert zero["p_value"] == 1.0 and zero["note"] == "all differences are zero"
    assert math.isnan(wilcoxon_test([])["p_value"])


def test_all_positive_pairs_with_ties():
    """Twelve positive differences, tied in two values (the shape of the report's test study):
    only the all-positive sign pattern is as extreme, p = 2/2^12 whatever the ranks."""
    d = [0.1] * 8 + [0.2] * 4
    assert wilcoxon_test(d)["p_value"] == pytest.approx(2 / 2 ** 12, rel=1e-12)
    assert wilcoxon_test([-x for x in d])["p_value"] == pytest.approx(2 / 2 ** 12, rel=1e-12)


def test_normal_approximation_for_large_n():
    """Sixty distinct differences (beyond the exact branch): z from the null mean n(n+1)/4 and
    variance n(n+1)(2n+1)/24 of T+, no continuity correction, p = erfc(|z|/sqrt 2). Catches a
    continuity correction or a one-sided p."""
    d = [(i + 1) / 100 * (-1 if i % 3 == 0 else 1) for i in range(60)]
    n = len(d)
    t_plus = sum(i + 1 for i, x in enumerate(d) if x > 0)  # |d| are already in rank order
    z = (t_plus - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    result = wilcoxon_test(d)
    assert result["test_method"] == "normal approximation"
    assert result["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), rel=1e-9)


def exact_bootstrap_means(values):
    """Every resample with replacement of n values (n^n equally likely ordered draws)."""
    return np.array([np.mean(draw) for draw in itertools.product(values, repeat=len(values))])


def test_bootstrap_ci_ends_are_the_quantiles_of_the_bootstrap_distribution():
    """Percentile bootstrap CI, from its definition: the 2.5 % and 97.5 % quantiles of the mean
    over resamples with replacement. Four skewed values give 4^4 = 256 equally likely
    resamples, so the exact distribution is known; 10,000 random resamples put each end within
    0.01 of its probability level (Monte Carlo sd 0.0016). Catches the basic (reflected)
    bootstrap, a 90 % level and the CI of the median."""
    values = [0.0, 0.1, 0.2, 1.0]
    means = exact_bootstrap_means(values)
    low, high = bootstrap_ci(values)
    for end, level in ((low, 0.025), (high, 0.975)):
        at_or_below = np.mean(means <= end + 1e-12)
        below = np.mean(means < end - 1e-12)
        assert below - 0.01 <= level <= at_or_below + 0.01, (end, level, below, at_or_below)
    assert low < np.mean(values) < high
    assert (low, high) == bootstrap_ci(values)  # a fixed seed
    assert bootstrap_ci([0.2, 0.2, 0.2]) == (0.2, 0.2)
    assert all(math.isnan(v) for v in bootstrap_ci([0.2]))
