"""POLCA: the Hessian basis and the per-example loss-change decomposition.

The functional core of polca-study. Everything here takes flat parameter vectors
(1-D tensors of length d) and plain loss functions, and knows nothing of Hydra,
W&B, files or any particular model. Outputs keep the dtype and device of inputs.

- `build_basis`: the paper's Algorithm 1 (top-k eigenvectors of the projected Hessian
  at each checkpoint, by Lanczos on Hessian-vector products).
- `decompose`: POLCA values of n examples along m basis vectors for one step.
- `decompose_trajectory`: the same over a sequence of checkpoints, reusing each step's
  directional derivatives for the next.
- `ModuleLoss`: an adapter from an `nn.Module`, a batch and a per-token loss to the
  per-example loss function the others take, with a fast reverse-mode route for the
  first-order term.
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor], Tensor]
SECOND_ORDER_MODES = ("none", "exact", "paper", "path")
ROUTES = ("auto", "forward", "reverse")
# Modes whose terms are first-order directional derivatives only: decompositions along
# several sets of directions share the reverse route's backward passes.
SHARED_PASS_MODES = ("none", "path")

# Relative costs in forward passes, used to choose a first-order route (measured on CPU:
# a jvp costs about 2.7 forward passes, a backward about 2).
_JVP_COST = 2.7
_BACKWARD_COST = 2.0


# ----------------------------------------------------------------------------- checks


def _check_vector(name: str, x: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(x, Tensor) or x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D parameter vector, got {_describe(x)}")
    if like is not None and (x.shape != like.shape or x.dtype != like.dtype):
        raise ValueError(
            f"{name} must match theta_t in shape and dtype: got {tuple(x.shape)} {x.dtype}, "
            f"expected {tuple(like.shape)} {like.dtype}"
        )


def _check_vectors(vectors: Tensor | Coordinates, theta: Tensor) -> None:
    if isinstance(vectors, Coordinates):
        if vectors.d != theta.shape[0] or vectors.dtype != theta.dtype:
            raise ValueError(
                f"coordinates for d={vectors.d} ({vectors.dtype}) do not fit parameters of "
                f"d={theta.shape[0]} ({theta.dtype})"
            )
        return
    if not isinstance(vectors, Tensor) or vectors.ndim != 2:
        raise ValueError(f"vectors must be a (d, m) matrix, got {_describe(vectors)}")
    if vectors.shape[0] != theta.shape[0]:
        raise ValueError(
            f"vectors must have one row per parameter: height {vectors.shape[0]}, "
            f"but the parameter vector has d={theta.shape[0]}"
        )
    if vectors.dtype != theta.dtype:
        raise ValueError(f"vectors has dtype {vectors.dtype}, parameters have {theta.dtype}")


def _check_mode(second_order: str) -> None:
    if second_order not in SECOND_ORDER_MODES:
        raise ValueError(f"second_order must be one of {SECOND_ORDER_MODES}, got {second_order!r}")


def _check_route(route: str) -> None:
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")


def _check_finite(name: str, losses: Tensor, where: str) -> None:
    if not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).sum())
        raise ValueError(f"{name} returned {bad} non-finite loss value(s) at {where}")


def _describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


# ------------------------------------------------------------------------------ basis


@dataclass(frozen=True)
class Coordinates:
    """The unit vectors e_j of the parameters at flat `indices`, used as the (d, m) matrix
    of directions without forming it: LCA's per-parameter directions at 40M parameters
    would take 8 GB as a dense matrix. Directional derivatives along them are gradient
    entries, gathered where a route can."""

    indices: Tensor  # (m,) long, positions in the flat parameter vector
    d: int
    dtype: torch.dtype = torch.float32

    @property
    def shape(self) -> tuple[int, int]:
        return (self.d, len(self.indices))

    @property
    def ndim(self) -> int:
        return 2

    def dense(self, start: int = 0, stop: int | None = None, device=None) -> Tensor:
        """Columns start:stop as a dense (d, c) matrix."""
        idx = self.indices[start:stop]
        out = torch.zeros(self.d, len(idx), dtype=self.dtype, device=device)
        out[idx.to(out.device), torch.arange(len(idx), device=out.device)] = 1
        return out


def project(vectors: Tensor | Coordinates, x: Tensor) -> Tensor:
    """`vectorsᵀ x` (m,)."""
    if isinstance(vectors, Coordinates):
        return x[vectors.indices.to(x.device)]
    return vectors.T @ x


def _column(vectors: Tensor | Coordinates, j: int) -> Tensor:
    return vectors.dense(j, j + 1).reshape(-1) if isinstance(vectors, Coordinates) else vectors[:, j]


@dataclass
class Basis:
    """Orthonormal Hessian basis. Unpacks as `(vectors, eigenvalues)`.

    vectors: (d, T·k), columns in the order found; eigenvalues: (T·k,) of `P H P`;
    residuals: (T·k,) `‖PHPv − λv‖ / |λ|`; hvps: Hessian-vector products the solver used.
    """

    vectors: Tensor
    eigenvalues: Tensor
    residuals: Tensor
    hvps: int = 0
    checkpoint_index: Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.long))

    def __iter__(self):
        return iter((self.vectors, self.eigenvalues))


def hessian_vector_product(loss_fn: LossFn | Sequence[LossFn], theta: Tensor) -> Callable[[Tensor], Tensor]:
    """Return `v -> H(θ) v` for a scalar `loss_fn`, reusing one gradient graph for all v.

    Given several scalar loss functions (the Hessian sample in chunks), H is the Hessian of
    their sum and each product is accumulated chunk by chunk, building and freeing one
    chunk's graph at a time: memory bounded by a chunk, at the cost of a forward and
    backward pass per chunk and product."""
    if callable(loss_fn):
        return _retained_hvp(loss_fn, theta)
    chunks = list(loss_fn)
    if len(chunks) == 1:
        return _retained_hvp(chunks[0], theta)

    def hvp(v: Tensor) -> Tensor:
        total = torch.zeros_like(v)
        for chunk in chunks:
            total += _retained_hvp(chunk, theta)(v)
        return total

    return hvp


def _retained_hvp(loss_fn: LossFn, theta: Tensor) -> Callable[[Tensor], Tensor]:
    theta = theta.detach().requires_grad_(True)
    loss = loss_fn(theta)
    if loss.ndim != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
    _check_finite("loss_fn", loss.reshape(1), "a basis checkpoint")
    (grad,) = torch.autograd.grad(loss, theta, create_graph=True)

    def hvp(v: Tensor) -> Tensor:
        if not grad.requires_grad:  # loss is linear in θ
            return torch.zeros_like(v)
        (hv,) = torch.autograd.grad(grad, theta, v, retain_graph=True)
        return hv.detach()

    return hvp


class ProjectedHessian(LinearOperator):
    """`P H(θ) P`, P = I − B Bᵀ with B (d, j) orthonormal: the operator Lanczos sees at a
    basis checkpoint, as a scipy `LinearOperator` on float64 vectors (H never formed:
    Hessian-vector products by double backward through one gradient graph). `apply` is
    the same on tensors; `products` counts the Hessian-vector products."""

    def __init__(self, loss_fn: LossFn | Sequence[LossFn], theta: Tensor, found: Tensor):
        d = theta.shape[0]
        super().__init__(dtype=np.float64, shape=(d, d))
        self.hvp = hessian_vector_product(loss_fn, theta)
        self.found = found
        self.products = 0
        self._dtype, self._device = theta.dtype, theta.device

    def project(self, x: Tensor) -> Tensor:
        return x - self.found @ (self.found.T @ x) if self.found.shape[1] else x

    def apply(self, v: Tensor) -> Tensor:
        self.products += 1
        return self.project(self.hvp(self.project(v)))

    def _matvec(self, x: np.ndarray) -> np.ndarray:
        v = torch.as_tensor(np.asarray(x).reshape(-1), dtype=self._dtype, device=self._device)
        return self.apply(v).double().cpu().numpy()

    def _adjoint(self) -> ProjectedHessian:
        return self  # symmetric


def build_basis(
    loss_fn: LossFn | Sequence[LossFn],
    checkpoints: Sequence[Tensor],
    k: int,
    *,
    tol: float = 1e-4,
    maxiter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
    progress: bool = False,
) -> Basis:
    """The paper's Algorithm 1: at each checkpoint θ_i, append the top-k eigenvectors of
    `P H(θ_i) P`, `P = I − B Bᵀ`, B the vectors found so far.

    `loss_fn(θ) -> scalar` is the aggregate loss over the Hessian sample, or a list of
    such functions over its chunks (H of their sum, each product accumulated over the
    chunks to bound memory; see `hessian_vector_product`). H is never formed: scipy's
    ARPACK Lanczos (`eigsh`, largest algebraic) runs on Hessian-vector products by double
    backward. `tol` is eigsh's relative eigenvalue accuracy; `ncv`
    its Lanczos basis size (default max(2k+4, 6): ARPACK's own 2k+1 restarts too often
    and needed 2.5x the products on our models).
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints must hold at least one parameter vector")
    first = checkpoints[0]  # checkpoints may be read lazily: each is checked as it comes
    _check_vector("checkpoints[0]", first)
    d = first.shape[0]
    if len(checkpoints) * k >= d:
        raise ValueError(
            f"k * len(checkpoints) = {len(checkpoints) * k} must be below the number of parameters d={d}"
        )
    dtype, device = first.dtype, first.device
    ncv = min(d - 1, ncv or max(2 * k + 4, 6))
    rng = np.random.default_rng(seed)
    found = torch.empty(d, 0, dtype=dtype, device=device)
    eigenvalues, residuals, origin = [], [], []
    hvps = 0

    for index, theta in enumerate(tqdm(checkpoints, desc="basis", disable=not progress)):
        _check_vector(f"checkpoints[{index}]", theta, like=first)
        operator = ProjectedHessian(loss_fn, theta, found)
        project = operator.project
        v0 = project(torch.as_tensor(rng.standard_normal(d), dtype=dtype, device=device))
        try:
            vals, vecs = eigsh(
                operator,
                k=k,
                which="LA",
                tol=tol,
                maxiter=maxiter,
                ncv=ncv,
                v0=v0.double().cpu().numpy(),
            )
        except ArpackNoConvergence as err:
            raise RuntimeError(
                f"Lanczos did not converge at checkpoint {index} ({len(err.eigenvalues)} of "
                f"{k} pairs): raise maxiter or tol"
            ) from err
        order = np.argsort(vals)[::-1]
        new = torch.as_tensor(vecs[:, order].copy(), dtype=dtype, device=device)
        # re-orthogonalise against B (twice is enough) so columns stay orthonormal in float32
        for _ in range(2):
            new = project(new)
            new, _ = torch.linalg.qr(new)
        new = new * torch.sign(new.sum(0, keepdim=True) + 1e-30)  # deterministic sign
        lam = torch.as_tensor(vals[order].copy(), dtype=dtype, device=device)
        hvps += operator.products  # Lanczos's products; the residual checks below are extra
        for j in range(k):
            v = new[:, j]
            hv = project(operator.hvp(project(v)))
            residuals.append(float(torch.linalg.norm(hv - lam[j] * v) / lam[j].abs().clamp_min(1e-30)))
        found = torch.cat([found, new], dim=1)
        eigenvalues.append(lam)
        origin += [index] * k

    return Basis(
        vectors=found,
        eigenvalues=torch.cat(eigenvalues),
        residuals=torch.tensor(residuals, dtype=dtype, device=device),
        hvps=hvps,
        checkpoint_index=torch.tensor(origin, dtype=torch.long),
    )


