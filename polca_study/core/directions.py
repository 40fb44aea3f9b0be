"""Flat parameter vectors and directions in parameter space.

The core takes a model's trainable parameters as one flat vector θ (d,), in the order of
`flatten_parameters`, and a set of m directions b_j as the columns of a (d, m) matrix B,
or as `Coordinates`: the unit vectors e_j of chosen parameters, never formed densely. A
step Δθ projects on them as `Bᵀ Δθ` (m,) (`project`); for coordinates that is a gather,
`Δθ[indices]`. A loss function (`LossFn`) maps θ to per-example losses (n,) or a scalar.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# θ (d,) -> per-example losses (n,), or the scalar loss of a sample
LossFn = Callable[[Tensor], Tensor]


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


def column(vectors: Tensor | Coordinates, j: int) -> Tensor:
    """Direction j as a dense (d,) vector."""
    return vectors.dense(j, j + 1).reshape(-1) if isinstance(vectors, Coordinates) else vectors[:, j]


def chunks(vectors: Tensor | Coordinates, size: int, device=None):
    """The directions `size` at a time, each chunk a dense (c, d) matrix of rows."""
    for start in range(0, vectors.shape[1], size):
        if isinstance(vectors, Coordinates):
            yield vectors.dense(start, start + size, device).T.contiguous()
        else:
            yield vectors[:, start : start + size].T.contiguous()  # (c, d)


def flatten_parameters(module: nn.Module) -> Tensor:
    """All trainable parameters of `module` as one detached 1-D vector."""
    return torch.cat([p.detach().reshape(-1) for p in module.parameters() if p.requires_grad])
