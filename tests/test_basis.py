"""The Hessian basis (`core.basis`) against dense Hessians and known spectra, in float64."""

import numpy as np
import pytest
import torch

from polca_study.core.basis import ProjectedHessian, build_basis, hessian_vector_product
from tests._toy import float64, mlp_problem  # noqa: F401  (float64: an autouse fixture)


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


def test_build_basis_refuses_bad_input_with_clear_errors():
    loss_fn, theta, _, _ = mlp_problem()
    with pytest.raises(ValueError, match="k must be"):
        build_basis(lambda t: loss_fn(t).sum(), [theta], k=0)
    with pytest.raises(ValueError, match="checkpoints"):
        build_basis(lambda t: loss_fn(t).sum(), [], k=1)
    with pytest.raises(ValueError, match=r"checkpoints\[1\]"):
        build_basis(lambda t: loss_fn(t).sum(), [theta, theta[:3]], k=1)


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
