"""Each method clusters the trajectory the paper defines, under its own settings."""

import dataclasses

import numpy as np
import pytest

from polca_study.analysis.cluster import features
from polca_study.analysis.methods import METHODS, method_curves, rising_vectors, unallocated_share
from polca_study.polca import Decomposition
from polca_study.study.config import validate
from tests.conftest import compose_config


@pytest.fixture(scope="module")
def traj():
    rng = np.random.default_rng(0)
    n, T, m = 30, 9, 3  # tokens, evaluation points, basis vectors
    return Decomposition(
        steps=np.arange(T) * 25,
        losses=np.exp(-np.linspace(0, 2, T))[None] + rng.normal(0, 0.05, (n, T)),
        grads=rng.normal(size=(n, T, m)),
        first_order=rng.normal(-0.1, 0.1, (n, T - 1, m)),
        polca=rng.normal(-0.1, 0.1, (n, T - 1, m)),
    )


def expected(name, traj, lca):
    """The paper's trajectories, written out apart from the code under test."""
    L, n = traj.losses, len(traj.losses)
    if name == "loss":
        return L[:, :, None]
    if name == "loss_change":
        return np.stack([L[:, t] - L[:, t - 1] for t in range(1, L.shape[1])], axis=1)[:, :, None]
    if name == "fisher":
        return traj.grads**2
    source = {
        "lca": lca.first_order,
        "polca_first_order": traj.first_order,
        "polca": traj.polca,
        "random_basis": traj.polca,  # POLCA along another basis: the same trajectory of it
        "shuffled_basis": traj.polca,
    }[name]
    out = np.zeros_like(source)
    for t in range(source.shape[1]):
        out[:, t] = source[:, : t + 1].sum(axis=1)
    assert out.shape[0] == n
    return out


def zscore(x):
    s = x.std(axis=1, keepdims=True)
    return (x - x.mean(axis=1, keepdims=True)) / np.where(s > 0, s, 1)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_each_method_clusters_its_defined_trajectory_under_its_own_settings(name, traj):
    first = np.random.default_rng(1).normal(size=(30, 8, 4))
    lca = Decomposition(first, first, traj.losses, traj.grads, steps=traj.steps, parameters=np.arange(4))
    curves = method_curves(name, traj, lca)
    want = expected(name, traj, lca)
    np.testing.assert_allclose(curves.curves, want)
    assert len(curves.steps) == want.shape[1] and len(curves.columns) == want.shape[2]
    settings = validate(compose_config([f"method={name}"])).cluster
    got = features(curves.curves[:, :, 0], settings)
    # what HDBSCAN sees is the trajectory (a loss curve stays a loss curve) or, when the
    # method's settings say so, its increments; never a difference of the wrong order
    base = want[:, :, 0]
    if settings.feature == "increments":
        base = np.concatenate([base[:, :1], base[:, 1:] - base[:, :-1]], axis=1)
    else:
        assert settings.feature == "trajectory"
    norm = {
        "zscore": zscore,
        "none": lambda x: x,
        "final": lambda x: x / np.where(np.abs(want[:, -1:, 0]) > 0, np.abs(want[:, -1:, 0]), 1),
    }
    np.testing.assert_allclose(got, norm[settings.normalize](base), atol=1e-12)


def test_every_method_is_clustered_on_its_trajectory_by_default():
    """The paper's definitions: the loss method's features are the loss curve, not its
    increments (which would be the loss change); POLCA's are its running sums."""
    for name in METHODS:
        assert validate(compose_config([f"method={name}"])).cluster.feature == "trajectory"


def test_cluster_paper_replaces_every_method_setting():
    for name in METHODS:
        c = validate(compose_config([f"method={name}", "cluster=paper"])).cluster
        assert (c.feature, c.normalize, c.grouping, c.min_cluster_size) == ("trajectory", "none", "none", 150)


