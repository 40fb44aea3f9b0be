"""Skill metrics of clusterings: homogeneity, recall/F1, AMI, coverage, carry recovery,
a permutation null, and breakthrough times.

Assignments are (n, m) integer arrays, one column a clustering (a basis vector, or the
single clustering of a non-basis method); -1 outliers and -2 filtered tokens count in
no cluster.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import adjusted_mutual_info_score
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from polca_study.analysis.cluster import FILTERED

ELIGIBLE_PLACES = ("10s", "100s")


def membership(assign: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """Every cluster of every column as one sparse membership matrix (n tokens × K
    clusters), with each cluster's column (vector) and label."""
    rows, cols, vec, lab = [], [], [], []
    for j in range(assign.shape[1]):
        sel = np.flatnonzero(assign[:, j] >= 0)
        ids, local = np.unique(assign[sel, j], return_inverse=True)
        rows.append(sel)
        cols.append(len(vec) + local)
        vec += [j] * len(ids)
        lab += ids.tolist()
    rows = np.concatenate(rows) if rows else np.empty(0, int)
    cols = np.concatenate(cols) if cols else np.empty(0, int)
    matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(assign), len(vec)))
    return matrix, np.asarray(vec, dtype=int), np.asarray(lab, dtype=int)


def carry_stats(
    members: sparse.csr_matrix, carry: np.ndarray, place: np.ndarray, threshold: float
) -> dict[str, np.ndarray]:
    """Carry homogeneity, eligibility and place-wise Matthews correlation of every cluster
    (K,) for each column of `carry` (n, D): D = 1 for the data, D = draws for a null."""
    carry = carry.reshape(len(carry), -1).astype(float)
    mt = members.T.tocsr()
    size = np.asarray(members.sum(axis=0)).reshape(-1, 1)
    n_carry = mt @ carry
    eligible_place = np.isin(place, ELIGIBLE_PLACES).astype(float)
    n_eligible = mt @ (carry * eligible_place[:, None])
    mcc_sum = np.zeros_like(n_carry)
    in_places = mt @ eligible_place
    for p in ELIGIBLE_PLACES:
        in_p = (place == p).astype(float)
        N, C = in_p.sum(), (carry * in_p[:, None]).sum(axis=0, keepdims=True)
        m = (mt @ in_p).reshape(-1, 1)
        tp = mt @ (carry * in_p[:, None])
        fp, fn = m - tp, C - tp
        tn = N - m - fn
        denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
        mcc = np.divide(tp * tn - fp * fn, denom, out=np.zeros_like(tp), where=denom > 0)
        mcc_sum += m * mcc
    with np.errstate(invalid="ignore", divide="ignore"):
        mcc = np.where(in_places[:, None] > 0, mcc_sum / np.maximum(in_places, 1)[:, None], 0.0)
        share = (in_places / np.maximum(size[:, 0], 1))[:, None]
        return {
            "size": size[:, 0],
            "carry_homogeneity": n_carry / size,
            "eligible": (n_carry > 0) & (n_eligible / np.maximum(n_carry, 1) > threshold),
            "hits": n_eligible,
            "mcc": mcc,
            "place_share": np.broadcast_to(share, mcc.shape),
            "recovery": mcc * share,
        }


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
      token, clustered or not, within each place, weighted by the cluster's tokens in
      each place.
    - place_share: the share of the cluster's tokens in the 10s/100s places.
    - recovery: mcc × place_share, the cluster's `carry_recovery`.
    """
    place = labels["place"].astype(str).to_numpy()
    carry = labels["carry"].to_numpy(bool)
    members, vector, cluster = membership(assign)
    stats = carry_stats(members, carry, place, threshold)
    size = stats["size"]
    target = (carry & np.isin(place, ELIGIBLE_PLACES)).astype(float)
    clustered = (assign >= 0).astype(float)
    table = pd.DataFrame(
        {
            "vector": vector,
            "cluster": cluster,
            "size": size.astype(int),
            "carry_homogeneity": stats["carry_homogeneity"][:, 0],
            "eligible": stats["eligible"][:, 0],
            **_recall_f1("carry", stats["hits"][:, 0], size, (target @ clustered)[vector]),
            "mcc": stats["mcc"][:, 0],
            "place_share": stats["place_share"][:, 0],
            "recovery": stats["recovery"][:, 0],
        }
    )
    mt = members.T.tocsr()
    for skill, y in (("place", place), ("value", labels["value"].to_numpy())):
        values, codes = np.unique(y, return_inverse=True)
        onehot = np.eye(len(values))[codes]  # (n, L)
        counts = mt @ onehot  # (K, L)
        top = counts.argmax(axis=1) if len(counts) else np.empty(0, int)
        hits = counts[np.arange(len(top)), top]
        relevant = (clustered.T @ onehot)[vector, top]  # clustered tokens with that label
        table[skill] = values[top]
        table[f"{skill}_homogeneity"] = hits / size
        for key, col in _recall_f1(skill, hits, size, relevant).items():
            table[key] = col
    return table


def _recall_f1(skill: str, hits: np.ndarray, size: np.ndarray, relevant: np.ndarray) -> dict:
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(size > 0, hits / np.maximum(size, 1), 0.0)
        recall = np.where(relevant > 0, hits / np.maximum(relevant, 1), 0.0)
        f1 = np.where(hits > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return {f"{skill}_recall": recall, f"{skill}_f1": f1}


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
    """The best `recovery` of one eligible cluster: mcc × place_share, where mcc is the
    Matthews correlation between membership and carry over all 10s/100s evaluation
    tokens (clustered or not), within each place, weighted by the cluster's tokens there,
    and place_share the share of the cluster's tokens that sit in those places.

    The mcc term is 0 for a cluster unrelated to carry or holding a whole place, and small
    for a tiny pure cluster (it misses most carries) or a clustering that drops most
    tokens (dropped tokens count as misses). The share term makes tokens of the 1s and
    1000s places count against a cluster: the 10s/100s carry tokens plus every 1s token
    and the 1000s non-carry tokens score about 0.35, not 1. It is 1 only for a cluster
    that is exactly the 10s/100s carry tokens.
    """
    pool = table[table["eligible"]]
    return float(max(pool["recovery"].max(), 0.0)) if len(pool) else 0.0


def _shuffles(
    carry: np.ndarray, groups: list[np.ndarray], draws: int, rng: np.random.Generator
) -> np.ndarray:
    """(n, draws + 1) carry labels, column 0 the data; in the others each index group's
    labels are permuted among themselves."""
    out = np.repeat(carry[:, None], draws + 1, axis=1)
    for idx in groups:
        if len(idx) > 1 and draws:
            perm = rng.random((len(idx), draws)).argsort(axis=0)  # one permutation per draw
            out[idx, 1:] = carry[idx[perm]]
    return out


def permutation_null(
    assign: np.ndarray, labels: pd.DataFrame, draws: int, threshold: float, seed: int = 0
) -> dict[str, float]:
    """Null of the top carry homogeneity and of carry_recovery, clusters kept: for each
    column (basis vector) apart, carry labels are shuffled within each digit place among
    the tokens the filter kept for that column (filtered tokens keep theirs). What the
    filter alone does to the carry rate is thus part of the null, not of the observed
    effect. Returns, per metric, the null mean, its 95th percentile and the p-value
    (1 + #null ≥ observed) / (1 + draws); no observed values."""
    if not draws:
        return {}
    rng = np.random.default_rng(seed)
    place = labels["place"].astype(str).to_numpy()
    carry = labels["carry"].to_numpy(bool)
    top = np.zeros(draws + 1)
    recovery = np.zeros(draws + 1)
    for j in range(assign.shape[1]):
        kept = assign[:, j] != FILTERED
        groups = [np.flatnonzero(kept & (place == p)) for p in np.unique(place)]
        members, _, _ = membership(assign[:, j : j + 1])
        if members.shape[1] == 0:
            continue
        stats = carry_stats(members, _shuffles(carry, groups, draws, rng), place, threshold)
        eligible = stats["eligible"]
        top = np.maximum(top, np.where(eligible, stats["carry_homogeneity"], 0.0).max(axis=0))
        recovery = np.maximum(recovery, np.where(eligible, stats["recovery"], 0.0).max(axis=0))
    out = {}
    for name, values in (("top_carry_homogeneity", top), ("carry_recovery", recovery)):
        out[f"{name}_null_mean"] = float(values[1:].mean())
        out[f"{name}_null95"] = float(np.percentile(values[1:], 95))
        out[f"{name}_p"] = float((1 + (values[1:] >= values[0] - 1e-12).sum()) / (1 + draws))
    return out


def filter_carry_rates(assign: np.ndarray, labels: pd.DataFrame) -> np.ndarray:
    """The filter-only reference (m,): the carry rate among the 10s/100s tokens the
    filter kept for each column, to compare with the base rate over all of them."""
    eligible = labels["place"].astype(str).isin(ELIGIBLE_PLACES).to_numpy()
    carry = labels["carry"].to_numpy(bool)
    kept = (assign != FILTERED) & eligible[:, None]
    with np.errstate(invalid="ignore"):
        return (kept & carry[:, None]).sum(axis=0) / kept.sum(axis=0)


def ami_and_coverage(
    assign: np.ndarray, labels: pd.DataFrame, skills: tuple[str, ...] = ("carry", "place", "value")
) -> dict[str, float]:
    """Adjusted mutual information of clusters with each skill over clustered tokens,
    averaged over vectors, and coverage (share of tokens neither filtered nor outliers)."""
    out = {
        "coverage": float((assign >= 0).mean()),
        "coverage_per_vector": (assign >= 0).mean(axis=0).round(4).tolist(),
    }
    for skill in skills:
        y = labels[skill].astype(str).to_numpy()
        scores = []
        for j in range(assign.shape[1]):
            sel = assign[:, j] >= 0
            scores.append(adjusted_mutual_info_score(y[sel], assign[sel, j]) if sel.sum() > 1 else 0.0)
        out[f"ami_{skill}"] = float(np.mean(scores)) if scores else 0.0
        out[f"ami_{skill}_per_vector"] = np.round(scores, 4).tolist()
    return out


def breakthrough_time(curve: np.ndarray, steps: np.ndarray, delta: int) -> int:
    """The paper's breakthrough time of a curve f, its step of maximum acceleration:
    argmax_t [f(t+Δ) − f(t)] − [f(t) − f(t−Δ)], Δ in evaluation points. For a falling
    loss-like curve this is the elbow where a drop ends (the skill is learned)."""
    return int(steps[_second_difference(curve, steps, delta)[0]])


def breakthrough_onset(curve: np.ndarray, steps: np.ndarray, delta: int) -> int:
    """The step of maximum deceleration, argmin of the same second difference: where the
    sharpest drop of a falling curve begins (reported beside the paper's time)."""
    return int(steps[_second_difference(curve, steps, delta)[1]])


def _second_difference(curve: np.ndarray, steps: np.ndarray, delta: int) -> tuple[int, int]:
    f = np.asarray(curve, dtype=np.float64)
    T = len(f)
    if T < 2 * delta + 1:
        return T // 2, T // 2
    t = np.arange(delta, T - delta)
    accel = (f[t + delta] - f[t]) - (f[t] - f[t - delta])
    return int(t[np.argmax(accel)]), int(t[np.argmin(accel)])


def delta_points(steps: np.ndarray, delta_steps: int) -> int:
    """Δ in evaluation points from Δ in steps."""
    interval = int(steps[1] - steps[0]) if len(steps) > 1 else 1
    return max(1, round(delta_steps / interval))


def cluster_breakthroughs(
    assign: np.ndarray, curves: np.ndarray, steps: np.ndarray, delta_steps: int, hidden_after: int
) -> pd.DataFrame:
    """Breakthrough time (and onset) of each cluster's mean curve; hidden when the time
    is later than `hidden_after` (the aggregate loss's breakthrough plus a margin)."""
    delta = delta_points(steps, delta_steps)
    rows = []
    for j in range(assign.shape[1]):
        for c in np.unique(assign[assign[:, j] >= 0, j]):
            mean = curves[assign[:, j] == c, :, j].mean(axis=0)
            t = breakthrough_time(mean, steps, delta)
            rows.append(
                {
                    "vector": j,
                    "cluster": int(c),
                    "breakthrough_step": t,
                    "breakthrough_onset_step": breakthrough_onset(mean, steps, delta),
                    "hidden": t > hidden_after,
                }
            )
    return pd.DataFrame(
        rows, columns=["vector", "cluster", "breakthrough_step", "breakthrough_onset_step", "hidden"]
    )


def carry_probe_auc(curves: np.ndarray, labels: pd.DataFrame, folds: int = 5, seed: int = 0) -> float:
    """Supervised diagnostic, apart from the unsupervised metrics: cross-validated ROC AUC
    of a linear probe predicting carry for 10s/100s tokens from all of a method's curves
    (n, T, m). High AUC with low carry homogeneity means the skill is in the trajectories
    but clustering did not isolate it."""
    sel = labels["place"].astype(str).isin(ELIGIBLE_PLACES).to_numpy()
    x = curves[sel].reshape(int(sel.sum()), -1)
    y = labels["carry"].to_numpy(bool)[sel]
    if x.shape[1] == 0 or y.all() or not y.any() or min(y.sum(), (~y).sum()) < folds:
        return float("nan")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    return float(cross_val_score(probe, x, y, cv=cv, scoring="roc_auc").mean())
