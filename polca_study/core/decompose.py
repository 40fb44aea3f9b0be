"""POLCA values: each example's share of a step's loss change, along each direction.

For a step θ_t → θ_{t+1}, Δθ = θ_{t+1} − θ_t, an example x and a direction b, with
g_t(x) = ∇L(x; θ_t) and H_t(x) its Hessian, the mode (`checks.SECOND_ORDER_MODES`) gives

- "none":  <b, g_t(x)> <b, Δθ>
- "exact": <b, g_t(x)> <b, Δθ> + ½ bᵀH_t(x)b <b, Δθ>²
- "paper": <b, g_t(x)> <b, Δθ> + ½ λ_t(X,b) <b, Δθ>² <g_{t+1}(x) − g_t(x), b> / <g_{t+1}(X) − g_t(X), b>
- "path":  ½ (<b, g_t(x)> + <b, g_{t+1}(x)>) <b, Δθ>   (the trapezoid rule along the step)

`decompose_trajectories` walks the checkpoints once, reusing each checkpoint's
directional terms for the next step and sharing passes between sets of directions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from polca_study.core.checks import check_finite, check_mode, check_route, check_vector, check_vectors
from polca_study.core.derivatives import aggregate_curvature, first_order, second_order_directional
from polca_study.core.directions import Coordinates, LossFn, project

# Modes whose terms are first-order directional derivatives only: decompositions along
# several sets of directions share the reverse route's backward passes.
SHARED_PASS_MODES = ("none", "path")


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
        check_finite("per_example_loss_fn", t.losses, "a checkpoint")
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
    check_vector("theta_t", theta_t)
    check_vector("theta_next", theta_next, like=theta_t)
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
    check_mode(second_order)
    check_route(route)
    if len(checkpoints) < 2:
        raise ValueError("checkpoints must hold at least two parameter vectors (one step)")
    exact = second_order == "exact"
    walk = iter(checkpoints)
    theta = next(walk)
    check_vector("checkpoints[0]", theta)
    for vectors in sets:
        check_vectors(vectors, theta)
    now = _terms(per_example_loss_fn, theta, sets, exact, route)
    walks = [_Walk(terms) for terms in now]
    bar = tqdm(total=len(checkpoints) - 1, desc="decompose", disable=not progress)
    for t, theta_next in enumerate(walk):
        check_vector(f"checkpoints[{t + 1}]", theta_next, like=theta)
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
