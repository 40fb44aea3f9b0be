"""Our trainer's settings: the `train` config group.

Apart from the trainer (`train.py`) so that the config schemas, which every
command-line check imports, import no pandas.
"""

from __future__ import annotations

from dataclasses import dataclass

from polca_study.errors import ConfigError, at_least


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.1  # on matrices and embeddings only
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 100  # linear warm-up from 0, then constant
    grad_clip: float | None = 1.0
    checkpoint_every: int = 25  # snapshot spacing; basis/polca intervals are multiples
    resume_every: int = 10  # snapshots between saves of the training state (0: never)

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every"):
            at_least(f"train.{name}", getattr(self, name), 1)
        at_least("train.warmup_steps", self.warmup_steps, 0)
        at_least("train.resume_every", self.resume_every, 0)
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