# ------------------------------------------------------------- directional derivatives


def _chunks(vectors: Tensor | Coordinates, size: int, device=None):
    for start in range(0, vectors.shape[1], size):
        if isinstance(vectors, Coordinates):
            yield vectors.dense(start, start + size, device).T.contiguous()
        else:
            yield vectors[:, start : start + size].T.contiguous()  # (c, d)


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
    for chunk in _chunks(vectors, chunk_size, theta.device):
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
    for chunk in _chunks(vectors, chunk_size, theta.device):
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
    columns = (_column(vectors, j).to(theta.device) for j in range(vectors.shape[1]))
    return torch.stack([v @ hvp(v) for v in columns])


def first_order(
    loss_fn: LossFn, theta: Tensor, vectors: Tensor, route: str = "auto"
) -> tuple[Tensor, Tensor]:
    """Losses (n,) and directional derivatives (n, m) by the chosen or cheapest route."""
    _check_route(route)
    if hasattr(loss_fn, "directional"):
        return loss_fn.directional(theta, vectors, route=route)
    if route == "reverse":
        return reverse_directional(loss_fn, theta, vectors)
    return forward_directional(loss_fn, theta, vectors)


# ------------------------------------------------------------------------- decompose


@dataclass
class StepTerms:
    """Directional quantities at one parameter vector, reusable across steps."""

    losses: Tensor  # (n,)
    grads: Tensor  # (n, m)  <b, ∇L(x;θ)>
    curvatures: Tensor | None = None  # (n, m)  bᵀH(x;θ)b


