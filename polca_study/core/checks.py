"""The core's input checks, and the option sets they accept.

Each check raises `ValueError` before any work starts, naming the argument, what it got
and what it must be: a parameter vector θ is 1-D (d,), directions are a (d, m) matrix
with one row per parameter (or `Coordinates` for the same d), a second-order mode is one
of `SECOND_ORDER_MODES`, a first-order route one of `ROUTES`, and losses are finite.

The option sets live here, beside the checks that use them, so that the config schemas
can check a run's settings against them without importing the math (scipy).
"""

from __future__ import annotations

import torch
from torch import Tensor

from polca_study.core.directions import Coordinates

# How the second-order term of a step is computed (see `decompose.decompose`).
SECOND_ORDER_MODES = ("none", "exact", "paper", "path")
# How first-order terms are computed (see `module_loss.ModuleLoss.choose_route`).
ROUTES = ("auto", "forward", "reverse")


def check_vector(name: str, x: Tensor, like: Tensor | None = None) -> None:
    if not isinstance(x, Tensor) or x.ndim != 1:
        raise ValueError(f"{name} must be a 1-D parameter vector, got {describe(x)}")
    if like is not None and (x.shape != like.shape or x.dtype != like.dtype):
        raise ValueError(
            f"{name} must match theta_t in shape and dtype: got {tuple(x.shape)} {x.dtype}, "
            f"expected {tuple(like.shape)} {like.dtype}"
        )


def check_vectors(vectors: Tensor | Coordinates, theta: Tensor) -> None:
    if isinstance(vectors, Coordinates):
        if vectors.d != theta.shape[0] or vectors.dtype != theta.dtype:
            raise ValueError(
                f"coordinates for d={vectors.d} ({vectors.dtype}) do not fit parameters of "
                f"d={theta.shape[0]} ({theta.dtype})"
            )
        return
    if not isinstance(vectors, Tensor) or vectors.ndim != 2:
        raise ValueError(f"vectors must be a (d, m) matrix, got {describe(vectors)}")
    if vectors.shape[0] != theta.shape[0]:
        raise ValueError(
            f"vectors must have one row per parameter: height {vectors.shape[0]}, "
            f"but the parameter vector has d={theta.shape[0]}"
        )
    if vectors.dtype != theta.dtype:
        raise ValueError(f"vectors has dtype {vectors.dtype}, parameters have {theta.dtype}")


def check_mode(second_order: str) -> None:
    if second_order not in SECOND_ORDER_MODES:
        raise ValueError(f"second_order must be one of {SECOND_ORDER_MODES}, got {second_order!r}")


def check_route(route: str) -> None:
    if route not in ROUTES:
        raise ValueError(f"route must be one of {ROUTES}, got {route!r}")


def check_finite(name: str, losses: Tensor, where: str) -> None:
    if not torch.isfinite(losses).all():
        bad = int((~torch.isfinite(losses)).sum())
        raise ValueError(f"{name} returned {bad} non-finite loss value(s) at {where}")


def describe(x: object) -> str:
    return f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
