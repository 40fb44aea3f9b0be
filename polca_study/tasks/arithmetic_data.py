"""Three-digit addition: `a a a + b b b =` then the 4 digits of the sum, most significant first.

Each output token is labelled with the skills the paper scores: its digit place
(1000s/100s/10s/1s), whether a carry comes into that place from the lower places, and
its value. Operands run 000-999, zero-padded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.nn import functional as F

from polca_study.errors import ConfigError

PLUS, EQUALS = 10, 11
VOCAB_SIZE = 12
SEQ_LEN = 11  # inputs: 3 + 1 + 3 + 1 + 3 (the last sum digit is only a target)
OUTPUT_POSITIONS = (7, 8, 9, 10)  # logits at these inputs predict the 4 sum digits
PLACES = ("1000s", "100s", "10s", "1s")
N_PAIRS = 1000 * 1000


@dataclass
class Split:
    """Sequences and their labels. inputs (S, 11), targets (S, 4); labels: one row per
    output token, ordered (sequence, place) like the flattened targets."""

    inputs: Tensor
    targets: Tensor
    labels: pd.DataFrame

    def batch(self) -> dict[str, Tensor]:
        return {"inputs": self.inputs, "targets": self.targets}


def digits(x: np.ndarray, n: int) -> np.ndarray:
    """Most-significant-first digits of integers x, shape (len(x), n)."""
    return (x[:, None] // 10 ** np.arange(n - 1, -1, -1)) % 10


def carries_into(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(S, 4) booleans: does a carry come into the 1000s/100s/10s/1s place."""
    da, db = digits(a, 3)[:, ::-1], digits(b, 3)[:, ::-1]  # least significant first
    carry = np.zeros((len(a), 4), dtype=bool)  # least significant first: 1s, 10s, 100s, 1000s
    for place in range(3):
        carry[:, place + 1] = da[:, place] + db[:, place] + carry[:, place] >= 10
    return carry[:, ::-1]


def encode(a: np.ndarray, b: np.ndarray) -> Split:
    total = a + b
    seq = np.concatenate(
        [
            digits(a, 3),
            np.full((len(a), 1), PLUS),
            digits(b, 3),
            np.full((len(a), 1), EQUALS),
            digits(total, 4),
        ],
        axis=1,
    )
    carry = carries_into(a, b)
    s = np.repeat(np.arange(len(a)), 4)
    labels = pd.DataFrame(
        {
            "sequence": s,
            "a": a[s],
            "b": b[s],
            "place": pd.Categorical(np.tile(PLACES, len(a)), categories=PLACES),
            "carry": carry.reshape(-1),
            "value": digits(total, 4).reshape(-1),
        }
    )
    return Split(
        inputs=torch.as_tensor(seq[:, :SEQ_LEN], dtype=torch.long),
        targets=torch.as_tensor(seq[:, 8:], dtype=torch.long),
        labels=labels,
    )


def token_loss(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Cross-entropy of the 4 sum digits: logits (S, T, V) -> (S, 4)."""
    out = logits[:, list(OUTPUT_POSITIONS)]  # (S, 4, V)
    return F.cross_entropy(out.transpose(1, 2), batch["targets"], reduction="none")


def evaluate(model: torch.nn.Module, split: Split) -> dict[str, list]:
    """Loss and accuracy per place, for carry and no-carry tokens apart (learning curves)."""
    logits = model(split.inputs.to(next(model.parameters()).device)).cpu()
    losses = token_loss(logits, split.batch()).reshape(-1).numpy()
    correct = (logits[:, list(OUTPUT_POSITIONS)].argmax(-1) == split.targets).reshape(-1).numpy()
    frame = split.labels.assign(loss=losses, correct=correct)
    out = (
        frame.groupby(["place", "carry"], observed=True)
        .agg(loss=("loss", "mean"), accuracy=("correct", "mean"), tokens=("loss", "size"))
        .reset_index()
    )
    return {c: out[c].tolist() for c in out.columns}


def any_carry(pairs: np.ndarray) -> np.ndarray:
    a, b = pairs // 1000, pairs % 1000
    return carries_into(a, b).any(axis=1)


@dataclass
class ArithmeticData:
    """The fixed evaluation set, the Hessian sample, and a seeded stream of training batches.

    Evaluation pairs are uniform; the Hessian sample and training batches never contain
    them. With `carry_rate` set, that share of training (and Hessian) examples carries.
    """

    eval_size: int = 1250
    hessian_size: int = 1250
    carry_rate: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.eval_size < 1 or self.hessian_size < 1:
            raise ConfigError("dataset.eval_size and dataset.hessian_size must be >= 1")
        if self.carry_rate is not None and not 0.0 <= self.carry_rate <= 1.0:
            raise ConfigError(f"dataset.carry_rate must be in [0, 1] or null, got {self.carry_rate}")
        rng = np.random.default_rng(self.seed)
        self.eval_pairs = rng.choice(N_PAIRS, size=self.eval_size, replace=False)
        self._held_out = np.zeros(N_PAIRS, dtype=bool)
        self._held_out[self.eval_pairs] = True
        self.hessian_pairs = self.sample_pairs(self.hessian_size, rng)

    def sample_pairs(self, size: int, rng: np.random.Generator) -> np.ndarray:
        """Training pairs (never evaluation pairs), carrying at `carry_rate` when set."""
        if self.carry_rate is None:
            return self._draw(size, rng, carry=None)
        n_carry = rng.binomial(size, self.carry_rate)
        out = np.concatenate([self._draw(n_carry, rng, True), self._draw(size - n_carry, rng, False)])
        rng.shuffle(out)
        return out

    def _draw(self, size: int, rng: np.random.Generator, carry: bool | None) -> np.ndarray:
        found, total = [], 0
        while total < size:
            cand = rng.integers(0, N_PAIRS, size=2 * size + 16)
            cand = cand[~self._held_out[cand]]
            if carry is not None:
                cand = cand[any_carry(cand) == carry]
            found.append(cand)
            total += len(cand)
        return np.concatenate(found)[:size] if found else np.empty(0, dtype=np.int64)

    @staticmethod
    def split(pairs: np.ndarray) -> Split:
        return encode(pairs // 1000, pairs % 1000)

    def eval_split(self) -> Split:
        return self.split(self.eval_pairs)

    def hessian_split(self) -> Split:
        return self.split(self.hessian_pairs)

    def train_batches(self, batch_size: int, seed: int):
        """An endless, seeded stream of training batches (inputs, targets)."""
        rng = np.random.default_rng([self.seed, seed, 1])
        while True:
            s = self.split(self.sample_pairs(batch_size, rng))
            yield s.inputs, s.targets