def _terms(
    loss_fn: LossFn, theta: Tensor, sets: Sequence[Tensor | Coordinates], exact: bool, route: str
) -> list[StepTerms]:
    """Each set's terms at θ. First-order terms of a model come from one pass for all sets
    (`ModuleLoss.directional_sets`); exact curvatures are computed set by set."""
    if exact:
        terms = [StepTerms(*second_order_directional(loss_fn, theta, v)) for v in sets]
    elif hasattr(loss_fn, "directional_sets"):
        terms = [StepTerms(*pair) for pair in loss_fn.directional_sets(theta, sets, route=route)]
    else:
        terms = [StepTerms(*first_order(loss_fn, theta, v, route)) for v in sets]
    for t in terms:
        _check_finite("per_example_loss_fn", t.losses, "a checkpoint")
    return terms


def _combine(
    mode: str, now: StepTerms, nxt: StepTerms | None, step: Tensor, aggregate: Tensor | None
) -> Tensor:
    """POLCA values (n, m) from the directional terms at θ_t (and θ_{t+1})."""
    first = now.grads * step
    if mode == "none":
        return first
    if mode == "exact":
        return first + _exact_second(now, step)
    if mode == "path":
        return 0.5 * (now.grads + nxt.grads) * step
    return first + _paper_second(now, nxt, step, aggregate)


def decompose(
    per_example_loss_fn: LossFn,
    theta_t: Tensor,
    theta_next: Tensor,
    vectors: Tensor,
    second_order: str = "exact",
    *,
    route: str = "auto",
) -> Tensor:
    """POLCA values (n, m) of n examples along the m columns of `vectors` for θ_t → θ_next.

    With Δθ = θ_next − θ_t and g(x) = ∇L(x; θ_t):
    - "none":  <b, g(x)> <b, Δθ>
    - "exact": <b, g(x)> <b, Δθ> + ½ bᵀH_t(x)b <b, Δθ>²   (nested forward-mode AD)
    - "paper": <b, g(x)> <b, Δθ> + ½ λ_t(X,b) <b,Δθ>² <g_{t+1}(x) − g_t(x), b> / <g_{t+1}(X) − g_t(X), b>
    - "path":  ½ (<b, g(x)> + <b, ∇L(x; θ_next)>) <b, Δθ>   (trapezoid rule along the step)
    `route` picks how first-order terms are computed: "forward", "reverse" or "auto".
    The one-step case of `decompose_trajectory` (one implementation of the modes).
    """
    _check_vector("theta_t", theta_t)
    _check_vector("theta_next", theta_next, like=theta_t)
    trajectory = decompose_trajectory(
        per_example_loss_fn, [theta_t, theta_next], vectors, second_order, route=route, progress=False
    )
    return trajectory.polca[:, 0]