def test_basis_ablations_use_polcas_settings():
    polca = validate(compose_config(["method=polca"]))
    for ablation, kind in (("random_basis", "random"), ("shuffled_basis", "shuffled")):
        s = validate(compose_config([f"method={ablation}"]))
        assert s.method.name == ablation and s.basis.kind == kind and s.cluster == polca.cluster
    with pytest.raises(ValueError, match="basis.kind must be random"):
        validate(compose_config(["method=random_basis", "basis.kind=hessian"]))


def test_rising_vectors_are_those_whose_mean_projected_loss_rises(traj):
    t = dataclasses.replace(traj)
    polca = t.polca.copy()
    polca[:, :, 1] = np.abs(polca[:, :, 1])  # vector 1 only rises
    t.polca = polca
    totals = polca.sum(axis=1).mean(axis=0)
    assert rising_vectors(t).tolist() == np.flatnonzero(totals > 0).tolist()
    assert 1 in rising_vectors(t).tolist()


def test_clusters_of_kept_vectors_keep_their_original_column_index():
    """After a rising vector is dropped, tables name the remaining vectors by their index
    in the basis, not their position among the kept ones."""
    from polca_study.study.pipeline import analyse
    from polca_study.tasks import make_task

    settings = validate(
        compose_config(
            [
                "experiment=tiny",
                "score.permutations=1",
                "score.arithmetic.probe=false",
                "cluster.grouping=none",
                "cluster.min_cluster_size=20",
                "cluster.normalize=none",
            ]
        )
    )
    task = make_task(settings.dataset)
    n, T = len(task.eval_split.labels), 13
    rng = np.random.default_rng(0)
    polca = rng.normal(-0.01, 0.001, (n, T - 1, 3))
    polca[:, :, 1] = np.abs(polca[:, :, 1]) + 0.1  # vector 1 rises for every token: dropped
    half = np.arange(n) < n // 2  # vector 2 splits the tokens into an early and a late group
    early, late = np.zeros(T - 1), np.zeros(T - 1)
    early[2], late[9] = -1, -1
    polca[:, :, 2] = np.where(half[:, None], early, late) + rng.normal(0, 0.01, (n, T - 1))
    traj = Decomposition(
        steps=np.arange(T) * 20,
        polca=polca,
        first_order=polca,
        losses=np.linspace(2, 1, T)[None].repeat(n, 0),
        grads=rng.normal(size=(n, T, 3)),
    )
    metrics, tables, assign, _ = analyse(settings, task, "polca", traj, None)
    assert metrics["vectors_dropped"] == [1]
    table = tables["clusters"]
    assert set(table.vector) <= {0, 2} and 2 in set(table.vector)
    assert (assign[:, 1] == -2).all()  # the dropped column is filtered throughout
    assert metrics["coverage_per_vector"][1] is None and len(metrics["coverage_per_vector"]) == 3
    assert metrics["filter_carry_rate_per_vector"][1] is None
    assert {e["vector"] for e in metrics["top_place"]} <= {0, 2}
    # vector 2's two planted groups, found under their own index, the late one later
    found = {}
    for row in table[table.vector == 2].itertuples():
        members = assign[:, 2] == row.cluster
        if members[half].all() or not members[half].any():
            found["early" if members[half].any() else "late"] = row.breakthrough_step
    assert found["late"] > found["early"]


def test_unallocated_share_is_the_loss_change_the_terms_miss(traj):
    n, T, m = traj.polca.shape
    actual = np.diff(traj.losses, axis=1)
    exact = dataclasses.replace(traj, polca=np.repeat(actual[:, :, None] / m, m, axis=2))
    assert unallocated_share("polca", exact) == pytest.approx(0.0, abs=1e-12)  # allocates it all
    assert unallocated_share("loss_change", traj) == 0.0
    assert np.isnan(unallocated_share("loss", traj)) and np.isnan(unallocated_share("fisher", traj))
    half = dataclasses.replace(traj, polca=exact.polca / 2)
    assert unallocated_share("polca", half) == pytest.approx(0.5)
    assert unallocated_share("polca_first_order", traj) == pytest.approx(
        np.abs(actual - traj.first_order.sum(2)).sum() / np.abs(actual).sum()
    )
