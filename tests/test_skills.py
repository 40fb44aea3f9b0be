"""Scores of labelled skills, against closed forms and their permutation null."""

import numpy as np

from polca_study.analysis.cluster import FILTERED
from polca_study.analysis.skills import skill_scores

STEPS = np.arange(0, 1000, 50)


def curves(n, drop_at):
    """(n, T) falling losses with a step down at `drop_at` (n,)."""
    return (
        np.where(STEPS[None, :] < np.asarray(drop_at)[:, None], 3.0, 1.0) + 0.01 * np.arange(len(STEPS))[::-1]
    )


def test_a_planted_cluster_is_recovered_above_its_null_and_shuffled_labels_are_not():
    rng = np.random.default_rng(0)
    n = 400
    labels = np.full(n, "", dtype=object)
    labels[:60] = "copy"
    labels[60:160] = "novel"
    assign = np.stack([rng.integers(0, 4, n), rng.integers(0, 3, n)], axis=1)
    assign[:60, 1] = 7  # vector 1 has a cluster of exactly the copy tokens, and 10 more
    assign[200:210, 1] = 7
    assign[300:320, 0] = FILTERED
    losses = curves(n, np.where(labels == "copy", 800, 200))
    scores = skill_scores(assign, labels, losses, STEPS, 100, 100, 200, seed=0)
    copy = scores["copy"]
    # closed forms: 60 of the cluster's 70 are copy, all 60 copy tokens are in it
    assert copy.homogeneity == 60 / 70 and copy.recall == 1.0
    assert copy.recovery == 2 * 60 / (70 + 60)
    assert (copy.top_vector, copy.top_cluster, copy.top_size, copy.tokens) == (1, 7, 70, 60)
    assert copy.recovery_p == 1 / 201 and copy.recovery_excess > 0.5
    assert copy.recovery_null95 < 0.4
    # the copy tokens' loss drops at 800, the aggregate's at 200: hidden
    assert copy.breakthrough_step > copy.aggregate_breakthrough_step + 100 and copy.hidden
    assert not scores["novel"].hidden and scores["novel"].recovery_p > 0.05
    shuffled = skill_scores(assign, rng.permutation(labels), losses, STEPS, 100, 100, 200, seed=0)
    assert shuffled["copy"].recovery_p > 0.05 and abs(shuffled["copy"].recovery_excess) < 0.1


def test_filtered_tokens_keep_their_labels_in_the_null():
    # a column whose filter keeps only the labelled tokens: any shuffle among the kept
    # ones is the data, so the null equals the observed recovery
    n = 50
    labels = np.array(["x"] * 10 + [""] * 40, dtype=object)
    assign = np.full((n, 1), FILTERED)
    assign[:10, 0] = 0
    score = skill_scores(assign, labels, curves(n, [500] * n), STEPS, 100, 100, 20, seed=1)["x"]
    assert score.recovery == 1.0 and score.recovery_null_mean == 1.0 and score.recovery_p == 1.0


def test_flat_names_say_label_and_score():
    labels = np.array(["a"] * 5 + [""] * 5, dtype=object)
    flat = skill_scores(np.zeros((10, 1), int), labels, curves(10, [500] * 10), STEPS, 100, 100, 5, 0)[
        "a"
    ].flat("a")
    assert (
        flat["label_a_recovery"] == 2 * 5 / 15
        and "label_a_recovery_excess" in flat
        and "label_a_hidden" in flat
    )