@dataclass
class Decomposition:
    """POLCA over a run of T steps between T+1 checkpoints, per evaluation example.

    polca: (n, T, m) in the requested mode; first_order: (n, T, m) its first-order part;
    losses: (n, T+1) and grads: (n, T+1, m) `<b, ∇L(x;θ_t)>` at every checkpoint.
    In "exact" mode also exact_second and paper_second (n, T, m): the exact second-order
    term and the paper's approximation of it (λ(X,b) = Σ_x bᵀH(x)b, free from the exact
    per-token curvatures), so the approximation's error can be measured. The study's
    decompose stage stores it as numpy arrays with the checkpoints' `steps` (T+1,) and,
    along LCA's coordinates, the flat indices of its `parameters` (the columns).
    """

    polca: Tensor | np.ndarray
    first_order: Tensor | np.ndarray
    losses: Tensor | np.ndarray
    grads: Tensor | np.ndarray
    exact_second: Tensor | np.ndarray | None = None
    paper_second: Tensor | np.ndarray | None = None
    steps: np.ndarray | None = None
    parameters: np.ndarray | None = None

    def numpy(self, steps: np.ndarray, parameters: np.ndarray | None = None) -> Decomposition:
        """The same on the CPU as numpy arrays, with the checkpoints' steps."""
        arrays = {
            k: (v.cpu().numpy() if isinstance(v, Tensor) else v)
            for k, v in vars(self).items()
            if k not in ("steps", "parameters")
        }
        return Decomposition(**arrays, steps=np.asarray(steps), parameters=parameters)

    def as_paper(self) -> Decomposition:
        """An exact decomposition as the paper's mode: POLCA = first order + the paper's
        second-order approximation, which the exact mode computes beside its own term
        (λ(X,b) as the sum of the per-token curvatures instead of a Hessian-vector
        product of the summed loss: the same number, one decomposition for both modes)."""
        if self.paper_second is None:
            raise ValueError("only an exact decomposition holds the paper's second-order term")
        return replace(self, polca=self.first_order + self.paper_second)


def _exact_second(now: StepTerms, step: Tensor) -> Tensor:
    """½ bᵀH_t(x)b <Δθ,b>² (n, m)."""
    return 0.5 * now.curvatures * step**2


def _paper_second(now: StepTerms, nxt: StepTerms, step: Tensor, aggregate: Tensor) -> Tensor:
    """h̃ = ½ λ(X,b) <Δθ,b>² <g_{t+1}(x) − g_t(x), b> / <g_{t+1}(X) − g_t(X), b> (n, m)."""
    change = nxt.grads - now.grads
    total = change.sum(0)
    safe = torch.where(total.abs() > 0, total, torch.ones_like(total))
    share = torch.where(total.abs() > 0, change / safe, torch.zeros_like(change))
    return 0.5 * aggregate * step**2 * share


def decompose_trajectory(
    per_example_loss_fn: LossFn,
    checkpoints: Sequence[Tensor],
    vectors: Tensor | Coordinates,
    second_order: str = "exact",
    *,
    route: str = "auto",
    progress: bool = True,
) -> Decomposition:
    """Decompose every step between consecutive `checkpoints` (T+1 vectors, T steps).

    Directional derivatives at θ_{t+1} are computed once and reused as θ_t's for the
    next step, so "path" and "paper" cost no more passes than first order. Checkpoints
    are taken one at a time and at most two are held: a lazy sequence (a snapshot
    store's) is read from disk as the walk goes.
    """
    return decompose_trajectories(
        per_example_loss_fn, checkpoints, [vectors], second_order, route=route, progress=progress
    )[0]


def decompose_trajectories(
    per_example_loss_fn: LossFn,
    checkpoints: Sequence[Tensor],
    sets: Sequence[Tensor | Coordinates],
    second_order: str = "exact",
    *,
    route: str = "auto",
    progress: bool = True,
) -> list[Decomposition]:
    """`decompose_trajectory` along several sets of directions in one walk over the
    checkpoints. Each set's decomposition is the one it gets alone, bit for bit; in the
    first-order-only modes ("none", "path") the reverse route's per-position backward
    passes are shared by all sets (random and shuffled bases beside the Hessian basis
    cost their projections, not another pass)."""
    _check_mode(second_order)
    _check_route(route)
    if len(checkpoints) < 2:
        raise ValueError("checkpoints must hold at least two parameter vectors (one step)")
    exact = second_order == "exact"
    walk = iter(checkpoints)
    theta = next(walk)
    _check_vector("checkpoints[0]", theta)
    for vectors in sets:
        _check_vectors(vectors, theta)
    now = _terms(per_example_loss_fn, theta, sets, exact, route)
    walks = [_Walk(terms) for terms in now]
    bar = tqdm(total=len(checkpoints) - 1, desc="decompose", disable=not progress)
    for t, theta_next in enumerate(walk):
        _check_vector(f"checkpoints[{t + 1}]", theta_next, like=theta)
        nxt = _terms(per_example_loss_fn, theta_next, sets, exact, route)
        delta = theta_next - theta
        for vectors, w, a, b in zip(sets, walks, now, nxt, strict=True):
            aggregate = None
            if second_order == "paper":  # λ_t(X, b) of the summed loss, by double backward
                aggregate = aggregate_curvature(per_example_loss_fn, theta, vectors)
            w.step(second_order, a, b, project(vectors, delta), aggregate)
        theta, now = theta_next, nxt
        bar.update()
    bar.close()
    return [w.result() for w in walks]


