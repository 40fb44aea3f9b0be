"""Per-layer rules for per-sequence parameter gradients, projected on directions.

The reverse route (`module_loss.ModuleLoss`) captures each layer's inputs a and the
gradient δ of one position's summed loss with respect to its output; since sequences do
not interact, sequence s's gradient of a layer's own parameters follows from its a_s, δ_s
alone, and is projected on the directions' slice B for that parameter (S, m):

- Linear (and transformers' Conv1D, its transpose): ∇_W = Σ_t δ_t a_tᵀ, ∇_b = Σ_t δ_t;
  projected `<B, Σ_t δ_t a_tᵀ>` by one matmul with the per-sequence weight gradients;
- Embedding: ∇_W = Σ_t e_{id_t} δ_tᵀ, dense over the ids used when they are few, else
  projected by gathering B's rows of each position's id;
- any other leaf module of one input (LayerNorm, RMSNorm): a vector-Jacobian product of
  the module alone, vmapped over sequences;
- a module's own `project_per_sample_grads(inputs, output_grad, basis) -> (S, m)`.

Along `Coordinates` the projections are gradient entries, gathered (`add_coordinates`).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F


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


def _embedding_gradients(
    inputs: tuple, output_grad: Tensor, padding_idx: int | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The ids (S, T), output gradients (S, T, D) and, when few distinct ids are used,
    each sequence's dense gradient of their rows Σ_t e_{id_t} δ_tᵀ (S, U, D) with the ids
    (U,). Dense is cheaper than gathering the basis rows of every position (S, T, D, m)
    when U ≤ 2T, as with a small vocabulary or a position embedding: it is then at most
    twice the size of the output gradients. A large vocabulary's rows are gathered."""
    ids, delta = _ids_and_deltas(inputs, output_grad, padding_idx)
    used, where = torch.unique(ids, return_inverse=True)
    if len(used) > DENSE_IDS_PER_POSITION * ids.shape[1]:
        return ids, delta, None
    one_hot = F.one_hot(where, len(used)).to(delta.dtype)  # (S, T, U)
    return used, delta, one_hot.transpose(1, 2) @ delta


def _embedding_along(gradients: tuple[Tensor, Tensor, Tensor | None], basis: dict[str, Tensor]) -> Tensor:
    """<B, Σ_t e_{id_t} δ_tᵀ> per sequence: the dense gradients' rows times the basis rows
    of the ids used, or the basis rows of each position's id gathered."""
    ids, delta, dense = gradients
    if dense is None:
        rows = basis["weight"][ids]  # (S, T, D, m)
        return torch.einsum("std,stdm->sm", delta, rows)
    rows = basis["weight"][ids]  # (U, D, m): `ids` are the distinct ids used
    return dense.reshape(dense.shape[0], -1) @ rows.reshape(-1, rows.shape[-1])


def _ids_and_deltas(inputs: tuple, output_grad: Tensor, padding_idx: int | None) -> tuple[Tensor, Tensor]:
    """An embedding's ids (S, T) and output gradients (S, T, D), the padding id's zeroed:
    autograd gives the padding row no gradient."""
    S = inputs[0].shape[0]
    ids = inputs[0].reshape(S, -1)
    delta = output_grad.reshape(S, ids.shape[1], -1)
    if padding_idx is not None:
        delta = delta * (ids != padding_idx).unsqueeze(-1).to(delta.dtype)
    return ids, delta


# An embedding's gradients are dense when at most this many distinct ids per position are
# used (`_embedding_gradients`); 0 gathers always (benchmarks/polca_routes.py compares).
DENSE_IDS_PER_POSITION = 2


def add_coordinates(
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
        ids, delta = _ids_and_deltas(inputs, g, mod.padding_idx)
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


def has_rule(mod: nn.Module) -> bool:
    """Whether the reverse route can form per-sequence gradients of `mod`'s own parameters."""
    return (
        isinstance(mod, (nn.Linear, nn.Embedding))
        or _is_conv1d(mod)
        or hasattr(mod, "project_per_sample_grads")
        or _one_input_leaf(mod)
    )


def projector(mod: nn.Module, params: dict[str, Tensor]) -> _Projection:
    """`(inputs, output_grad, basis) -> (S, m)` for `mod` at parameters `params`."""
    if isinstance(mod, nn.Linear):
        return _LINEAR
    if isinstance(mod, nn.Embedding):
        return _Projection(
            functools.partial(_embedding_gradients, padding_idx=mod.padding_idx), _embedding_along
        )
    if _is_conv1d(mod):
        return _CONV1D
    if hasattr(mod, "project_per_sample_grads"):
        return _projecting(mod.project_per_sample_grads)
    return _Projection(functools.partial(_vjp_gradients, mod, params), _vjp_along)
