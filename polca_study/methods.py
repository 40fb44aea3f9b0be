"""The per-token trajectories each method clusters (the paper's comparison).

Every method returns curves (n, T', m), one clustering per column m, the steps of the
T' points, and `rises` (n, m): tokens the paper's filter drops for that column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class MethodCurves:
    curves: np.ndarray  # (n, T', m)
    steps: np.ndarray  # (T',)
    rises: np.ndarray  # (n, m) booleans
    columns: list[str]  # what each column is (a basis vector or a parameter)


def _cumulative(values: np.ndarray) -> np.ndarray:
    return np.cumsum(values, axis=1)


def method_curves(name: str, traj: dict, lca: dict | None = None) -> MethodCurves:
    """Build the curves of method `name` from a cached decomposition `traj` (numpy arrays:
    polca, first_order, losses, grads; steps) and, for "lca", the per-parameter one."""
    steps = traj["steps"]
    losses = traj["losses"]  # (n, T+1)
    loss_rises = (losses[:, -1] > losses[:, 0])[:, None]
    if name == "loss":
        return MethodCurves(losses[:, :, None], steps, loss_rises, ["loss"])
    if name == "loss_change":
        return MethodCurves(np.diff(losses, axis=1)[:, :, None], steps[1:], loss_rises,
                            ["loss_change"])
    if name == "lca":
        if lca is None:
            raise ValueError("method 'lca' needs the per-parameter decomposition")
        curves = _cumulative(lca["first_order"])
        return MethodCurves(curves, steps[1:], curves[:, -1] > 0,
                            [f"param_{i}" for i in lca["parameters"]])
    vectors = [f"vector_{j}" for j in range(traj["polca"].shape[2])]
    polca_rises = _cumulative(traj["polca"])[:, -1] > 0
    if name == "fisher":
        return MethodCurves(traj["grads"] ** 2, steps, polca_rises, vectors)
    if name == "polca_first_order":
        curves = _cumulative(traj["first_order"])
        return MethodCurves(curves, steps[1:], curves[:, -1] > 0, vectors)
    if name == "polca":
        curves = _cumulative(traj["polca"])
        return MethodCurves(curves, steps[1:], polca_rises, vectors)
    raise ValueError(f"method.name must be one of loss, loss_change, fisher, lca, "
                     f"polca_first_order, polca; got {name!r}")


def rising_vectors(traj: dict) -> np.ndarray:
    """Indices of basis vectors whose mean projected loss rises over training (dropped)."""
    return np.flatnonzero(_cumulative(traj["polca"])[:, -1].mean(axis=0) > 0)
