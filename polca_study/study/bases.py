"""Basis kinds (`basis.kind`): the directions POLCA decomposes along.

A kind is a function `(stage context, basis steps) -> Basis` and an entry in `KINDS`;
the basis steps are the stored steps at multiples of `basis.interval`, in order. The
basis stage caches whatever a kind returns under the basis config. config.py reads the
kinds' names, so the Lanczos code (scipy) is imported when a kind runs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from polca_study.core.basis import Basis
    from polca_study.study.stages import StageContext


def hessian(ctx: StageContext, steps: np.ndarray) -> Basis:
    """The paper's Algorithm 1: the projected Hessian's top-k eigenvectors at each step."""
    return _lanczos(ctx, steps, order=None)


def shuffled(ctx: StageContext, steps: np.ndarray) -> Basis:
    """Algorithm 1 with the checkpoints visited in a seeded random order: the same
    Hessians, but each projected off the vectors of other checkpoints than its past."""
    return _lanczos(ctx, steps, order=np.random.default_rng(ctx.cfg.basis.seed).permutation(len(steps)))


def random(ctx: StageContext, steps: np.ndarray) -> Basis:
    """A random orthonormal basis of the same size (no Hessian-vector products)."""
    from polca_study.core.basis import Basis

    b = ctx.cfg.basis
    m = len(steps) * b.k
    g = torch.Generator().manual_seed(b.seed)
    vectors, _ = torch.linalg.qr(torch.randn(ctx.run.store.numel, m, generator=g))
    nan = torch.full((m,), float("nan"))
    return Basis(vectors, nan, nan, 0, torch.arange(len(steps)).repeat_interleave(b.k))


def _lanczos(ctx: StageContext, steps: np.ndarray, order: np.ndarray | None) -> Basis:
    from polca_study.core.basis import Basis, build_basis
    from polca_study.core.module_loss import ModuleLoss

    b, task = ctx.cfg.basis, ctx.task
    visited = steps if order is None else steps[order]
    thetas = ctx.run.store.sequence(visited, device=ctx.device)  # read lazily
    model = ctx.source.model(task).to(ctx.device)
    batch = {k: v.to(ctx.device) for k, v in task.hessian_split().batch().items()}
    n = len(next(iter(batch.values())))
    size = b.chunk_size or n
    chunks = [
        ModuleLoss(model, {k: v[i : i + size] for k, v in batch.items()}, task.token_loss)
        for i in range(0, n, size)
    ]
    basis = build_basis(
        [lambda th, loss=loss: loss(th).sum() for loss in chunks],
        thetas,
        b.k,
        tol=b.tol,
        maxiter=b.maxiter,
        seed=b.seed,
        progress=ctx.progress,
    )
    # each vector's checkpoint, as an index into `steps` (not the visiting order)
    index = basis.checkpoint_index if order is None else torch.as_tensor(order)[basis.checkpoint_index]
    return Basis(basis.vectors.cpu(), basis.eigenvalues.cpu(), basis.residuals.cpu(), basis.hvps, index)


KINDS: dict[str, Callable[[StageContext, np.ndarray], Basis]] = {
    "hessian": hessian,
    "random": random,
    "shuffled": shuffled,
}
