"""Directional derivatives of per-example losses along a set of directions b.

For every example x and direction b (a column of the (d, m) matrix of directions):

- first order `<b, ∇L(x;θ)>`: by forward mode (one jvp per direction,
  `forward_directional`) or reverse mode (one vjp per example, `reverse_directional`;
  `ModuleLoss` has a batched per-sample route), whichever `first_order` is told or finds;
- second order `bᵀH(x;θ)b`: by a jvp of a jvp (`second_order_directional`), checked
  against double backward before a run trusts it (`check_second_order`);
- the aggregate curvature `λ(X, b) = bᵀH(X)b` of the summed loss, by double backward
  (`aggregate_curvature`), for the paper's second-order approximation.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from polca_study.core.basis import hessian_vector_product
from polca_study.core.checks import check_route
from polca_study.core.directions import LossFn, chunks, column, project


def forward_directional(
    loss_fn: LossFn, theta: Tensor, vectors: Tensor, chunk_size: int = 10
) -> tuple[Tensor, Tensor]:
    """`(L(x;θ), <b, ∇L(x;θ)>)` for all examples and columns b, by forward-mode AD.

    Returns losses (n,) and derivatives (n, m); one jvp per direction, vmapped in chunks.
    """
    theta = theta.detach()

    def along(v: Tensor):
        return torch.func.jvp(loss_fn, (theta,), (v,))

    losses, parts = None, []
    for chunk in chunks(vectors, chunk_size, theta.device):
        out, tangent = torch.func.vmap(along)(chunk)  # (c, n) each
        losses = out[0] if losses is None else losses
        parts.append(tangent.T)
    if losses is None:
        losses = loss_fn(theta).detach()
    derivs = torch.cat(parts, dim=1) if parts else losses.new_zeros(losses.shape[0], 0)
    return losses.detach(), derivs.detach()


def reverse_directional(
    loss_fn: LossFn, theta: Tensor, vectors: Tensor, chunk_size: int = 64
) -> tuple[Tensor, Tensor]:
    """The same by reverse mode for any loss function: one vjp per example (a row of the
    Jacobian), projected on all m vectors with one matmul. Only cheap for small n;
    `ModuleLoss` has a batched per-sample route for models."""
    theta = theta.detach()
    losses, vjp = torch.func.vjp(loss_fn, theta)
    n = losses.shape[0]
    eye = torch.eye(n, dtype=losses.dtype, device=losses.device)
    rows = [torch.func.vmap(vjp)(eye[i : i + chunk_size])[0] for i in range(0, n, chunk_size)]
    return losses.detach(), project(vectors, torch.cat(rows).T).T.detach()


class CompositeNorms(TorchFunctionMode):
    """Computes `F.layer_norm` by elementary ops while active. Nested forward-mode AD
    through the fused kernel returns wrong second derivatives with respect to its input
    without any error (15% off on a single call here, torch 2.13, float64); the
    elementary form is exact. Every other functional op we checked (rms_norm, group_norm,
    softmax, log_softmax, gelu, silu, tanh, scaled_dot_product_attention in float64,
    cross_entropy, normalize) agrees with double backward; `check_second_order` catches
    what this list misses."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            return _layer_norm(*args, **kwargs)
        return func(*args, **kwargs)


def _layer_norm(x: Tensor, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    centred = x - x.mean(dims, keepdim=True)
    y = centred / torch.sqrt(centred.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y + bias if bias is not None else y


class SecondOrderError(RuntimeError):
    pass


def check_second_order(
    loss_fn: LossFn, theta: Tensor, *, examples: int = 4, seed: int = 0, rtol: float | None = None
) -> float:
    """Check `second_order="exact"` on this loss before any work: bᵀH(x)b along a random
    unit direction b for the first `examples` examples by a jvp of a jvp (as the exact
    mode computes it) against double backward. Returns the largest relative error;
    raises `SecondOrderError` when it exceeds `rtol` (default: 1e-6 in float64, 1e-2 in
    float32), naming what to use instead."""
    rtol = rtol if rtol is not None else (1e-6 if theta.dtype == torch.float64 else 1e-2)
    g = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(theta.shape, generator=g, dtype=theta.dtype).to(theta.device)
    v = v / v.norm()
    _, _, nested = second_order_directional(loss_fn, theta, v[:, None])
    worst = 0.0
    for i in range(min(examples, nested.shape[0])):
        t = theta.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(loss_fn(t)[i], t, create_graph=True)
        (hv,) = torch.autograd.grad(grad @ v, t)
        truth = float(hv @ v)
        error = abs(float(nested[i, 0]) - truth) / max(abs(truth), 1e-12)
        worst = max(worst, error)
    if worst > rtol:
        # normalisation layers are where fused kernels have broken nested forward mode
        module = getattr(loss_fn, "module", None)
        suspects = sorted(
            {type(m).__name__ for m in module.modules() if "norm" in type(m).__name__.lower()}
            if module is not None
            else set()
        )
        where = f" (its normalisation modules: {', '.join(suspects)})" if suspects else ""
        raise SecondOrderError(
            f"polca.second_order=exact is wrong on this model{where}: along a random direction its "
            f"curvature differs from double backward by {worst:.1%} (tolerance {rtol:.0e}); a module "
            f"computes second derivatives incorrectly under nested forward-mode AD. Use "
            f"polca.second_order=path or paper (first-order passes only), or make the module elementary"
        )
    return worst


def second_order_directional(
    loss_fn: LossFn, theta: Tensor, vectors: Tensor, chunk_size: int = 1
) -> tuple[Tensor, Tensor, Tensor]:
    """`(L(x;θ), <b, ∇L(x;θ)>, bᵀH(x;θ)b)` for every example at once: a jvp of a jvp.

    Returns losses (n,), first derivatives (n, m) and curvatures (n, m). Directions go
    one at a time by default: vmapping nested jvps was slower on CPU (measured).
    """
    theta = theta.detach()

    def along(v: Tensor):
        def derivative(t: Tensor):
            out, tangent = torch.func.jvp(loss_fn, (t,), (v,))
            return tangent, out

        return torch.func.jvp(derivative, (theta,), (v,), has_aux=True)

    losses, firsts, seconds = None, [], []
    for chunk in chunks(vectors, chunk_size, theta.device):
        with CompositeNorms():
            first, second, out = torch.func.vmap(along)(chunk)
        losses = out[0] if losses is None else losses
        firsts.append(first.T)
        seconds.append(second.T)
    if losses is None:
        losses = loss_fn(theta).detach()
        empty = losses.new_zeros(losses.shape[0], 0)
        return losses, empty, empty
    return losses.detach(), torch.cat(firsts, 1).detach(), torch.cat(seconds, 1).detach()


def aggregate_curvature(loss_fn: LossFn, theta: Tensor, vectors: Tensor) -> Tensor:
    """`λ(X, b) = bᵀH(X)b` of the summed loss for every column b (m,), by double backward."""
    hvp = hessian_vector_product(lambda t: loss_fn(t).sum(), theta)
    columns = (column(vectors, j).to(theta.device) for j in range(vectors.shape[1]))
    return torch.stack([v @ hvp(v) for v in columns])


def first_order(
    loss_fn: LossFn, theta: Tensor, vectors: Tensor, route: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Losses (n,) and directional derivatives (n, m) by the chosen or cheapest route."""
    check_route(route)
    if hasattr(loss_fn, "directional"):
        return loss_fn.directional(theta, vectors, route=route)
    if route == "reverse":
        return reverse_directional(loss_fn, theta, vectors)
    return forward_directional(loss_fn, theta, vectors)
