"""The reverse route's per-layer rules (`core.per_sample`): gathered coordinates against the
Jacobian, and modules without a rule refused, in float64."""

import pytest
import torch
from torch import nn

from polca_study.core.decompose import decompose_trajectory
from polca_study.core.directions import Coordinates, flatten_parameters
from polca_study.core.module_loss import ModuleLoss
from tests._toy import float64, tiny_transformer_loss  # noqa: F401  (float64: an autouse fixture)


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


@pytest.mark.parametrize("padding_idx", [None, 1])
@pytest.mark.parametrize("vocab", [4, 40])
def test_embedding_rule_dense_over_few_ids_and_gathered_over_many_match_the_jacobian(vocab, padding_idx):
    """An embedding's projections: dense per-sequence gradients over the ids used when
    they are few (4 ids, 3 positions), the basis rows gathered per position when they are
    many (up to 24 distinct ids > 2·3); both against brute force, ids repeated in a
    sequence, and a padding id (whose row autograd leaves without gradient) present."""
    torch.manual_seed(0)
    embed = nn.Embedding(vocab, 5, padding_idx=padding_idx).double().eval()
    head = nn.Linear(5, 1).double().eval()
    module = nn.Sequential(embed, head).eval()
    ids = torch.randint(0, vocab, (8, 3))
    ids[0, 1] = ids[0, 0]  # an id twice in one sequence: its row's gradient sums both uses
    ids[1, 2] = 1  # the padding id, when there is one
    loss_fn = ModuleLoss(module, ids, lambda out, b: out.squeeze(-1).tanh())
    theta = flatten_parameters(module)
    vectors, _ = torch.linalg.qr(torch.randn(theta.numel(), 6))
    _, derivs = loss_fn.directional(theta, vectors, route="reverse")
    jac = torch.autograd.functional.jacobian(loss_fn, theta)
    torch.testing.assert_close(derivs, jac @ vectors, rtol=1e-9, atol=1e-12)
    # LCA's coordinates: every embedding entry, gathered, are the Jacobian's columns
    coords = Coordinates(torch.arange(embed.weight.numel()), theta.numel(), theta.dtype)
    _, entries = loss_fn.directional(theta, coords, route="reverse")
    torch.testing.assert_close(entries, jac[:, : embed.weight.numel()], rtol=1e-9, atol=1e-12)
