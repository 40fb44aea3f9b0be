"""The POLCA core against independent computations: brute-force autograd and closed forms."""

import numpy as np
import pytest
import torch
from torch import nn

from polca_study.model import ModelConfig, Transformer
from polca_study.polca import (
    Coordinates,
    ModuleLoss,
    ProjectedHessian,
    build_basis,
    decompose,
    decompose_trajectories,
    decompose_trajectory,
    flatten_parameters,
    hessian_vector_product,
)

MODES = ["none", "exact", "paper", "path"]


@pytest.fixture(autouse=True)
def float64():
    """Each test here compares with brute force in float64; the default dtype is set for
    the test alone and restored, so other modules run in torch's float32 default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --------------------------------------------------------------- a small nonlinear net


def mlp_problem(seed=0, n=7, d_in=3, hidden=4):
    """Per-example squared error of a tanh network, as a function of flat parameters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, generator=g)
    sizes = [hidden * d_in, hidden, hidden]

    def loss_fn(theta):
        w1, b1, w2 = theta.split(sizes)
        h = torch.tanh(x @ w1.view(hidden, d_in).T + b1)
        return (h @ w2 - y) ** 2 + 0.1 * torch.sin(h.sum(-1))

    d = sum(sizes)
    theta = torch.randn(d, generator=g) * 0.7
    theta_next = theta + 0.05 * torch.randn(d, generator=g)
    vectors, _ = torch.linalg.qr(torch.randn(d, 5, generator=g))
    return loss_fn, theta, theta_next, vectors


def brute_force(loss_fn, theta, theta_next, vectors, mode):
    """Per example, one at a time: autograd.grad, and bᵀHb by double backward."""
    n = loss_fn(theta).shape[0]
    step = vectors.T @ (theta_next - theta)
    grads, grads_next, curvs = [], [], []
    for i in range(n):
        t0 = theta.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(loss_fn(t0)[i], t0, create_graph=True)
        grads.append(g.detach())
        curvs.append(
            torch.stack(
                [
                    vectors[:, j] @ torch.autograd.grad(g @ vectors[:, j], t0, retain_graph=True)[0]
                    for j in range(vectors.shape[1])
                ]
            )
        )
        t1 = theta_next.clone().requires_grad_(True)
        grads_next.append(torch.autograd.grad(loss_fn(t1)[i], t1)[0])
    G, G1 = torch.stack(grads) @ vectors, torch.stack(grads_next) @ vectors
    curv = torch.stack(curvs)
    if mode == "none":
        return G * step
    if mode == "exact":
        return G * step + 0.5 * curv * step**2
    if mode == "path":
        return 0.5 * (G + G1) * step
    lam = curv.sum(0)
    change = G1 - G
    return G * step + 0.5 * lam * step**2 * change / change.sum(0)


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


def spectrum_problem(d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    eig = torch.tensor([9.0, 7.0, 5.0, 4.0, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, -1.0, -2.0])
    A = Q @ torch.diag(eig) @ Q.T
    return (lambda t: 0.5 * t @ A @ t), Q, eig


def test_hessian_vector_products_and_the_projected_operator_match_a_dense_hessian():
    """Against the dense Hessian of a nonlinear loss (torch.autograd.functional.hessian,
    float64), as curvlinops tests its operators: every column of the operator's matrix."""
    loss_fn, theta, _, _ = mlp_problem(seed=3)
    total = lambda t: loss_fn(t).sum()  # noqa: E731
    d = theta.numel()
    H = torch.autograd.functional.hessian(total, theta)
    hvp = hessian_vector_product(total, theta)
    identity = torch.eye(d)
    torch.testing.assert_close(torch.stack([hvp(e) for e in identity], 1), H, rtol=1e-10, atol=1e-12)

    B, _ = torch.linalg.qr(torch.randn(d, 3, generator=torch.Generator().manual_seed(1)))
    P = identity - B @ B.T
    operator = ProjectedHessian(total, theta, B)
    dense = operator.matmat(identity.numpy())  # the LinearOperator scipy's eigsh sees
    torch.testing.assert_close(torch.as_tensor(dense), P @ H @ P, rtol=1e-10, atol=1e-12)
    assert operator.products == d
    np.testing.assert_allclose(operator.T.matmat(identity.numpy()), dense, rtol=1e-12)
    # B's directions are in its null space
    torch.testing.assert_close(operator.apply(B[:, 0]), torch.zeros(d), rtol=0, atol=1e-12)


def test_build_basis_recovers_known_top_eigenvectors_in_order():
    loss_fn, Q, eig = spectrum_problem()
    theta = torch.zeros(12)
    basis = build_basis(loss_fn, [theta, theta + 1.0], k=2, tol=1e-12)
    vectors, values = basis
    assert vectors.shape == (12, 4)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(4), atol=1e-10, rtol=0)
    torch.testing.assert_close(values, eig[:4], rtol=1e-8, atol=1e-8)
    # each column is ± the true eigenvector, in order of the spectrum
    torch.testing.assert_close((vectors.T @ Q[:, :4]).abs(), torch.eye(4), atol=1e-7, rtol=0)
    assert (basis.residuals < 1e-6).all()
    assert basis.checkpoint_index.tolist() == [0, 0, 1, 1]