class _Walk:
    """One set's terms collected along the checkpoints."""

    def __init__(self, start: StepTerms):
        self.losses, self.grads = [start.losses], [start.grads]
        self.polca, self.first, self.exact_second, self.paper_second = [], [], [], []

    def step(self, mode: str, now: StepTerms, nxt: StepTerms, step: Tensor, aggregate: Tensor | None) -> None:
        self.first.append(now.grads * step)
        self.polca.append(_combine(mode, now, nxt, step, aggregate))
        if mode == "exact":  # the paper's approximation beside it, from the exact curvatures' sum
            self.exact_second.append(_exact_second(now, step))
            self.paper_second.append(_paper_second(now, nxt, step, now.curvatures.sum(0)))
        self.losses.append(nxt.losses)
        self.grads.append(nxt.grads)

    def result(self) -> Decomposition:
        stack = lambda xs: torch.stack(xs, dim=1) if xs else None  # noqa: E731
        return Decomposition(
            polca=stack(self.polca),
            first_order=stack(self.first),
            losses=torch.stack(self.losses, dim=1),
            grads=torch.stack(self.grads, dim=1),
            exact_second=stack(self.exact_second),
            paper_second=stack(self.paper_second),
        )


# --------------------------------------------------------------------- module adapter


def flatten_parameters(module: nn.Module) -> Tensor:
    """All trainable parameters of `module` as one detached 1-D vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])


def causal_lm_loss(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> ModuleLoss:
    """θ (d,) → (n,): the next-token losses of a causal language model at positions
    1..T−1 of every sequence of `input_ids` (S, T), flattened row-major (n = S·(T−1)),
    with θ in the order of `flatten_parameters(model)`. `model(input_ids=...)` must
    return logits (S, T, V) or an object with `.logits` (Hugging Face models; load them
    with `attn_implementation="eager"`). Padding (attention_mask 0) gets loss 0.

    A `ModuleLoss`: both first-order routes and every second-order mode take it."""
    batch = {"input_ids": input_ids}
    if attention_mask is not None:
        batch["attention_mask"] = attention_mask

    def forward(module, b):
        out = module(**b)
        return out.logits if hasattr(out, "logits") else out

    return ModuleLoss(model, batch, next_token_loss, forward=forward)


def next_token_loss(logits: Tensor, batch: dict) -> Tensor:
    """Cross-entropy of each next token (S, T−1); masked positions give 0."""
    ids = batch["input_ids"]
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    if "attention_mask" in batch:
        losses = losses * batch["attention_mask"][:, 1:].to(losses.dtype)
    return losses


class ModuleLoss:
    """Per-example losses of `module` on a fixed batch, as a function of flat parameters.

    `token_loss(output, batch) -> (S, P)` gives, for S independent sequences, the loss at
    each of P positions; examples are ordered (s, p) row-major, n = S·P. Calling the
    object maps θ (d,) to losses (n,) through `torch.func.functional_call`.

    The reverse route (`directional(..., route="reverse")`) runs one batched backward per
    position and forms each sequence's gradient from captured activations and output
    gradients, projected on all m vectors at once. It needs every parameter to belong to
    an `nn.Linear`, an `nn.Embedding`, a `transformers` `Conv1D` (GPT-2), a leaf module
    of one input (LayerNorm, RMSNorm: by a vmapped vector-Jacobian product of the module
    alone) or a module that defines `project_per_sample_grads(inputs, output_grad, basis)
    -> (S, m)`; sequences must not interact (no batch norm). A tied parameter (GPT-2's
    output layer and input embedding) is one parameter, its gradient summed over its uses.

    The module must be in eval mode: dropout would make the losses random.
    """

    def __init__(
        self,
        module: nn.Module,
        batch: dict[str, Tensor] | Tensor,
        token_loss: Callable[[Tensor, object], Tensor],
        forward: Callable[[nn.Module, object], Tensor] | None = None,
        chunk_sequences: int = 512,
    ):
        if module.training:
            raise ValueError(
                f"ModuleLoss got a {type(module).__name__} in training mode: dropout or batch "
                "statistics would make its losses random; call .eval() on it first"
            )
        self.module = module
        self.batch = batch
        self.token_loss = token_loss
        self.forward = forward or (lambda m, b: m(b["inputs"] if isinstance(b, dict) else b))
        self.chunk_sequences = chunk_sequences
        self.names, self.shapes = [], []
        for name, p in module.named_parameters():
            if p.requires_grad:
                self.names.append(name)
                self.shapes.append(p.shape)
        self.sizes = [math.prod(s) for s in self.shapes]
        self._positions: tuple[int, int] | None = None
        self._route_cache: dict[int, str] = {}

    def unflatten(self, theta: Tensor) -> dict[str, Tensor]:
        parts = theta.split(self.sizes)
        return {n: p.view(s) for n, p, s in zip(self.names, parts, self.shapes, strict=True)}

    def positions(self) -> tuple[int, int]:
        """(S sequences, P loss positions per sequence), from one forward pass, once."""
        if self._positions is None:
            with torch.no_grad():
                shape = self.token_loss(self.forward(self.module, self.batch), self.batch).shape
            self._positions = (shape[0], shape[1])
        return self._positions

    def __call__(self, theta: Tensor) -> Tensor:
        output = self.forward(_Bound(self.module, self.unflatten(theta)), self.batch)
        return self.token_loss(output, self.batch).reshape(-1)

    # -------------------------------------------------------------- route selection

    def choose_route(self, m: int) -> str:
        """Cheapest first-order route by a cost model in forward passes:
        forward ≈ 2.7·m; reverse ≈ 1 + P·(2 + m/(2T)) (a backward per position plus the
        projection, which costs about m/(2T) forward passes of T tokens)."""
        if m in self._route_cache:
            return self._route_cache[m]
        self._route_cache[m] = self._cheaper_route(m)
        return self._route_cache[m]

    def _cheaper_route(self, m: int) -> str:
        missing = self.unsupported_parameters()
        if missing:
            log.info(
                "first-order route: forward (no per-sample gradient rule for %d parameters, e.g. %s)",
                len(missing),
                missing[:3],
            )
            return "forward"
        S, P = self.positions()
        if isinstance(self.batch, dict):  # our tasks' "inputs", a causal LM's "input_ids"
            inputs = self.batch.get("inputs", self.batch.get("input_ids", next(iter(self.batch.values()))))
        else:
            inputs = self.batch
        T = inputs.shape[1] if inputs.ndim > 1 else 1
        reverse = 1 + P * (_BACKWARD_COST + m / (2 * T))
        route = "reverse" if reverse < _JVP_COST * m else "forward"
        log.info(
            "first-order route: %s (cost model for %d directions: reverse %.0f, forward %.0f forward passes)",
            route,
            m,
            reverse,
            _JVP_COST * m,
        )
        return route

    def _canonical(self) -> dict[int, str]:
        """Each parameter's name in flattening order, by identity: a tied parameter (GPT-2's
        output layer shares the input embedding) is one entry, used by two modules."""
        return {id(p): n for n, p in self.module.named_parameters() if p.requires_grad}

    def unsupported_parameters(self) -> list[str]:
        canonical = self._canonical()
        covered = {
            canonical[id(p)]
            for mod in self.module.modules()
            if _has_rule(mod)
            for p in mod.parameters(recurse=False)
            if id(p) in canonical
        }
        return [n for n in self.names if n not in covered]

    def directional(self, theta: Tensor, vectors: Tensor, route: str = "auto"):
        return self.directional_sets(theta, [vectors], route)[0]

    def directional_sets(
        self, theta: Tensor, sets: Sequence[Tensor | Coordinates], route: str = "auto"
    ) -> list[tuple[Tensor, Tensor]]:
        """(losses, derivatives) along each set of directions. Each set takes the route it
        would take alone and gets the same numbers bit for bit; the sets on the reverse
        route share its per-position backward passes and each layer's per-sequence
        gradients, and differ only in their projections (on the CPU preset, three bases
        in one pass take 1/1.5 of the time they take one after another)."""
        _check_route(route)
        routes = [self.choose_route(v.shape[1]) if route == "auto" else route for v in sets]
        out: list[tuple[Tensor, Tensor] | None] = [
            forward_directional(self, theta, v) if r == "forward" else None
            for v, r in zip(sets, routes, strict=True)
        ]
        reverse = [i for i, r in enumerate(routes) if r == "reverse"]
        if not reverse:
            return out
        missing = self.unsupported_parameters()
        if missing:
            raise ValueError(
                f"route='reverse' needs per-sample gradients for every parameter; no rule for "
                f"{missing[:5]}: use route='forward'"
            )
        S = self.positions()[0]
        parts = [
            self._reverse(
                theta.detach(), [sets[i] for i in reverse], _slice(self.batch, s, self.chunk_sequences)
            )
            for s in range(0, S, self.chunk_sequences)
        ]
        losses = torch.cat([p[0] for p in parts])
        for j, i in enumerate(reverse):
            out[i] = (losses, torch.cat([p[1][j] for p in parts]))
        return out

    def _per_parameter(
        self, vectors: Tensor | Coordinates, device
    ) -> dict[str, tuple[Tensor, Tensor | None]]:
        """Each parameter's part of the directions: (its (*shape, m) slice, None) for a
        dense matrix; (its local flat indices, their columns) for coordinates."""
        if not isinstance(vectors, Coordinates):
            return {
                n: (b.reshape(*s, -1), None)
                for n, b, s in zip(self.names, vectors.split(self.sizes), self.shapes, strict=True)
            }
        out, offset = {}, 0
        indices = vectors.indices.to(device)
        for n, size in zip(self.names, self.sizes, strict=True):
            mine = (indices >= offset) & (indices < offset + size)
            out[n] = (indices[mine] - offset, torch.nonzero(mine).reshape(-1))
            offset += size
        return out

    def _reverse(
        self, theta: Tensor, sets: Sequence[Tensor | Coordinates], batch
    ) -> tuple[Tensor, list[Tensor]]:
        bases = [self._per_parameter(vectors, theta.device) for vectors in sets]
        params = {n: p.requires_grad_(True) for n, p in self.unflatten(theta.clone()).items()}
        records: list[tuple[nn.Module, str, tuple, Tensor]] = []
        prefix = {mod: name for name, mod in self.module.named_modules()}

        S = _sequences(batch)

        def hook(mod, inputs, output):
            if output.shape[0] == 1 and S > 1:
                # shared by every sequence (GPT-2's position embedding of positions (1, T)):
                # one copy per sequence, so each copy's gradient is that sequence's own
                output = output.expand(S, *output.shape[1:])
                inputs = tuple(
                    x.expand(S, *x.shape[1:]) if isinstance(x, Tensor) and x.shape[:1] == (1,) else x
                    for x in inputs
                )
            records.append((mod, prefix[mod], inputs, output))
            return output

        canonical = self._canonical()
        # each hooked module's parameters: local name -> flattening-order name
        owned = {
            mod: {n: canonical[id(p)] for n, p in mod.named_parameters(recurse=False) if id(p) in canonical}
            for mod in self.module.modules()
            if _has_rule(mod)
        }
        handles = [mod.register_forward_hook(hook) for mod, names in owned.items() if names]
        try:
            output = self.forward(_Bound(self.module, params), batch)
        finally:
            for h in handles:
                h.remove()
        token_losses = self.token_loss(output, batch)  # (S, P)
        S, P = token_losses.shape
        derivs = [torch.zeros(S, P, v.shape[1], dtype=v.dtype, device=theta.device) for v in sets]
        outs = [r[3] for r in records]
        for p in range(P):
            grads = torch.autograd.grad(
                token_losses[:, p].sum(), outs, retain_graph=p < P - 1, allow_unused=True
            )
            with torch.no_grad():  # the projections must not hold on to the graph
                for (mod, _, inputs, _), g in zip(records, grads, strict=True):
                    if g is None:
                        continue
                    names = owned[mod]
                    project = _projector(mod, {n: params[full].detach() for n, full in names.items()})
                    gradients = None  # the layer's per-sequence gradients, shared by the bases
                    for vectors, basis, d in zip(sets, bases, derivs, strict=True):
                        local = {n: basis[full] for n, full in names.items()}
                        if isinstance(vectors, Coordinates):
                            _add_coordinates(d[:, p], mod, inputs, g, local, vectors.dtype, project)
                        else:
                            if gradients is None:
                                gradients = project.gradients(inputs, g)
                            d[:, p] += project.along(gradients, {n: b for n, (b, _) in local.items()})
        records.clear()
        return token_losses.detach().reshape(-1), [d.reshape(S * P, -1) for d in derivs]


def _sequences(batch) -> int:
    """The number of sequences in a batch (a tensor or a dict of tensors)."""
    first = next(iter(batch.values())) if isinstance(batch, dict) else batch
    return first.shape[0]


def _slice(batch, start: int, size: int):
    """Sequences start:start+size of a batch (a tensor or a dict of tensors)."""
    if isinstance(batch, dict):
        return {k: v[start : start + size] for k, v in batch.items()}
    return batch[start : start + size]


class _Bound(nn.Module):
    """Calls `module` with `params` substituted (functional_call), hooks intact."""

    def __init__(self, module: nn.Module, params: dict[str, Tensor]):
        super().__init__()
        object.__setattr__(self, "_wrapped", module)
        object.__setattr__(self, "_params", params)

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self._wrapped, self._params, args, kwargs, strict=False)

    def __getattr__(self, name):
        return getattr(object.__getattribute__(self, "_wrapped"), name)


# ------------------------------------------------------------ per-sample projections


@dataclass(frozen=True)
class _Projection:
    """A layer's per-sequence parameter gradients `gradients(inputs, output_grad)`,
    projected on a basis by `along(gradients, basis) -> (S, m)`: the gradients are
    computed once per backward pass however many bases they are projected on."""

    gradients: Callable[[tuple, Tensor], Any]
    along: Callable[[Any, dict[str, Tensor]], Tensor]

    def __call__(self, inputs: tuple, output_grad: Tensor, basis: dict[str, Tensor]) -> Tensor:
        return self.along(self.gradients(inputs, output_grad), basis)


def _linear_gradients(inputs: tuple, output_grad: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sequence weight gradients Σ_t δ_t a_tᵀ (flattened) and the output gradients."""
    a = inputs[0]
    S = a.shape[0]
    a = a.reshape(S, -1, a.shape[-1])
    delta = output_grad.reshape(S, -1, output_grad.shape[-1])
    return torch.einsum("sto,sti->soi", delta, a).reshape(S, -1), delta


