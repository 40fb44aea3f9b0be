"""`SnapshotRun`: what every source hands the study's stages.

A snapshot store and the learning curves evaluated on it: a finished training run of
ours, or the snapshots of another source (recorded, Hugging Face revisions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from polca_study.atomic import write_atomic
from polca_study.snapshots.store import SnapshotStore


@dataclass
class SnapshotRun:
    """Snapshots and their records, read lazily: a finished training run of ours, or the
    snapshots of another source (recorded, Hugging Face revisions) with the learning
    curves evaluated on them (no training loss, 0 seconds)."""

    store: SnapshotStore
    history: pd.DataFrame  # evaluation: step, place/tag, carry, loss, accuracy, tokens
    train_loss: pd.DataFrame  # step, mean training loss over the preceding snapshot interval
    seconds: float  # training time (of the last session, when resumed)

    @property
    def steps(self) -> np.ndarray:
        return self.store.steps

    def save(self, directory: Path) -> None:
        write_atomic(directory / "history.parquet", lambda p: self.history.to_parquet(p, index=False))
        write_atomic(directory / "train_loss.parquet", lambda p: self.train_loss.to_parquet(p, index=False))
        write_atomic(directory / "run.json", lambda p: p.write_text(json.dumps({"seconds": self.seconds})))

    @classmethod
    def load(cls, directory: Path) -> SnapshotRun:
        return cls(
            SnapshotStore(directory / "snapshots"),
            pd.read_parquet(directory / "history.parquet"),
            pd.read_parquet(directory / "train_loss.parquet"),
            json.loads((directory / "run.json").read_text())["seconds"],
        )
