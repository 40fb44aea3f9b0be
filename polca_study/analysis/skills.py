"""Scores of labelled skills (a label file's labels, any task's): does a cluster hold a
label's tokens, more than chance would, and is the label's breakthrough hidden?

For a label L with token set Y and a cluster C of one basis vector:
- homogeneity |C ∩ Y| / |C|, recall |C ∩ Y| / |Y| (every token with the label counts,
  clustered or not: tokens left out of every cluster are misses), F1 2|C ∩ Y| / (|C| + |Y|);
- recovery: the F1 of the best cluster over all vectors, the label's top cluster;
- the null: for each vector apart, the labels are shuffled among the tokens its filter
  kept (filtered tokens keep theirs), clusters kept; the recovery of each draw, its mean,
  95th percentile and p = (1 + #draws ≥ observed) / (1 + draws); excess = recovery − null mean;
- the label's breakthrough: the time (`score.breakthrough_time`) of the mean loss of
  its tokens, hidden when later than the aggregate loss's by the margin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from polca_study.analysis.cluster import FILTERED
from polca_study.analysis.score import breakthrough_time, delta_points, membership

BACKGROUND = ""


@dataclass(frozen=True)
class SkillScore:
    """One label's scores (summary.json's `labels.<name>`)."""

    tokens: int  # evaluation tokens with the label
    recovery: float  # F1 of its best cluster
    recovery_null_mean: float
    recovery_null95: float
    recovery_p: float
    recovery_excess: float
    homogeneity: float  # of the top cluster
    recall: float
    top_vector: int  # the top cluster's column in the method's columns (-1: no cluster)
    top_cluster: int
    top_size: int
    breakthrough_step: int  # of the label's mean loss
    aggregate_breakthrough_step: int
    hidden: bool  # later than the aggregate's by score.hidden_margin

    def flat(self, name: str) -> dict[str, float]:
        """`label_<name>_<score>` for tables and W&B, where keys are flat."""
        return {f"label_{name}_{k}": v for k, v in asdict(self).items()}


def skill_scores(
    assign: np.ndarray,
    labels: np.ndarray,
    losses: np.ndarray,
    steps: np.ndarray,
    delta_steps: int,
    margin: int,
    draws: int,
    seed: int,
) -> dict[str, SkillScore]:
    """Each label's scores: `assign` (n, m) clusters of the method's kept columns,
    `labels` (n,) a label or BACKGROUND per token, `losses` (n, T) each token's loss at
    `steps`."""
    delta = delta_points(steps, delta_steps)
    aggregate = breakthrough_time(losses.mean(axis=0), steps, delta)
    rng = np.random.default_rng([seed, 4])
    out = {}
    for name in sorted(set(labels.tolist()) - {BACKGROUND}):
        y = labels == name
        best, null = _recovery(assign, y, draws, rng)
        step = breakthrough_time(losses[y].mean(axis=0), steps, delta)
        null_mean = float(null.mean()) if len(null) else float("nan")
        out[name] = SkillScore(
            tokens=int(y.sum()),
            recovery=best["f1"],
            recovery_null_mean=null_mean,
            recovery_null95=float(np.percentile(null, 95)) if len(null) else float("nan"),
            recovery_p=float((1 + (null >= best["f1"] - 1e-12).sum()) / (1 + len(null))),
            recovery_excess=best["f1"] - null_mean,
            homogeneity=best["homogeneity"],
            recall=best["recall"],
            top_vector=best["vector"],
            top_cluster=best["cluster"],
            top_size=best["size"],
            breakthrough_step=step,
            aggregate_breakthrough_step=aggregate,
            hidden=bool(step > aggregate + margin),
        )
    return out


def _recovery(assign: np.ndarray, y: np.ndarray, draws: int, rng: np.random.Generator):
    """The best cluster for `y` (its F1, homogeneity, recall, column, label, size) and
    the best F1 of each null draw (draws,)."""
    best = {"f1": 0.0, "homogeneity": 0.0, "recall": 0.0, "vector": -1, "cluster": -1, "size": 0}
    null = np.zeros(draws)
    n_y = max(int(y.sum()), 1)
    for j in range(assign.shape[1]):
        members, _, cluster = membership(assign[:, j : j + 1])
        if members.shape[1] == 0:
            continue
        kept = np.flatnonzero(assign[:, j] != FILTERED)
        shuffled = np.repeat(y[:, None], draws + 1, axis=1)  # column 0: the data
        if draws:
            perm = rng.random((len(kept), draws)).argsort(axis=0)
            shuffled[kept, 1:] = y[kept][perm]
        size = np.asarray(members.sum(axis=0)).reshape(-1)  # (K,)
        hits = members.T @ shuffled.astype(float)  # (K, draws + 1)
        f1 = 2 * hits / (size[:, None] + n_y)
        null = np.maximum(null, f1[:, 1:].max(axis=0))
        k = int(f1[:, 0].argmax())
        if f1[k, 0] > best["f1"]:
            best = {
                "f1": float(f1[k, 0]),
                "homogeneity": float(hits[k, 0] / size[k]),
                "recall": float(hits[k, 0] / n_y),
                "vector": j,
                "cluster": int(cluster[k]),
                "size": int(size[k]),
            }
    return best, null