def _linear_along(gradients: tuple[Tensor, Tensor], basis: dict[str, Tensor]) -> Tensor:
    """<B, Σ_t δ_t a_tᵀ> per sequence: one matmul with the per-sample weight gradients."""
    grad_w, delta = gradients
    out = grad_w @ basis["weight"].reshape(-1, basis["weight"].shape[-1])
    if "bias" in basis:
        out = out + delta.sum(1) @ basis["bias"]
    return out


def _conv1d_along(gradients: tuple[Tensor, Tensor], basis: dict[str, Tensor]) -> Tensor:
    """transformers' Conv1D (GPT-2): y = x W + b with W (in, out), a transposed Linear:
    the Linear rule with the weight's basis transposed to (out, in, m)."""
    return _linear_along(gradients, {**basis, "weight": basis["weight"].transpose(0, 1)})


def _as_given(inputs: tuple, output_grad: Tensor) -> tuple[tuple, Tensor]:
    return inputs, output_grad


def _projecting(project: Callable) -> _Projection:
    """A projection `(inputs, output_grad, basis) -> (S, m)` with nothing to share."""
    return _Projection(_as_given, lambda given, basis: project(*given, basis))


_LINEAR = _Projection(_linear_gradients, _linear_along)
_CONV1D = _Projection(_linear_gradients, _conv1d_along)


