"""Small problems the core's tests share, and the brute force they are checked against.

Every test of the core compares with brute force in float64: a test module turns the
`float64` fixture on for all its tests by importing it.
"""

import pytest
import torch
from torch import nn

from polca_study.core.module_loss import ModuleLoss
from polca_study.snapshots.model import ModelConfig, Transformer

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


# ---------------------------------------------------------------- a tiny transformer


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
