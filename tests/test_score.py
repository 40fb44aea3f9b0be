"""Metrics on planted and random clusterings with known answers."""

import numpy as np
import pytest

from polca_study.analysis.cluster import ClusterConfig, cluster_curves
from polca_study.analysis.score import (
    ELIGIBLE_PLACES,
    breakthrough_onset,
    breakthrough_time,
    carry_recovery,
    cluster_breakthroughs,
    cluster_table,
    filter_carry_rates,
    permutation_null,
    top_homogeneity,
)
from polca_study.tasks.arithmetic_data import encode


@pytest.fixture(scope="module")
def labels():
    rng = np.random.default_rng(0)
    return encode(rng.integers(0, 1000, 600), rng.integers(0, 1000, 600)).labels


def eligible_carry(labels):
    return labels.carry.to_numpy() & labels.place.astype(str).isin(ELIGIBLE_PLACES).to_numpy()


def test_planted_carry_cluster_scores_one(labels):
    target = eligible_carry(labels)
    middle = labels.place.astype(str).isin(ELIGIBLE_PLACES).to_numpy()
    assign = np.where(target, 0, np.where(middle, 1, -1))[:, None]
    table = cluster_table(assign, labels)
    planted = table[table.cluster == 0].iloc[0]
    assert planted.carry_homogeneity == 1.0 and planted.eligible
    assert planted.carry_recall == 1.0 and planted.carry_f1 == 1.0
    assert carry_recovery(table) == pytest.approx(1.0)
    assert top_homogeneity(table, "carry")[0]["carry_homogeneity"] == 1.0
    null = permutation_null(assign, labels, draws=30, threshold=0.85)
    assert null["carry_recovery_p"] == pytest.approx(1 / 31)
    assert null["carry_recovery_null95"] < 0.2


def test_random_clusters_score_near_zero(labels):
    rng = np.random.default_rng(1)
    assign = rng.integers(0, 12, size=(len(labels), 5))
    table = cluster_table(assign, labels)
    assert carry_recovery(table) < 0.12
    null = permutation_null(assign, labels, draws=30, threshold=0.85)
    assert null["carry_recovery_p"] > 0.05


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


def test_gaming_cluster_no_longer_scores_high(labels):
    """Every 10s/100s carry token plus all 1s tokens and the 1000s non-carry tokens: the
    place-wise score alone gave it 1.00; tokens of other places now count against it."""
    place = labels.place.astype(str).to_numpy()
    carry = labels.carry.to_numpy()
    gaming = eligible_carry(labels) | (place == "1s") | ((place == "1000s") & ~carry)
    table = cluster_table(np.where(gaming, 0, -1)[:, None], labels)
    row = table.iloc[0]
    assert row.eligible and row.mcc == pytest.approx(1.0)  # what the old score reported
    assert row.carry_homogeneity < 0.5
    share = eligible_carry(labels).sum() / gaming.sum()  # its tokens in the 10s/100s places
    assert carry_recovery(table) == pytest.approx(share)
    assert carry_recovery(table) < 0.4


def test_null_within_the_filter_gives_a_random_clustering_of_carry_tokens_no_credit(labels):
    """A filter that keeps only 10s/100s carry tokens makes any cluster of kept tokens
    carry-pure; shuffled within the kept tokens, the null is just as pure: p near 1."""
    rng = np.random.default_rng(4)
    keep = eligible_carry(labels)
    assign = np.full((len(labels), 3), -2)
    for j in range(3):
        assign[keep, j] = rng.integers(0, 2, keep.sum())
    table = cluster_table(assign, labels)
    assert top_homogeneity(table, "carry")[0]["carry_homogeneity"] == 1.0
    null = permutation_null(assign, labels, draws=50, threshold=0.85, seed=1)
    assert null["top_carry_homogeneity_p"] > 0.9
    assert null["carry_recovery_p"] > 0.9
    assert np.allclose(filter_carry_rates(assign, labels), 1.0)  # the filter did it all
    # the same clusters with carry shuffled over whole places (the tokens counted as
    # outliers, not filtered) look significant: what the filter did is credited to them
    whole_place = np.where(assign == -2, -1, assign)
    assert (
        permutation_null(whole_place, labels, draws=50, threshold=0.85, seed=1)["top_carry_homogeneity_p"]
        < 0.05
    )


def test_filter_carry_rates_against_a_direct_count(labels):
    rng = np.random.default_rng(5)
    assign = rng.integers(-2, 3, size=(len(labels), 4))
    place = labels.place.astype(str).to_numpy()
    carry = labels.carry.to_numpy()
    for j, rate in enumerate(filter_carry_rates(assign, labels)):
        kept = (assign[:, j] != -2) & np.isin(place, ELIGIBLE_PLACES)
        assert rate == pytest.approx(carry[kept].mean())


def test_breakthrough_time_of_a_piecewise_linear_drop():
    """f = 1 until step 600, falls linearly to 0 at step 1000, then flat: the second
    difference peaks where the drop ends (1000) and is lowest where it begins (600)."""
    steps = np.arange(0, 2000, 20)
    curve = np.clip((1000 - steps) / 400, 0, 1)
    assert breakthrough_time(curve, steps, delta=5) == 1000
    assert breakthrough_onset(curve, steps, delta=5) == 600
    # a rising curve's maximum acceleration is where its rise begins
    assert breakthrough_time(-curve, steps, delta=5) == 600


def test_cluster_breakthroughs_use_the_mean_curve():
    steps = np.arange(0, 1000, 10)
    early = np.clip((300 - steps) / 100, 0, 1)  # ends its drop at step 300
    late = np.clip((800 - steps) / 100, 0, 1)  # at 800
    # cluster 0 mixes one early token among late ones: the mean's second difference
    # peaks at the late elbow, the median's would too, but the mean is the definition
    curves = np.stack([late, late, early, early, early], axis=0)[:, :, None]
    assign = np.array([[0], [0], [1], [1], [1]])
    table = cluster_breakthroughs(assign, curves, steps, delta_steps=50, hidden_after=500)
    got = dict(zip(table.cluster, table.breakthrough_step, strict=True))
    assert got == {0: 800, 1: 300}
    assert table.set_index("cluster").hidden.to_dict() == {0: True, 1: False}


def test_hdbscan_recovers_planted_groups_and_filters_rising_tokens():
    rng = np.random.default_rng(0)
    T = 12
    early = np.cumsum(np.r_[-np.ones(3), np.zeros(T - 3)]) + rng.normal(0, 0.05, (80, T))
    late = np.cumsum(np.r_[np.zeros(T - 3), -np.ones(3)]) + rng.normal(0, 0.05, (80, T))
    rising = -late[:20]
    curves = np.vstack([early, late, rising])
    rises = curves[:, -1] > 0
    s = ClusterConfig(
        min_cluster_size=20, min_samples=5, normalize="none", feature="trajectory", grouping="none"
    )
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