def _embedding_projection(inputs: tuple, output_grad: Tensor, basis: dict[str, Tensor]) -> Tensor:
    """<B, Σ_t e_{id_t} δ_tᵀ> per sequence: gather the basis rows of the ids used."""
    ids = inputs[0]
    S = ids.shape[0]
    ids = ids.reshape(S, -1)
    delta = output_grad.reshape(S, ids.shape[1], -1)
    rows = basis["weight"][ids]  # (S, T, D, m)
    return torch.einsum("std,stdm->sm", delta, rows)


def _add_coordinates(
    out: Tensor, mod: nn.Module, inputs: tuple, g: Tensor, local: dict, dtype, project: Callable
) -> None:
    """Add per-sequence gradient entries at coordinates to `out` (S, m): gathered from
    activations and output gradients for linear and embedding layers, by the module's
    own projection on its (small) dense slice otherwise."""
    S = g.shape[0]
    if isinstance(mod, nn.Linear):
        a = inputs[0].reshape(S, -1, inputs[0].shape[-1])
        delta = g.reshape(S, -1, g.shape[-1])
        rows, columns = local["weight"]
        if len(columns):
            o, i = rows // mod.in_features, rows % mod.in_features
            out[:, columns] += (delta[:, :, o] * a[:, :, i]).sum(1)
        if "bias" in local and len(local["bias"][1]):
            rows, columns = local["bias"]
            out[:, columns] += delta[:, :, rows].sum(1)
        return
    if isinstance(mod, nn.Embedding):
        ids = inputs[0].reshape(S, -1)
        delta = g.reshape(S, ids.shape[1], -1)
        rows, columns = local["weight"]
        if len(columns):
            v, c = rows // mod.embedding_dim, rows % mod.embedding_dim
            out[:, columns] += ((ids[:, :, None] == v) * delta[:, :, c]).sum(1)
        return
    columns = torch.cat([cols for _, cols in local.values()]).unique()
    if not len(columns):
        return
    dense = {}
    for n, (rows, cols) in local.items():
        param = getattr(mod, n)
        slice_ = torch.zeros(param.numel(), len(columns), dtype=dtype, device=g.device)
        slice_[rows, torch.searchsorted(columns, cols)] = 1
        dense[n] = slice_.reshape(*param.shape, len(columns))
    out[:, columns] += project(inputs, g, dense)


