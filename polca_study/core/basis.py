"""The Hessian basis: the paper's Algorithm 1.

At each checkpoint θ_i, append the top-k eigenvectors of the projected Hessian

    P H(θ_i) P,   P = I − B Bᵀ,

B (d, j) the orthonormal vectors found at earlier checkpoints, so every new direction is
orthogonal to the old ones. H is never formed: scipy's ARPACK Lanczos (`eigsh`) runs on
Hessian-vector products by double backward, `H v = ∇_θ <∇_θ L(θ), v>`, through one
gradient graph per checkpoint (`hessian_vector_product`, `ProjectedHessian`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, LinearOperator, eigsh
from torch import Tensor
from tqdm.auto import tqdm

from polca_study.core.checks import check_finite, check_vector
from polca_study.core.directions import LossFn


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
    check_finite("loss_fn", loss.reshape(1), "a basis checkpoint")
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
    first = _first_checkpoint(checkpoints, k)
    d = first.shape[0]
    dtype, device = first.dtype, first.device
    ncv = min(d - 1, ncv or max(2 * k + 4, 6))
    rng = np.random.default_rng(seed)
    found = torch.empty(d, 0, dtype=dtype, device=device)
    eigenvalues, residuals, origin = [], [], []
    hvps = 0

    for index, theta in enumerate(tqdm(checkpoints, desc="basis", disable=not progress)):
        check_vector(f"checkpoints[{index}]", theta, like=first)
        operator = ProjectedHessian(loss_fn, theta, found)
        v0 = operator.project(torch.as_tensor(rng.standard_normal(d), dtype=dtype, device=device))
        vals, vecs = _lanczos(operator, k, index, tol=tol, maxiter=maxiter, ncv=ncv, v0=v0)
        new, lam = _top_pairs(vals, vecs, operator.project, dtype, device)
        hvps += operator.products  # Lanczos's products; the residual checks below are extra
        residuals += _residuals(operator, new, lam)
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


def _first_checkpoint(checkpoints: Sequence[Tensor], k: int) -> Tensor:
    """Check `k` and the number of checkpoints against d; return the first checkpoint."""
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if len(checkpoints) == 0:
        raise ValueError("checkpoints must hold at least one parameter vector")
    first = checkpoints[0]  # checkpoints may be read lazily: each is checked as it comes
    check_vector("checkpoints[0]", first)
    d = first.shape[0]
    if len(checkpoints) * k >= d:
        raise ValueError(
            f"k * len(checkpoints) = {len(checkpoints) * k} must be below the number of parameters d={d}"
        )
    return first


def _lanczos(
    operator: ProjectedHessian, k: int, index: int, *, tol: float, maxiter: int | None, ncv: int, v0: Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """The top-k (largest algebraic) eigenpairs of `operator` by ARPACK's Lanczos, in
    eigsh's order, started from `v0`; a failure names the checkpoint `index`."""
    try:
        return eigsh(
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


def _top_pairs(
    vals: np.ndarray, vecs: np.ndarray, project: Callable[[Tensor], Tensor], dtype, device
) -> tuple[Tensor, Tensor]:
    """Lanczos's pairs as tensors, largest eigenvalue first: the vectors (d, k) made
    orthonormal and orthogonal to B again, each with a deterministic sign."""
    order = np.argsort(vals)[::-1]
    new = torch.as_tensor(vecs[:, order].copy(), dtype=dtype, device=device)
    # re-orthogonalise against B (twice is enough) so columns stay orthonormal in float32
    for _ in range(2):
        new = project(new)
        new, _ = torch.linalg.qr(new)
    new = new * torch.sign(new.sum(0, keepdim=True) + 1e-30)  # deterministic sign
    lam = torch.as_tensor(vals[order].copy(), dtype=dtype, device=device)
    return new, lam


def _residuals(operator: ProjectedHessian, new: Tensor, lam: Tensor) -> list[float]:
    """`‖PHPv − λv‖ / |λ|` of each pair, by products outside the operator's count."""
    project = operator.project
    residuals = []
    for j in range(new.shape[1]):
        v = new[:, j]
        hv = project(operator.hvp(project(v)))
        residuals.append(float(torch.linalg.norm(hv - lam[j] * v) / lam[j].abs().clamp_min(1e-30)))
    return residuals
