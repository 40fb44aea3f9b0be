"""POLCA values (`core.decompose`) against brute-force autograd and closed forms, in float64."""

import pytest
import torch

from polca_study.core.decompose import decompose, decompose_trajectories, decompose_trajectory
from polca_study.core.directions import Coordinates, flatten_parameters
from tests._toy import (  # noqa: F401  (float64: an autouse fixture)
    MODES,
    brute_force,
    float64,
    mlp_problem,
    tiny_transformer_loss,
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("route", ["forward", "reverse"])
def test_decompose_matches_brute_force(mode, route):
    loss_fn, theta, theta_next, vectors = mlp_problem()
    got = decompose(loss_fn, theta, theta_next, vectors, mode, route=route)
    want = brute_force(loss_fn, theta, theta_next, vectors, mode)
    assert got.shape == (7, 5) and got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_trajectory_matches_stepwise_brute_force():
    loss_fn, theta, _, vectors = mlp_problem(seed=3)
    g = torch.Generator().manual_seed(1)
    checkpoints = [theta + 0.04 * i * torch.randn(theta.shape, generator=g) for i in range(4)]
    for mode in MODES:
        traj = decompose_trajectory(loss_fn, checkpoints, vectors, mode, progress=False)
        assert traj.polca.shape == (7, 3, 5)
        for t in range(3):
            want = brute_force(loss_fn, checkpoints[t], checkpoints[t + 1], vectors, mode)
            torch.testing.assert_close(traj.polca[:, t], want, rtol=1e-9, atol=1e-12)
        losses = torch.stack([loss_fn(c) for c in checkpoints], dim=1)
        torch.testing.assert_close(traj.losses, losses)


# ------------------------------------------------------------------- closed forms


def quadratic_problem(seed=0, n=6, d=8):
    """L(x;θ) = gₓᵀθ + ½ θᵀ Q diag(λₓ) Qᵀ θ: per-example Hessians sharing eigenvectors Q."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    lams = torch.rand(n, d, generator=g) * 3 + 0.1
    lin = torch.randn(n, d, generator=g)

    def loss_fn(theta):
        z = Q.T @ theta
        return lin @ theta + 0.5 * (lams * z**2).sum(-1)

    theta = torch.randn(d, generator=g)
    theta_next = theta + 0.3 * torch.randn(d, generator=g)
    return loss_fn, theta, theta_next, Q


@pytest.mark.parametrize("mode", ["exact", "paper", "path"])
def test_second_order_modes_sum_to_true_change_on_quadratic(mode):
    loss_fn, theta, theta_next, Q = quadratic_problem()
    polca = decompose(loss_fn, theta, theta_next, Q, mode)
    true_change = loss_fn(theta_next) - loss_fn(theta)
    torch.testing.assert_close(polca.sum(1), true_change, rtol=1e-10, atol=1e-10)


def test_first_order_misses_the_curvature_on_quadratic():
    loss_fn, theta, theta_next, Q = quadratic_problem()
    polca = decompose(loss_fn, theta, theta_next, Q, "none")
    true_change = loss_fn(theta_next) - loss_fn(theta)
    z = Q.T @ (theta_next - theta)
    lams = torch.func.jacfwd(torch.func.jacrev(lambda t: loss_fn(t)[0]))(theta)
    assert not torch.allclose(polca.sum(1), true_change)
    # the gap is exactly ½ΔθᵀHΔθ per example
    torch.testing.assert_close(true_change[0] - polca[0].sum(), 0.5 * (Q @ z) @ lams @ (Q @ z))


# --------------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    loss_fn, theta, theta_next, vectors = mlp_problem()
    with pytest.raises(ValueError, match="second_order"):
        decompose(loss_fn, theta, theta_next, vectors, "second")
    with pytest.raises(ValueError, match="theta_next"):
        decompose(loss_fn, theta, theta_next[:-1], vectors)
    with pytest.raises(ValueError, match="theta_next"):
        decompose(loss_fn, theta, theta_next.float(), vectors)
    with pytest.raises(ValueError, match="vectors.*height"):
        decompose(loss_fn, theta, theta_next, vectors[:-2])
    with pytest.raises(ValueError, match="route"):
        decompose(loss_fn, theta, theta_next, vectors, route="sideways")
    with pytest.raises(ValueError, match="non-finite"):
        decompose(lambda t: loss_fn(t) / 0.0 * 0.0, theta, theta_next, vectors)


# ----------------------------------------------------------------- trajectories


def test_trajectory_reads_checkpoints_one_at_a_time():
    """A lazy sequence is walked once, holding at most the current and the next vector."""
    loss_fn, theta, _, vectors = mlp_problem(seed=5)
    g = torch.Generator().manual_seed(3)
    stored = [theta + 0.05 * i * torch.randn(theta.shape, generator=g) for i in range(4)]
    reads = []

    class Lazy:
        def __len__(self):
            return len(stored)

        def __iter__(self):
            for i, t in enumerate(stored):
                reads.append(i)
                yield t.clone()

    lazy = decompose_trajectory(loss_fn, Lazy(), vectors, "path", progress=False)
    eager = decompose_trajectory(loss_fn, stored, vectors, "path", progress=False)
    assert reads == [0, 1, 2, 3]
    torch.testing.assert_close(lazy.polca, eager.polca)


def test_trajectory_exact_mode_also_gives_the_paper_approximation():
    """In exact mode the paper term uses λ(X,b) = Σₓ bᵀH(x)b; it must equal "paper" mode."""
    loss_fn, theta, _, vectors = mlp_problem(seed=4)
    g = torch.Generator().manual_seed(2)
    checkpoints = [theta + 0.05 * i * torch.randn(theta.shape, generator=g) for i in range(3)]
    exact = decompose_trajectory(loss_fn, checkpoints, vectors, "exact", progress=False)
    for t in range(2):
        paper = brute_force(loss_fn, checkpoints[t], checkpoints[t + 1], vectors, "paper")
        first = brute_force(loss_fn, checkpoints[t], checkpoints[t + 1], vectors, "none")
        torch.testing.assert_close(exact.first_order[:, t], first)
        torch.testing.assert_close(exact.paper_second[:, t], paper - first, rtol=1e-8, atol=1e-12)
        # the study's `paper` mode reads it off the exact decomposition
        torch.testing.assert_close(exact.as_paper().polca[:, t], paper, rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="only an exact decomposition"):
        decompose_trajectory(loss_fn, checkpoints, vectors, "path", progress=False).as_paper()
    # grads at each checkpoint are <b, ∇L(x;θ_t)>
    jac = torch.autograd.functional.jacobian(loss_fn, checkpoints[2])
    torch.testing.assert_close(exact.grads[:, 2], jac @ vectors)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_decompositions_in_one_pass_equal_each_computed_alone_bit_for_bit(dtype):
    """The comparison decomposes along the Hessian, random and shuffled bases in one walk
    (`decompose_trajectories`, sharing the reverse route's backward passes); each set's
    decomposition must be exactly the one it gets alone, or the cached results would
    depend on which job computed them. Brute force checks the shared pass's values."""
    model, loss_fn = tiny_transformer_loss(seed=4)
    model.to(dtype)
    theta = flatten_parameters(model)
    d = theta.numel()
    g = torch.Generator().manual_seed(2)
    dense_a, _ = torch.linalg.qr(torch.randn(d, 5, generator=g, dtype=dtype))
    dense_b, _ = torch.linalg.qr(torch.randn(d, 1, generator=g, dtype=dtype))  # "auto": forward
    coords = Coordinates(torch.argsort(-theta.abs())[:4], d, dtype)
    sets = [dense_a, dense_b, coords]
    checkpoints = [theta + 0.01 * i * torch.randn(d, generator=g, dtype=dtype) for i in range(3)]
    for mode, route in (("path", "auto"), ("path", "reverse"), ("none", "reverse"), ("exact", "auto")):
        together = decompose_trajectories(loss_fn, checkpoints, sets, mode, route=route, progress=False)
        for vectors, joint in zip(sets, together, strict=True):
            alone = decompose_trajectory(loss_fn, checkpoints, vectors, mode, route=route, progress=False)
            for name in ("polca", "first_order", "losses", "grads", "exact_second"):
                x, y = getattr(joint, name), getattr(alone, name)
                assert (x is None and y is None) or torch.equal(x, y), (mode, route, name)
    if dtype == torch.float64:
        jac = torch.autograd.functional.jacobian(loss_fn, checkpoints[1])  # (n, d), independent
        joint = decompose_trajectories(loss_fn, checkpoints, sets, "path", route="reverse", progress=False)
        torch.testing.assert_close(joint[0].grads[:, 1], jac @ dense_a, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(joint[2].grads[:, 1], jac[:, coords.indices], rtol=1e-9, atol=1e-12)


# ------------------------------------------------------------------ the public face


def test_the_public_face_re_exports_the_cores_objects():
    """`polca_study.polca` is the import the README shows; its names are the core's."""
    from polca_study import polca
    from polca_study.core import basis, directions, module_loss
    from polca_study.core import decompose as decompose_module

    assert polca.ModuleLoss is module_loss.ModuleLoss
    assert polca.causal_lm_loss is module_loss.causal_lm_loss
    assert polca.build_basis is basis.build_basis
    assert polca.decompose is decompose_module.decompose
    assert polca.flatten_parameters is directions.flatten_parameters
    assert {"ModuleLoss", "build_basis", "decompose", "flatten_parameters", "causal_lm_loss"} <= set(
        polca.__all__
    )