def test_build_basis_projects_off_earlier_vectors_at_new_checkpoints():
    """A θ-dependent Hessian: compare with a dense eigendecomposition of P H P."""
    g = torch.Generator().manual_seed(5)
    d = 10
    M = torch.randn(d, d, generator=g)
    A = M + M.T

    def loss_fn(t):
        return 0.5 * t @ A @ t + 0.25 * (t**4).sum()

    checkpoints = [torch.randn(d, generator=g) for _ in range(3)]
    vectors, values = build_basis(loss_fn, checkpoints, k=2, tol=1e-12)
    found = torch.empty(d, 0)
    for i, theta in enumerate(checkpoints):
        H = torch.autograd.functional.hessian(loss_fn, theta)
        P = torch.eye(d) - found @ found.T
        w, V = torch.linalg.eigh(P @ H @ P)
        top = V[:, torch.argsort(w, descending=True)[:2]]
        got = vectors[:, 2 * i : 2 * i + 2]
        torch.testing.assert_close((got.T @ top).abs(), torch.eye(2), atol=1e-6, rtol=0)
        torch.testing.assert_close(values[2 * i : 2 * i + 2], w.sort(descending=True).values[:2])
        found = torch.cat([found, got], 1)
    torch.testing.assert_close(vectors.T @ vectors, torch.eye(6), atol=1e-10, rtol=0)


def test_build_basis_keeps_float32():
    loss_fn, _, _ = spectrum_problem()
    f32 = lambda t: loss_fn(t.double()).float()  # noqa: E731
    vectors, values = build_basis(f32, [torch.zeros(12, dtype=torch.float32)], k=1)
    assert vectors.dtype == torch.float32 and values.dtype == torch.float32


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
    with pytest.raises(ValueError, match="k must be"):
        build_basis(lambda t: loss_fn(t).sum(), [theta], k=0)
    with pytest.raises(ValueError, match="checkpoints"):
        build_basis(lambda t: loss_fn(t).sum(), [], k=1)
    with pytest.raises(ValueError, match=r"checkpoints\[1\]"):
        build_basis(lambda t: loss_fn(t).sum(), [theta, theta[:3]], k=1)


# ------------------------------------------------------------------ module adapter


def tiny_transformer_loss(seed=0):
    torch.manual_seed(seed)
    model = Transformer(
        ModelConfig(n_layers=1, d_model=8, n_heads=2, d_mlp=12, n_ctx=6, d_vocab=5, init_std=0.5)
    ).double()
    model.eval()
    tokens = torch.randint(0, 5, (4, 6))

    def token_loss(logits, batch):  # loss at the last 3 positions: (S, 3)
        targets = batch["targets"]
        return nn.functional.cross_entropy(
            logits[:, -3:].reshape(-1, 5), targets.reshape(-1), reduction="none"
        ).view(-1, 3)

    batch = {"inputs": tokens, "targets": torch.randint(0, 5, (4, 3))}
    return model, ModuleLoss(model, batch, token_loss, chunk_sequences=3)


