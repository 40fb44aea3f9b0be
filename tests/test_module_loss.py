"""A model as a loss function of θ (`core.module_loss`): its routes against brute force, in float64."""

import pytest
import torch
from torch import nn

from polca_study.core.decompose import decompose
from polca_study.core.directions import flatten_parameters
from polca_study.core.module_loss import ModuleLoss
from tests._toy import brute_force, float64, tiny_transformer_loss  # noqa: F401  (float64: autouse)


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


def test_module_loss_exact_second_order_matches_double_backward():
    model, loss_fn = tiny_transformer_loss(seed=1)
    theta = flatten_parameters(model)
    g = torch.Generator().manual_seed(2)
    vectors, _ = torch.linalg.qr(torch.randn(theta.shape[0], 2, generator=g))
    theta_next = theta + 0.01 * torch.randn(theta.shape, generator=g)
    got = decompose(loss_fn, theta, theta_next, vectors, "exact")
    want = brute_force(loss_fn, theta, theta_next, vectors, "exact")
    torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


def test_module_loss_refuses_a_module_in_training_mode():
    model = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1))
    with pytest.raises(ValueError, match="training mode.*call .eval"):
        ModuleLoss(model, torch.randn(2, 3), lambda out, b: out)


@pytest.mark.parametrize(("field", "value"), [("max_norm", 0.5), ("scale_grad_by_freq", True)])
def test_module_loss_refuses_an_embedding_that_is_not_a_lookup(field, value):
    """max_norm would renormalize rows of the flat parameter vector in place (shown here on
    the bare functional call); scale_grad_by_freq changes what backward returns."""
    embedding = nn.Embedding(5, 3, **{field: value})
    if field == "max_norm":
        theta = torch.randn(15) * 3
        before = theta.clone()
        torch.func.functional_call(embedding, {"weight": theta.view(5, 3)}, (torch.tensor([[0, 1]]),))
        assert not torch.equal(theta, before)
    model = nn.Sequential(embedding, nn.Linear(3, 5)).eval()
    with pytest.raises(ValueError, match=rf"embedding '0' with {field}={value}: allowed are max_norm=None"):
        ModuleLoss(model, torch.tensor([[0, 1]]), lambda out, b: out.sum(-1))
    setattr(embedding, field, None if field == "max_norm" else False)
    ModuleLoss(model, torch.tensor([[0, 1]]), lambda out, b: out.sum(-1))
