"""POLCA's public face: re-exports the public API of the math core, `polca_study.core`.

The core (tensors and loss functions in, tensors out; no Hydra, W&B, pandas or files)
holds one concept per module; this module gathers the names the study, the benchmarks
and users import, so that `from polca_study.polca import decompose` keeps working:

- `build_basis`: the paper's Algorithm 1 (top-k eigenvectors of the projected Hessian
  at each checkpoint, by Lanczos on Hessian-vector products) — `core.basis`.
- `decompose`: POLCA values of n examples along m basis vectors for one step;
  `decompose_trajectory` the same over a sequence of checkpoints, reusing each step's
  directional derivatives for the next — `core.decompose`.
- `ModuleLoss`: an adapter from an `nn.Module`, a batch and a per-token loss to the
  per-example loss function the others take, with a fast reverse-mode route for the
  first-order term — `core.module_loss` (per-layer rules in `core.per_sample`).
- directional derivatives and the exact mode's self-check — `core.derivatives`;
  parameter vectors and directions — `core.directions`; option sets — `core.checks`.
"""

from polca_study.core.basis import Basis, ProjectedHessian, build_basis, hessian_vector_product
from polca_study.core.checks import ROUTES, SECOND_ORDER_MODES
from polca_study.core.decompose import (
    SHARED_PASS_MODES,
    Decomposition,
    StepTerms,
    decompose,
    decompose_trajectories,
    decompose_trajectory,
)
from polca_study.core.derivatives import (
    CompositeNorms,
    SecondOrderError,
    aggregate_curvature,
    check_second_order,
    first_order,
    forward_directional,
    reverse_directional,
    second_order_directional,
)
from polca_study.core.directions import Coordinates, LossFn, flatten_parameters, project
from polca_study.core.module_loss import ModuleLoss, causal_lm_loss, next_token_loss

__all__ = [
    # imported from here by the study, the tests, the benchmarks or the README
    "ROUTES",
    "SECOND_ORDER_MODES",
    "SHARED_PASS_MODES",
    "Basis",
    "CompositeNorms",
    "Coordinates",
    "Decomposition",
    "ModuleLoss",
    "ProjectedHessian",
    "SecondOrderError",
    "build_basis",
    "causal_lm_loss",
    "check_second_order",
    "decompose",
    "decompose_trajectories",
    "decompose_trajectory",
    "flatten_parameters",
    "hessian_vector_product",
    # the rest of the public API this module had before the core was split out
    "LossFn",
    "StepTerms",
    "aggregate_curvature",
    "first_order",
    "forward_directional",
    "next_token_loss",
    "project",
    "reverse_directional",
    "second_order_directional",
]