def test_module_loss_reverse_route_matches_forward_and_brute_force():
    model, loss_fn = tiny_transformer_loss()
    theta = flatten_parameters(model)
    g = torch.Generator().manual_seed(0)
    vectors, _ = torch.linalg.qr(torch.randn(theta.shape[0], 6, generator=g))
    assert loss_fn.unsupported_parameters() == []
    l_fwd, fwd = loss_fn.directional(theta, vectors, route="forward")
    l_rev, rev = loss_fn.directional(theta, vectors, route="reverse")
    assert fwd.shape == (12, 6)
    torch.testing.assert_close(rev, fwd, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(l_rev, l_fwd)
    assert rev.grad_fn is None and not rev.requires_grad  # holds no autograd graph
    jac = torch.autograd.functional.jacobian(loss_fn, theta)  # (n, d), independent
    torch.testing.assert_close(fwd, jac @ vectors, rtol=1e-9, atol=1e-12)


def test_coordinates_give_the_gradient_entries_on_every_route_without_a_dense_matrix():
    """LCA's directions: per-token gradient entries at chosen parameters, gathered, equal
    to the Jacobian's columns (brute force) on both routes and in a trajectory."""
    model, loss_fn = tiny_transformer_loss(seed=3)
    theta = flatten_parameters(model)
    sizes = [p.numel() for p in model.parameters()]
    # one entry in every parameter tensor (embeddings, linears, biases, LayerNorm), and the largest ones
    starts = torch.tensor([0] + sizes[:-1]).cumsum(0)
    indices = torch.unique(torch.cat([starts + torch.tensor(sizes) // 2, torch.argsort(-theta.abs())[:7]]))
    coords = Coordinates(indices, theta.numel(), theta.dtype)
    jac = torch.autograd.functional.jacobian(loss_fn, theta)  # (n, d), independent
    for route in ("forward", "reverse"):
        losses, derivs = loss_fn.directional(theta, coords, route=route)
        torch.testing.assert_close(derivs, jac[:, indices], rtol=1e-9, atol=1e-12)
    g = torch.Generator().manual_seed(1)
    checkpoints = [theta + 0.01 * i * torch.randn(theta.shape, generator=g) for i in range(3)]
    sparse = decompose_trajectory(loss_fn, checkpoints, coords, "none", route="reverse", progress=False)
    dense = decompose_trajectory(
        loss_fn, checkpoints, coords.dense(), "none", route="reverse", progress=False
    )
    torch.testing.assert_close(sparse.polca, dense.polca, rtol=1e-9, atol=1e-12)
    assert dense.polca.shape == (12, 2, len(indices))


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


def test_module_loss_exact_second_order_matches_double_backward():
    model, loss_fn = tiny_transformer_loss(seed=1)
    theta = flatten_parameters(model)
    g = torch.Generator().manual_seed(2)
    vectors, _ = torch.linalg.qr(torch.randn(theta.shape[0], 2, generator=g))
    theta_next = theta + 0.01 * torch.randn(theta.shape, generator=g)
    got = decompose(loss_fn, theta, theta_next, vectors, "exact")
    want = brute_force(loss_fn, theta, theta_next, vectors, "exact")
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


def test_reverse_route_refuses_modules_without_a_rule():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.inner = nn.Identity()  # not a leaf: no generic rule either

        def forward(self, x):
            return self.inner(x) * self.scale

    module = Scaled().eval()
    loss_fn = ModuleLoss(module, torch.randn(2, 3), lambda out, b: out)
    theta = flatten_parameters(module)
    assert loss_fn.choose_route(100) == "forward"
    with pytest.raises(ValueError, match="scale"):
        loss_fn.directional(theta, torch.eye(3), route="reverse")


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


def test_module_loss_refuses_a_module_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    with pytest.raises(ValueError, match="training mode.*call .eval"):
        ModuleLoss(model, torch.randn(2, 3), lambda out, b: out)


def test_chunked_hessian_vector_products_equal_the_whole_samples():
    """The Hessian of a sum, accumulated chunk by chunk (bounded memory), in float64."""
    loss_fn, theta, _, _ = mlp_problem(seed=4, n=9)
    whole = hessian_vector_product(lambda t: loss_fn(t).sum(), theta)
    chunks = [lambda t, i=i: loss_fn(t)[i : i + 4].sum() for i in range(0, 9, 4)]  # 4 + 4 + 1
    chunked = hessian_vector_product(chunks, theta)
    H = torch.autograd.functional.hessian(lambda t: loss_fn(t).sum(), theta)
    for seed in range(3):
        v = torch.randn(theta.numel(), generator=torch.Generator().manual_seed(seed))
        torch.testing.assert_close(chunked(v), whole(v), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(chunked(v), H @ v, rtol=1e-10, atol=1e-12)
    a = build_basis([lambda t: loss_fn(t).sum()], [theta], k=2, tol=1e-12)
    b = build_basis(chunks, [theta], k=2, tol=1e-12)
    torch.testing.assert_close(b.eigenvalues, a.eigenvalues, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close((b.vectors.T @ a.vectors).abs(), torch.eye(2), rtol=0, atol=1e-6)


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
