"""HDBSCAN over per-token trajectories, one clustering per basis vector.

Assignments use -1 for HDBSCAN outliers and -2 for tokens the paper's filter dropped
(their decomposed loss rises over training); both are excluded from the metrics.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np

from polca_study.errors import ConfigError, at_least, choice

OUTLIER, FILTERED = -1, -2
NORMALIZE = ("none", "zscore", "final")
FEATURES = ("trajectory", "increments", "window")
GROUPING = ("none", "place", "subtract_place")
SELECTION = ("eom", "leaf")
METRICS = ("euclidean", "manhattan", "chebyshev", "cosine")
GENERIC_MAX = 6000  # tokens up to which HDBSCAN uses its all-pairs algorithm


@dataclass
class ClusterConfig:
    """HDBSCAN and trajectory settings (the `cluster` config group). The defaults are the
    default run's: POLCA's tuned settings (conf/method/polca.yaml)."""

    min_cluster_size: int = 27
    min_samples: float = 9  # a count (>= 1) or a fraction of the clustered tokens (< 1)
    selection_method: str = "eom"  # eom | leaf
    metric: str = "euclidean"
    normalize: str = "final"  # none | zscore (per token) | final (divide by final value)
    feature: str = "trajectory"  # trajectory | increments | window
    window: list[int] = field(default_factory=lambda: [0, -1])  # step range for "window"
    grouping: str = "subtract_place"  # none | place (cluster each digit place) | subtract_place
    filter_rising: bool = True  # the paper's filter: drop tokens whose decomposed loss rises

    def __post_init__(self):
        at_least("cluster.min_cluster_size", self.min_cluster_size, 2)
        if not self.min_samples > 0:
            raise ConfigError(
                f"cluster.min_samples must be a count >= 1 or a fraction in (0, 1), got {self.min_samples}"
            )
        choice("cluster.selection_method", self.selection_method, SELECTION)
        choice("cluster.metric", self.metric, METRICS)
        choice("cluster.normalize", self.normalize, NORMALIZE)
        choice("cluster.feature", self.feature, FEATURES)
        choice("cluster.grouping", self.grouping, GROUPING)
        if len(self.window) != 2:
            raise ConfigError(f"cluster.window must be [start, stop] evaluation indices, got {self.window}")


def features(curves: np.ndarray, s: ClusterConfig) -> np.ndarray:
    """What HDBSCAN sees of each token's curve (n, T): the method's trajectory itself
    ("trajectory"), its per-interval increments, or a window of it; then the
    normalisation."""
    if s.feature == "increments":
        x = np.diff(curves, axis=1, prepend=0.0)
    elif s.feature == "window":
        start, stop = s.window
        x = curves[:, start : (stop if stop != -1 else None)]
    else:
        x = curves
    x = np.asarray(x, dtype=np.float64)
    if s.normalize == "zscore":
        std = x.std(axis=1, keepdims=True)
        x = (x - x.mean(axis=1, keepdims=True)) / np.where(std > 0, std, 1.0)
    elif s.normalize == "final":
        final = np.abs(curves[:, -1:]).astype(np.float64)
        x = x / np.where(final > 0, final, 1.0)
    return x


def _hdbscan(x: np.ndarray, s: ClusterConfig) -> np.ndarray:
    n = len(x)
    if n < max(s.min_cluster_size, 2):
        return np.full(n, OUTLIER)
    min_samples = int(round(s.min_samples * n)) if s.min_samples < 1 else int(s.min_samples)
    min_samples = max(1, min(min_samples, n - 1))
    import hdbscan  # here, not at import: it takes seconds, and config.py imports this module

    clusterer = hdbscan.HDBSCAN(
        min_cluster_size=int(s.min_cluster_size),
        min_samples=min_samples,
        cluster_selection_method=s.selection_method,
        metric=s.metric,
        # the generic O(n²) algorithm beats the tree-based ones 3-4x on our ~80-dimensional
        # curves up to a few thousand tokens (measured); trees past that, for memory
        algorithm="generic" if s.metric == "cosine" or n <= GENERIC_MAX else "best",
        core_dist_n_jobs=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn deprecation chatter inside hdbscan
        return clusterer.fit_predict(x)


def cluster_curves(
    curves: np.ndarray, groups: np.ndarray, s: ClusterConfig, rises: np.ndarray | None = None
) -> np.ndarray:
    """Cluster one set of per-token curves (n, T); returns assignments (n,).

    `groups` (n,) are the tokens' digit places, used by grouping "place" (cluster each
    place apart) and "subtract_place" (remove each place's mean curve first).
    `rises` (n,) marks tokens the paper's filter drops.
    """
    n = len(curves)
    out = np.full(n, FILTERED)
    keep = np.ones(n, dtype=bool) if rises is None or not s.filter_rising else ~rises
    x = features(curves, s)
    if s.grouping == "subtract_place":
        x = x.copy()
        for g in np.unique(groups):
            sel = keep & (groups == g)
            if sel.any():
                x[groups == g] -= x[sel].mean(axis=0)
    parts = [keep & (groups == g) for g in np.unique(groups)] if s.grouping == "place" else [keep]
    offset = 0
    for sel in parts:
        labels = _hdbscan(x[sel], s)
        out[sel] = np.where(labels >= 0, labels + offset, OUTLIER)
        offset += max(labels.max() + 1, 0) if len(labels) else 0
    return out


def cluster_all(
    curves: np.ndarray, groups: np.ndarray, s: ClusterConfig, rises: np.ndarray | None = None
) -> np.ndarray:
    """Cluster each column of curves (n, T, m) apart: assignments (n, m)."""
    if curves.shape[2] == 0:  # every basis vector dropped
        return np.empty((len(curves), 0), dtype=int)
    return np.stack(
        [
            cluster_curves(curves[:, :, j], groups, s, None if rises is None else rises[:, j])
            for j in range(curves.shape[2])
        ],
        axis=1,
    )
