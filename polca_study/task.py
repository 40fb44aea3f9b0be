"""What a study needs of its data, whatever the dataset: the model's input sizes, the
evaluation tokens with their labels, the Hessian sample, the training stream, the
per-token loss and the learning-curve evaluation.

Arithmetic labels are ground-truth skills (place, carry, value); text labels are the
part-of-speech contexts of `data.tagging`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class Task:
    name: str  # the dataset: arithmetic | text
    spec: dict  # what determines the data (part of the training stage's cache key)
    n_ctx: int
    d_vocab: int
    eval_split: Any  # inputs, targets, labels (one row per evaluation token), batch()
    hessian_split: Callable[[], Any]
    train_batches: Callable[[int, int], Any]  # (batch_size, seed) -> iterator of (inputs, targets)
    token_loss: Callable  # (logits, batch) -> (S, P) losses
    evaluate: Callable  # (model, split) -> learning-curve record (dict of lists)
    groups: np.ndarray  # (n,) group of each evaluation token for cluster.grouping=place
    objective: str  # the metric a search maximises
    data: Any  # the dataset object


def make_task(dataset, cache=None) -> Task:
    """The task of a validated dataset config (ArithmeticConfig or TextConfig)."""
    if dataset.name == "arithmetic":
        from polca_study.data import arithmetic

        data = arithmetic.ArithmeticData(
            dataset.eval_size, dataset.hessian_size, dataset.carry_rate, dataset.seed
        )
        split = data.eval_split()
        return Task(
            "arithmetic",
            asdict(dataset),
            arithmetic.SEQ_LEN,
            arithmetic.VOCAB_SIZE,
            split,
            data.hessian_split,
            data.train_batches,
            arithmetic.token_loss,
            arithmetic.evaluate,
            split.labels["place"].astype(str).to_numpy(),
            "carry_recovery_excess",
            data,
        )
    if dataset.name == "text":
        from polca_study.data import text

        data = text.TextData(dataset, cache)
        split = data.eval_split()
        # text has no digit places: grouping=place clusters all tokens together
        return Task(
            "text",
            data.spec,
            data.n_ctx,
            data.d_vocab,
            split,
            data.hessian_split,
            data.train_batches,
            text.token_loss,
            text.evaluate,
            np.zeros(len(split.labels), dtype=int),
            "label_purity_excess",
            data,
        )
    raise ValueError(f"dataset.name must be one of ['arithmetic', 'text'], got {dataset.name!r}")
