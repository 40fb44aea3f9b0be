"""Metrics on planted and random clusterings with known answers."""

import numpy as np
import pytest

from polca_study.cluster import ClusterConfig, cluster_curves
from polca_study.data.arithmetic import encode
from polca_study.score import (
    breakthrough_time,
    carry_recovery,
    cluster_table,
    permutation_null,
    top_homogeneity,
)


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return encode(rng.integers(0, 1000, 600), rng.integers(0, 1000, 600)).labels


def eligible_carry(labels):
    return labels.carry.to_numpy() & labels.place.astype(str).isin(["10s", "100s"]).to_numpy()


def test_planted_carry_cluster_scores_one(labels):
    target = eligible_carry(labels)
    middle = labels.place.astype(str).isin(["10s", "100s"]).to_numpy()
    assign = np.where(target, 0, np.where(middle, 1, -1))[:, None]
    table = cluster_table(assign, labels)
    planted = table[table.cluster == 0].iloc[0]
    assert planted.carry_homogeneity == 1.0 and planted.eligible
    assert planted.carry_recall == 1.0 and planted.carry_f1 == 1.0
    assert carry_recovery(table) == pytest.approx(1.0)
    assert top_homogeneity(table, "carry")[0]["carry_homogeneity"] == 1.0
    null = permutation_null(assign, labels, draws=30, threshold=0.85)
    assert null["carry_recovery_pvalue"] == pytest.approx(1 / 31)
    assert null["carry_recovery_null95"] < 0.2


def test_random_clusters_score_near_zero(labels):
    rng = np.random.default_rng(1)
    assign = rng.integers(0, 12, size=(len(labels), 5))
    table = cluster_table(assign, labels)
    assert carry_recovery(table) < 0.12
    null = permutation_null(assign, labels, draws=30, threshold=0.85)
    assert null["carry_recovery_pvalue"] > 0.05


def test_recovery_cannot_be_gamed_by_a_place_or_a_tiny_pure_cluster(labels):
    place = labels.place.astype(str).to_numpy()
    whole_place = np.where(place == "100s", 0, -1)[:, None]
    assert carry_recovery(cluster_table(whole_place, labels)) < 0.1
    tiny = np.full(len(labels), -1)
    tiny[np.flatnonzero(eligible_carry(labels))[:8]] = 0
    table = cluster_table(tiny[:, None], labels)
    assert table.carry_homogeneity.iloc[0] == 1.0  # pure, yet:
    assert carry_recovery(table) < 0.15


def test_clusters_of_1000s_carries_are_not_eligible(labels):
    place = labels.place.astype(str).to_numpy()
    assign = np.where((place == "1000s") & labels.carry.to_numpy(), 0, -1)[:, None]
    table = cluster_table(assign, labels)
    assert table.carry_homogeneity.iloc[0] == 1.0 and not table.eligible.iloc[0]
    assert top_homogeneity(table, "carry") == []


def test_breakthrough_time_finds_the_onset_of_a_drop():
    steps = np.arange(0, 2000, 20)
    curve = 1.0 - 1.0 / (1.0 + np.exp(-(steps - 1200) / 30.0))  # drops around step 1200
    t = breakthrough_time(curve, steps, delta=5)
    assert 1000 <= t <= 1200


def test_hdbscan_recovers_planted_groups_and_filters_rising_tokens():
    rng = np.random.default_rng(0)
    T = 12
    early = np.cumsum(np.r_[-np.ones(3), np.zeros(T - 3)]) + rng.normal(0, 0.05, (80, T))
    late = np.cumsum(np.r_[np.zeros(T - 3), -np.ones(3)]) + rng.normal(0, 0.05, (80, T))
    rising = -late[:20]
    curves = np.vstack([early, late, rising])
    rises = curves[:, -1] > 0
    s = ClusterConfig(min_cluster_size=20, min_samples=5, normalize="none",
                        feature="cumulative", grouping="none")
    assign = cluster_curves(curves, np.zeros(len(curves)), s, rises)
    assert (assign[160:] == -2).all()
    a, b = assign[:80], assign[80:160]
    assert len(set(a[a >= 0])) == 1 and len(set(b[b >= 0])) == 1 and a[0] != b[0]
    assert (a >= 0).mean() > 0.9 and (b >= 0).mean() > 0.9


def test_vectorised_scores_match_sklearn_per_cluster(labels):
    from sklearn.metrics import matthews_corrcoef

    rng = np.random.default_rng(3)
    assign = rng.integers(-2, 6, size=(len(labels), 3))
    table = cluster_table(assign, labels)
    place = labels.place.astype(str).to_numpy()
    carry = labels.carry.to_numpy()
    for row in table.itertuples():
        member = assign[:, row.vector] == row.cluster
        assert row.size == member.sum()
        assert row.carry_homogeneity == pytest.approx(carry[member].mean())
        weights, scores = [], []
        for p in ("10s", "100s"):
            sel = place == p
            weights.append((member & sel).sum())
            scores.append(matthews_corrcoef(carry[sel], member[sel]))
        assert row.mcc == pytest.approx(np.average(scores, weights=weights))
        values, counts = np.unique(place[member], return_counts=True)
        assert row.place_homogeneity == pytest.approx(counts.max() / member.sum())
