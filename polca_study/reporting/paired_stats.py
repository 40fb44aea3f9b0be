"""Paired statistics over seeds: the bootstrap interval of a mean, the exact sign-flip
test, and the paired t-test's power (scipy is imported inside: it takes seconds, and the
multirun callback loads the comparison at every start)."""

from __future__ import annotations

import numpy as np


def bootstrap_interval(
    values: np.ndarray, draws: int = 10_000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean, resampling the values (seeds)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), (draws, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def sign_flip_p(differences: np.ndarray) -> float:
    """Exact two-sided paired permutation test: the share of all 2^n sign flips whose
    mean difference is at least as far from 0 as the observed (with 5 seeds the smallest
    attainable p is 2/32 = 0.0625). The 2^n sums are counted, not listed: each half's
    2^(n/2) signed sums, one half sorted and searched for each sum of the other, so 40
    seeds cost what 20 listed would."""
    d = np.asarray(differences, dtype=float)
    if len(d) == 0 or len(d) > 40:
        return float("nan")
    # a flip counts when |its mean| >= |the observed mean| - 1e-12, here in sums
    threshold = abs(d.sum()) - len(d) * 1e-12
    if threshold <= 0:
        return 1.0
    left = _signed_sums(d[: len(d) // 2])
    right = np.sort(_signed_sums(d[len(d) // 2 :]))
    at_least = len(right) - np.searchsorted(right, threshold - left, side="left")
    at_most = np.searchsorted(right, -threshold - left, side="right")
    return float((at_least + at_most).sum() / 2 ** len(d))


def _signed_sums(values: np.ndarray) -> np.ndarray:
    """The 2^k sums Σ ±v_i over every choice of signs."""
    sums = np.zeros(1)
    for v in values:
        sums = np.concatenate([sums + v, sums - v])
    return sums


def t_test_power(effect: float, n: int, alpha: float = 0.05) -> float:
    """Power of a two-sided one-sample (paired) t-test at level `alpha` with n pairs when
    the true mean difference is `effect` standard deviations: P(|T| > t_crit) for T
    noncentral t with n − 1 degrees of freedom and noncentrality effect·√n."""
    if not np.isfinite(effect) or n < 2:
        return float("nan")
    from scipy import stats  # seconds to import: the multirun callback loads this module at every start

    crit = stats.t.ppf(1 - alpha / 2, n - 1)
    nc = effect * np.sqrt(n)
    return float(stats.nct.sf(crit, n - 1, nc) + stats.nct.cdf(-crit, n - 1, nc))


# seeds_for_power looks no further: a paired effect that needs more is not worth running
MOST_SEEDS = 1000


def seeds_for_power(effect: float, power: float = 0.8, most: int = MOST_SEEDS) -> float:
    """The fewest seeds whose paired t-test reaches `power` at `effect` (nan past `most`)."""
    if not np.isfinite(effect) or effect == 0:
        return float("nan")
    for n in range(2, most + 1):
        if t_test_power(effect, n) >= power:
            return float(n)
    return float("nan")
