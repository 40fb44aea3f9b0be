"""A model as a loss function of flat parameters, with a per-sample reverse route.

`ModuleLoss` maps θ (d,) to the per-example losses (n,) of an `nn.Module` on a fixed
batch: n = S·P losses, S independent sequences with a loss at each of P positions,
ordered (s, p) row-major. Its first-order terms `<b, ∇L(x;θ)>` come by one of two
routes (`checks.ROUTES`), chosen by a cost model in forward passes:

    forward ≈ 2.7·m   (a jvp per direction)
    reverse ≈ 1 + P·(2 + m/(2T))   (a batched backward per position, then per-sequence
                                    gradients projected on all m directions at once)

`causal_lm_loss` is the next-token loss of any causal language model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from polca_study.core.checks import check_route
from polca_study.core.derivatives import forward_directional
from polca_study.core.directions import Coordinates
from polca_study.core.per_sample import add_coordinates, has_rule, projector

log = logging.getLogger(__name__)

# Relative costs in forward passes, used to choose a first-order route (measured on CPU:
# a jvp costs about 2.7 forward passes, a backward about 2).
_JVP_COST = 2.7
_BACKWARD_COST = 2.0


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
        _check_embeddings(module)
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
            if has_rule(mod)
            for p in mod.parameters(recurse=False)
            if id(p) in canonical
        }
        return [n for n in self.names if n not in covered]

    # --------------------------------------------------------- directional derivatives

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
        check_route(route)
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

    # ------------------------------------------------------------------ reverse route

    def _reverse(
        self, theta: Tensor, sets: Sequence[Tensor | Coordinates], batch
    ) -> tuple[Tensor, list[Tensor]]:
        """Losses (S·P,) and each set's derivatives (S·P, m) on `batch`: one backward per
        position to the hooked modules' outputs, each module's per-sequence gradients
        projected on every set."""
        bases = [self._per_parameter(vectors, theta.device) for vectors in sets]
        params = {n: p.requires_grad_(True) for n, p in self.unflatten(theta.clone()).items()}
        owned = self._owned()
        records, token_losses = self._record(params, batch, owned)  # token losses (S, P)
        S, P = token_losses.shape
        derivs = [torch.zeros(S, P, v.shape[1], dtype=v.dtype, device=theta.device) for v in sets]
        outs = [r[3] for r in records]
        for p in range(P):
            grads = torch.autograd.grad(
                token_losses[:, p].sum(), outs, retain_graph=p < P - 1, allow_unused=True
            )
            at_p = [d[:, p] for d in derivs]  # (S, m) views: adding to them adds to derivs
            with torch.no_grad():  # the projections must not hold on to the graph
                for (mod, _, inputs, _), g in zip(records, grads, strict=True):
                    if g is not None:
                        self._add_module(at_p, mod, inputs, g, owned[mod], params, sets, bases)
        records.clear()
        return token_losses.detach().reshape(-1), [d.reshape(S * P, -1) for d in derivs]

    def _owned(self) -> dict[nn.Module, dict[str, str]]:
        """Each module with a rule: its own parameters' local names -> flattening-order names."""
        canonical = self._canonical()
        return {
            mod: {n: canonical[id(p)] for n, p in mod.named_parameters(recurse=False) if id(p) in canonical}
            for mod in self.module.modules()
            if has_rule(mod)
        }

    def _record(
        self, params: dict[str, Tensor], batch, owned: dict[nn.Module, dict[str, str]]
    ) -> tuple[list[tuple[nn.Module, str, tuple, Tensor]], Tensor]:
        """One forward pass at `params`, recording (module, name, inputs, output) of every
        module in `owned` with parameters; returns the records and the token losses (S, P)."""
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

        handles = [mod.register_forward_hook(hook) for mod, names in owned.items() if names]
        try:
            output = self.forward(_Bound(self.module, params), batch)
        finally:
            for h in handles:
                h.remove()
        return records, self.token_loss(output, batch)

    @staticmethod
    def _add_module(
        outs: list[Tensor],
        mod: nn.Module,
        inputs: tuple,
        g: Tensor,
        names: dict[str, str],
        params: dict[str, Tensor],
        sets: Sequence[Tensor | Coordinates],
        bases: list[dict[str, tuple[Tensor, Tensor | None]]],
    ) -> None:
        """Add `mod`'s part of one position's derivatives to each set's `outs` (S, m),
        given the gradient `g` of the position's summed loss at the module's output."""
        project = projector(mod, {n: params[full].detach() for n, full in names.items()})
        gradients = None  # the layer's per-sequence gradients, shared by the bases
        for vectors, basis, out in zip(sets, bases, outs, strict=True):
            local = {n: basis[full] for n, full in names.items()}
            if isinstance(vectors, Coordinates):
                add_coordinates(out, mod, inputs, g, local, vectors.dtype, project)
            else:
                if gradients is None:
                    gradients = project.gradients(inputs, g)
                out += project.along(gradients, {n: b for n, (b, _) in local.items()})


def _check_embeddings(module: nn.Module) -> None:
    """Refuse embeddings whose forward or backward is not that of a lookup: `max_norm`
    renormalizes the looked-up rows in place, which through `functional_call` would rewrite
    the checkpoint's parameter vector itself; `scale_grad_by_freq` divides backward's
    gradient by each id's count in the batch, so Hessian-vector products would not be the
    Hessian's."""
    for name, mod in module.named_modules():
        if isinstance(mod, nn.Embedding) and (mod.max_norm is not None or mod.scale_grad_by_freq):
            field = "max_norm" if mod.max_norm is not None else "scale_grad_by_freq"
            raise ValueError(
                f"ModuleLoss cannot analyse embedding {name or type(module).__name__!r} with "
                f"{field}={getattr(mod, field)!r}: allowed are max_norm=None and "
                "scale_grad_by_freq=False (set them so on the model built for analysis; "
                "the checkpoints' weights are unaffected)"
            )


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