def _vjp_gradients(mod: nn.Module, params: dict[str, Tensor], inputs: tuple, output_grad: Tensor):
    """Any leaf module of one input (LayerNorm, RMSNorm, ...): its per-sequence parameter
    gradients by a vector-Jacobian product of the module alone, vmapped over sequences."""

    def one(x: Tensor, g: Tensor) -> dict[str, Tensor]:
        _, pull = torch.func.vjp(
            lambda p: torch.func.functional_call(mod, p, (x.unsqueeze(0),)).squeeze(0), params
        )
        return pull(g)[0]

    return torch.func.vmap(one)(inputs[0], output_grad)


def _vjp_along(grads: dict[str, Tensor], basis: dict[str, Tensor]) -> Tensor:
    S = next(iter(grads.values())).shape[0]
    return sum(grads[n].reshape(S, -1) @ b.reshape(-1, b.shape[-1]) for n, b in basis.items())


def _is_conv1d(mod: nn.Module) -> bool:
    conv1d = getattr(sys.modules.get("transformers.pytorch_utils"), "Conv1D", None)
    return conv1d is not None and isinstance(mod, conv1d)


def _one_input_leaf(mod: nn.Module) -> bool:
    if next(mod.children(), None) is not None:
        return False
    try:
        parameters = inspect.signature(mod.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters) == 1


def _has_rule(mod: nn.Module) -> bool:
    """Whether the reverse route can form per-sequence gradients of `mod`'s own parameters."""
    return (
        isinstance(mod, (nn.Linear, nn.Embedding))
        or _is_conv1d(mod)
        or hasattr(mod, "project_per_sample_grads")
        or _one_input_leaf(mod)
    )


def _projector(mod: nn.Module, params: dict[str, Tensor]) -> _Projection:
    """`(inputs, output_grad, basis) -> (S, m)` for `mod` at parameters `params`."""
    if isinstance(mod, nn.Linear):
        return _LINEAR
    if isinstance(mod, nn.Embedding):
        return _projecting(_embedding_projection)
    if _is_conv1d(mod):
        return _CONV1D
    if hasattr(mod, "project_per_sample_grads"):
        return _projecting(mod.project_per_sample_grads)
    return _Projection(functools.partial(_vjp_gradients, mod, params), _vjp_along)
