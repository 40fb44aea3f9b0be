"""Skill metrics of clusterings: homogeneity, recall/F1, AMI, coverage, carry recovery,
a permutation null, and breakthrough times.

Assignments are (n, m) integer arrays, one column a clustering (a basis vector, or the
single clustering of a non-basis method); -1 outliers and -2 filtered tokens count in
no cluster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_mutual_info_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

ELIGIBLE_PLACES = ("10s", "100s")


def cluster_table(assign: np.ndarray, labels: pd.DataFrame, threshold: float = 0.85) -> pd.DataFrame:
    """One row per cluster: size, the fraction of each skill, and the carry scores.

    - carry_homogeneity: share of the cluster's tokens that carry.
    - eligible: over `threshold` of the cluster's carry tokens sit in the 10s or 100s
      place (the paper's rule: carrying into the 1000s is just a leading 0 or 1).
    - carry_recall, carry_f1: of the cluster against the 10s/100s carry tokens clustered
      for that vector (outliers and filtered tokens excluded, as in the paper).
    - place and value: the dominant label, its share, and recall/F1 against the clustered
      tokens with that label.
    - mcc: Matthews correlation of membership with carry over every 10s/100s evaluation
      token, clustered or not, within each place (the basis of `carry_recovery`).
    """
    place = labels["place"].astype(str).to_numpy()
    carry = labels["carry"].to_numpy(bool)
    value = labels["value"].to_numpy()
    eligible_place = np.isin(place, ELIGIBLE_PLACES)
    target = carry & eligible_place
    rows = []
    for j in range(assign.shape[1]):
        a = assign[:, j]
        clustered = a >= 0
        target_clustered = (target & clustered).sum()
        for c in np.unique(a[clustered]):
            member = a == c
            size = int(member.sum())
            n_carry = (carry & member).sum()
            hits = (target & member).sum()
            row = {
                "vector": j, "cluster": int(c), "size": size,
                "carry_homogeneity": n_carry / size,
                "eligible": bool(n_carry and (carry & member & eligible_place).sum() / n_carry > threshold),
                **_recall_f1("carry", hits, size, target_clustered),
                "mcc": _place_mcc(member, carry, place),
            }
            for skill, y in (("place", place), ("value", value)):
                values, counts = np.unique(y[member], return_counts=True)
                top = values[np.argmax(counts)]
                row[skill] = top
                row[f"{skill}_homogeneity"] = counts.max() / size
                row.update(_recall_f1(skill, counts.max(), size, (clustered & (y == top)).sum()))
            rows.append(row)
    columns = ["vector", "cluster", "size", "carry_homogeneity", "eligible", "carry_recall",
               "carry_f1", "mcc", "place", "place_homogeneity", "place_recall", "place_f1",
               "value", "value_homogeneity", "value_recall", "value_f1"]
    return pd.DataFrame(rows, columns=columns)


def _recall_f1(skill: str, hits: int, size: int, relevant: int) -> dict[str, float]:
    precision = hits / size if size else 0.0
    recall = hits / relevant if relevant else 0.0
    f1 = 2 * precision * recall / (precision + recall) if hits else 0.0
    return {f"{skill}_recall": float(recall), f"{skill}_f1": float(f1)}


def _place_mcc(member: np.ndarray, carry: np.ndarray, place: np.ndarray) -> float:
    """Matthews correlation of membership with carry within each of the 10s and 100s
    places, weighted by the cluster's tokens in each: a cluster that is just a place
    (or a difference between the places' carry rates) scores 0."""
    total = (member & np.isin(place, ELIGIBLE_PLACES)).sum()
    if not total:
        return 0.0
    score = 0.0
    for p in ELIGIBLE_PLACES:
        sel = place == p
        score += (member & sel).sum() / total * _mcc(member[sel], carry[sel])
    return float(score)


def _mcc(pred: np.ndarray, truth: np.ndarray) -> float:
    """Matthews correlation of two boolean vectors (0 when either is constant)."""
    tp = float((pred & truth).sum())
    fp = float((pred & ~truth).sum())
    fn = float((~pred & truth).sum())
    tn = float((~pred & ~truth).sum())
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


def top_homogeneity(table: pd.DataFrame, skill: str, k: int = 3) -> list[dict]:
    """The k vectors with the most homogeneous cluster for `skill`, one entry each.

    For carry only eligible clusters count; for place and value, every cluster.
    """
    col = f"{skill}_homogeneity"
    pool = table[table["eligible"]] if skill == "carry" else table
    if pool.empty:
        return []
    best = pool.sort_values([col, "size"], ascending=False).groupby("vector").head(1)
    keep = ["vector", "cluster", "size", col, f"{skill}_recall", f"{skill}_f1"]
    if skill != "carry":
        keep.insert(3, skill)
    return best.head(k)[keep].to_dict("records")


def carry_recovery(table: pd.DataFrame) -> float:
    """The search objective: the best Matthews correlation between membership of one
    eligible cluster and carry, over all 10s/100s evaluation tokens, taken within each
    digit place and weighted by the cluster's tokens there.

    It is 0 for clusters unrelated to carry (and for a cluster holding a whole place),
    small for a tiny pure cluster (it misses most carries) and for clusterings that drop
    most tokens (dropped tokens count as misses), and 1 only for a cluster that is
    exactly the 10s/100s carry tokens.
    """
    pool = table[table["eligible"]]
    return float(max(pool["mcc"].max(), 0.0)) if len(pool) else 0.0


def permutation_null(
    assign: np.ndarray, labels: pd.DataFrame, draws: int, threshold: float, seed: int = 0
) -> dict[str, float]:
    """Null of the top carry homogeneity and of carry_recovery: carry labels shuffled
    within each digit place, clusters kept. Returns observed values, the null's 95th
    percentile and p-values ((1 + #null ≥ observed) / (1 + draws))."""
    rng = np.random.default_rng(seed)
    place = labels["place"].astype(str).to_numpy()

    def stats(lab: pd.DataFrame) -> tuple[float, float]:
        t = cluster_table(assign, lab, threshold)
        top = t.loc[t["eligible"], "carry_homogeneity"].max() if len(t) else np.nan
        return (0.0 if np.isnan(top) else float(top)), carry_recovery(t)

    observed = stats(labels)
    null = []
    for _ in range(draws):
        shuffled = labels["carry"].to_numpy().copy()
        for p in np.unique(place):
            idx = np.flatnonzero(place == p)
            shuffled[idx] = shuffled[rng.permutation(idx)]
        null.append(stats(labels.assign(carry=shuffled)))
    null = np.asarray(null) if draws else np.zeros((0, 2))
    out = {}
    for i, name in enumerate(("top_carry_homogeneity", "carry_recovery")):
        out[name] = observed[i]
        if draws:
            out[f"{name}_null95"] = float(np.percentile(null[:, i], 95))
            out[f"{name}_pvalue"] = float((1 + (null[:, i] >= observed[i]).sum()) / (1 + draws))
    return out


def ami_and_coverage(assign: np.ndarray, labels: pd.DataFrame) -> dict[str, float]:
    """Adjusted mutual information of clusters with each skill over clustered tokens,
    averaged over vectors, and coverage (share of tokens neither filtered nor outliers)."""
    out = {"coverage": float((assign >= 0).mean()),
           "coverage_per_vector": (assign >= 0).mean(axis=0).round(4).tolist()}
    for skill in ("carry", "place", "value"):
        y = labels[skill].astype(str).to_numpy()
        scores = []
        for j in range(assign.shape[1]):
            sel = assign[:, j] >= 0
            scores.append(adjusted_mutual_info_score(y[sel], assign[sel, j]) if sel.sum() > 1 else 0.0)
        out[f"ami_{skill}"] = float(np.mean(scores)) if scores else 0.0
        out[f"ami_{skill}_per_vector"] = np.round(scores, 4).tolist()
    return out


def breakthrough_time(curve: np.ndarray, steps: np.ndarray, delta: int) -> int:
    """Step of maximum acceleration of the loss *reduction* r = −f of a loss-like curve f:
    argmax_t [r(t+Δ) − r(t)] − [r(t) − r(t−Δ)], Δ in evaluation points, so the time marks
    the onset of the sharpest drop."""
    r = -np.asarray(curve, dtype=np.float64)
    T = len(r)
    if T < 2 * delta + 1:
        return int(steps[T // 2])
    t = np.arange(delta, T - delta)
    accel = (r[t + delta] - r[t]) - (r[t] - r[t - delta])
    return int(steps[t[np.argmax(accel)]])


def cluster_breakthroughs(
    assign: np.ndarray, curves: np.ndarray, steps: np.ndarray, delta_steps: int, hidden_after: int
) -> pd.DataFrame:
    """Breakthrough time of each cluster's median curve; hidden when later than τ."""
    interval = int(steps[1] - steps[0]) if len(steps) > 1 else 1
    delta = max(1, round(delta_steps / interval))
    rows = []
    for j in range(assign.shape[1]):
        for c in np.unique(assign[assign[:, j] >= 0, j]):
            median = np.median(curves[assign[:, j] == c, :, j], axis=0)
            t = breakthrough_time(median, steps, delta)
            rows.append({"vector": j, "cluster": int(c), "breakthrough_step": t,
                         "hidden": t > hidden_after})
    return pd.DataFrame(rows, columns=["vector", "cluster", "breakthrough_step", "hidden"])


def carry_probe_auc(curves: np.ndarray, labels: pd.DataFrame, folds: int = 5, seed: int = 0) -> float:
    """Supervised diagnostic, apart from the unsupervised metrics: cross-validated ROC AUC
    of a linear probe predicting carry for 10s/100s tokens from all of a method's curves
    (n, T, m). High AUC with low carry homogeneity means the skill is in the trajectories
    but clustering did not isolate it."""
    sel = labels["place"].astype(str).isin(ELIGIBLE_PLACES).to_numpy()
    x = curves[sel].reshape(int(sel.sum()), -1)
    y = labels["carry"].to_numpy(bool)[sel]
    if y.all() or not y.any() or min(y.sum(), (~y).sum()) < folds:
        return float("nan")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, x, y, cv=cv, scoring="roc_auc").mean())
