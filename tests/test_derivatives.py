"""Directional derivatives (`core.derivatives`) against the Jacobian and Hessians by
brute-force autograd, in float64."""

import torch
from torch.nn import functional as F

from polca_study.core.derivatives import (
    CompositeNorms,
    aggregate_curvature,
    check_second_order,
    first_order,
    forward_directional,
    reverse_directional,
    second_order_directional,
)
from polca_study.core.directions import Coordinates
from tests._toy import float64, mlp_problem  # noqa: F401  (float64: an autouse fixture)


def test_first_order_routes_give_the_jacobian_along_dense_and_coordinate_directions():
    loss_fn, theta, _, vectors = mlp_problem(seed=1)
    jac = torch.autograd.functional.jacobian(loss_fn, theta)  # (n, d), independent
    coords = Coordinates(torch.tensor([0, 5, 13, 19]), theta.numel(), theta.dtype)
    for directions, want in ((vectors, jac @ vectors), (coords, jac[:, coords.indices])):
        for losses, derivs in (
            forward_directional(loss_fn, theta, directions, chunk_size=3),
            reverse_directional(loss_fn, theta, directions, chunk_size=3),
            first_order(loss_fn, theta, directions, route="forward"),
            first_order(loss_fn, theta, directions, route="reverse"),
        ):
            torch.testing.assert_close(losses, loss_fn(theta))
            torch.testing.assert_close(derivs, want, rtol=1e-10, atol=1e-12)
            assert derivs.shape == (7, directions.shape[1]) and not derivs.requires_grad


def test_curvatures_by_a_jvp_of_a_jvp_match_double_backward():
    """bᵀH(x)b per example (nested forward mode) and λ(X,b) = bᵀH(X)b of the summed loss
    (double backward), against each example's dense Hessian."""
    loss_fn, theta, _, vectors = mlp_problem(seed=2)
    losses, firsts, curvatures = second_order_directional(loss_fn, theta, vectors)
    hessians = torch.stack(
        [torch.autograd.functional.hessian(lambda t, i=i: loss_fn(t)[i], theta) for i in range(7)]
    )
    want = torch.einsum("dm,nde,em->nm", vectors, hessians, vectors)
    torch.testing.assert_close(losses, loss_fn(theta))
    torch.testing.assert_close(firsts, torch.autograd.functional.jacobian(loss_fn, theta) @ vectors)
    torch.testing.assert_close(curvatures, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(
        aggregate_curvature(loss_fn, theta, vectors), want.sum(0), rtol=1e-10, atol=1e-12
    )
    assert check_second_order(loss_fn, theta) < 1e-8


def test_composite_layer_norm_equals_the_fused_kernel_and_has_exact_curvature():
    """`CompositeNorms` is what makes the exact mode right through layer_norm: the same
    values as the fused kernel, and bᵀHb by nested forward mode equal to double backward."""
    g = torch.Generator().manual_seed(0)
    weight, bias, c = torch.randn(6, generator=g), torch.randn(6, generator=g), torch.randn(3, 6, generator=g)
    x = torch.randn(18, generator=g)

    def loss_fn(t):  # three "examples" of a normalised row each
        return (torch.tanh(F.layer_norm(t.view(3, 6), (6,), weight, bias)) * c).sum(-1)

    with CompositeNorms():
        composite = loss_fn(x)
    torch.testing.assert_close(composite, loss_fn(x), rtol=1e-12, atol=1e-12)
    v = torch.randn(18, 2, generator=g)
    _, _, curvatures = second_order_directional(loss_fn, x, v)
    hessians = torch.stack(
        [torch.autograd.functional.hessian(lambda t, i=i: loss_fn(t)[i], x) for i in range(3)]
    )
    torch.testing.assert_close(
        curvatures, torch.einsum("dm,nde,em->nm", v, hessians, v), rtol=1e-9, atol=1e-12
    )
