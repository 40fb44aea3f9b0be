"""The per-token trajectories each method clusters, as the paper defines them.

| method | trajectory of token x (one clustering per column) |
|---|---|
| loss | L(x; θ_t) at every evaluation point |
| loss_change | L(x; θ_t) − L(x; θ_{t−1}) |
| fisher | <b, ∇L(x; θ_t)>² for each basis vector b |
| lca | Σ_{s<t} ∂_j L(x; θ_s) (θ_{s+1} − θ_s)_j for each of the 50 largest parameters j |
| polca_first_order | Σ_{s<t} <b, ∇L(x; θ_s)> <b, Δθ_s> for each b |
| polca | the same running sum with the second-order term (`polca.second_order`) |

How a trajectory becomes HDBSCAN's features (the trajectory itself or its increments,
normalisation, grouping, HDBSCAN settings) is the method's `cluster` setting, kept in
`conf/method/<name>.yaml`. A new method is a function here and an entry in `METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # config.py reads the method names: keep torch and scipy out of it
    from polca_study.core.decompose import Decomposition
    from polca_study.core.directions import Coordinates
    from polca_study.snapshots.run import SnapshotRun


@dataclass
class MethodCurves:
    curves: np.ndarray  # (n, T', m)
    steps: np.ndarray  # (T',)
    rises: np.ndarray  # (n, m) booleans: tokens the paper's filter drops
    columns: list[str]  # what each column is (a basis vector or a parameter)


@dataclass(frozen=True)
class Parameters:
    """Directions along single parameters, chosen from the snapshots: a method that
    declares them gets the decomposition along them (first order) beside the basis's."""

    name: str  # names the cached decomposition
    choose: Callable[[SnapshotRun], Coordinates]


def largest_parameters(run: SnapshotRun, count: int = 50) -> Coordinates:
    """LCA's parameters: the `count` largest in magnitude at the end of training."""
    import torch

    from polca_study.core.directions import Coordinates

    final = run.store.flat(int(run.steps[-1]))
    return Coordinates(torch.argsort(-final.abs(), stable=True)[:count], final.numel(), final.dtype)


@dataclass(frozen=True)
class Method:
    curves: Callable[[Decomposition, Decomposition | None], MethodCurves]  # (decomposition, LCA's)
    parameters: Parameters | None = None  # its own directions besides the basis (LCA's)
    basis_columns: bool = False  # one column per basis vector (rising vectors are dropped)
    basis: str | None = None  # the basis kind the method is defined on (None: any)
    # (decomposition, LCA's) -> the terms (n, T, columns) the method allocates each
    # interval's loss change to; None for a method that allocates nothing (loss, Fisher)
    allocation: Callable[[Decomposition, Decomposition | None], np.ndarray] | None = None


def _cumulative(values: np.ndarray) -> np.ndarray:
    return np.cumsum(values, axis=1)


def _loss_rises(traj: Decomposition) -> np.ndarray:
    losses = traj.losses
    return (losses[:, -1] > losses[:, 0])[:, None]


def _vectors(traj: Decomposition) -> list[str]:
    return [f"vector_{j}" for j in range(traj.polca.shape[2])]


def _polca_rises(traj: Decomposition) -> np.ndarray:
    return _cumulative(traj.polca)[:, -1] > 0


def loss(traj: Decomposition, lca: Decomposition | None = None) -> MethodCurves:
    return MethodCurves(traj.losses[:, :, None], traj.steps, _loss_rises(traj), ["loss"])


def loss_change(traj: Decomposition, lca: Decomposition | None = None) -> MethodCurves:
    return MethodCurves(
        np.diff(traj.losses, axis=1)[:, :, None], traj.steps[1:], _loss_rises(traj), ["loss_change"]
    )


def fisher(traj: Decomposition, lca: Decomposition | None = None) -> MethodCurves:
    return MethodCurves(traj.grads**2, traj.steps, _polca_rises(traj), _vectors(traj))


def lca_curves(traj: Decomposition, lca: Decomposition | None = None) -> MethodCurves:
    if lca is None:
        raise ValueError("method 'lca' needs the per-parameter decomposition")
    curves = _cumulative(lca.first_order)
    return MethodCurves(curves, traj.steps[1:], curves[:, -1] > 0, [f"param_{i}" for i in lca.parameters])


def polca_first_order(traj: Decomposition, lca: Decomposition | None = None) -> MethodCurves:
    curves = _cumulative(traj.first_order)
    return MethodCurves(curves, traj.steps[1:], curves[:, -1] > 0, _vectors(traj))


def polca(traj: Decomposition, lca: Decomposition | None = None) -> MethodCurves:
    return MethodCurves(_cumulative(traj.polca), traj.steps[1:], _polca_rises(traj), _vectors(traj))


def _polca_terms(traj: Decomposition, lca: Decomposition | None = None) -> np.ndarray:
    return traj.polca


def _first_order_terms(traj: Decomposition, lca: Decomposition | None = None) -> np.ndarray:
    return traj.first_order


def _lca_terms(traj: Decomposition, lca: Decomposition | None = None) -> np.ndarray:
    return lca.first_order


def _whole_change(traj: Decomposition, lca: Decomposition | None = None) -> np.ndarray:
    return np.diff(traj.losses, axis=1)[:, :, None]


METHODS: dict[str, Method] = {
    "loss": Method(loss),
    "loss_change": Method(loss_change, allocation=_whole_change),
    "fisher": Method(fisher, basis_columns=True),
    "lca": Method(lca_curves, parameters=Parameters("lca", largest_parameters), allocation=_lca_terms),
    "polca_first_order": Method(polca_first_order, basis_columns=True, allocation=_first_order_terms),
    "polca": Method(polca, basis_columns=True, allocation=_polca_terms),
    # the basis ablations: POLCA along another basis, reported under their own names
    "random_basis": Method(polca, basis_columns=True, basis="random", allocation=_polca_terms),
    "shuffled_basis": Method(polca, basis_columns=True, basis="shuffled", allocation=_polca_terms),
}


def unallocated_share(name: str, traj: Decomposition, lca: Decomposition | None = None) -> float:
    """The part of the actual loss change the method leaves unallocated, over tokens and
    intervals: Σ|ΔL(x,t) − Σ_j a_j(x,t)| / Σ|ΔL(x,t)|, a_j its terms (NaN for a method
    that allocates nothing). 0 for the loss change itself; for POLCA, what lies outside
    the basis and beyond its second-order term."""
    method = METHODS[name]
    if method.allocation is None:
        return float("nan")
    actual = np.diff(traj.losses, axis=1)  # (n, T)
    remainder = actual - method.allocation(traj, lca).sum(axis=2)
    total = np.abs(actual).sum()
    return float(np.abs(remainder).sum() / total) if total > 0 else float("nan")


def method_curves(name: str, traj: Decomposition, lca: Decomposition | None = None) -> MethodCurves:
    """The curves of method `name` from a decomposition along the basis `traj` and, for
    "lca", the one along its coordinates."""
    if name not in METHODS:
        raise ValueError(f"method.name must be one of {list(METHODS)}; got {name!r}")
    return METHODS[name].curves(traj, lca)


def rising_vectors(traj: Decomposition) -> np.ndarray:
    """Indices of basis vectors whose mean projected loss rises over training (dropped)."""
    return np.flatnonzero(_cumulative(traj.polca)[:, -1].mean(axis=0) > 0)
