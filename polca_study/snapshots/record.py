"""Record snapshots of any PyTorch training loop into a snapshot store.

    recorder = SnapshotRecorder("runs/mine", every=50)   # model: what rebuilds it (optional)
    for step, batch in enumerate(loader):
        ...
        recorder.step(model, step)     # writes when step % every == 0
    recorder.close()                   # or: with SnapshotRecorder(...) as recorder:

The directory then holds the store of `store.py` (the format our own training
writes), read by `SnapshotStore` and by `polca-study snapshots=recorded
snapshots.path=<directory>`. Parameters are stored in float32 by default (the precision
POLCA works in). `model` is what a reader needs to rebuild the module, kept in the
manifest; left out, it is filled in for polca-study's Transformer and for `transformers`
models (their config); any other model is rebuilt by the function the reader names in
`snapshots.factory` (called with `model["config"]` as keyword arguments).

Thin adapters for PyTorch Lightning (`LightningRecorder`) and the Hugging Face
`Trainer` (`HFTrainerRecorder`) follow their host's hooks; both import their framework
only when built.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from polca_study.snapshots.architecture import model_info
from polca_study.snapshots.store import SnapshotWriter, parameters_of


class SnapshotRecorder:
    def __init__(
        self,
        directory: str | os.PathLike,
        every: int = 1,
        model: dict | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be an integer >= 1, got {every!r}")
        self.directory, self.every, self.model, self.dtype = Path(directory), every, model, dtype
        self._writer: SnapshotWriter | None = None
        self._last: int | None = None

    def step(self, module: nn.Module, step: int, force: bool = False) -> bool:
        """Write `module`'s trainable parameters at `step` if it is a multiple of `every`
        (or `force`), once: hooks that run every micro-batch (gradient accumulation) see
        the same optimizer step several times. Returns whether it wrote."""
        if not force and (step % self.every or step == self._last):
            return False
        if self._writer is None:
            info = self.model if self.model is not None else model_info(module)
            self._writer = SnapshotWriter(self.directory, parameters_of(module, self.dtype), info)
        self._writer.write(step, {n: p for n, p in module.named_parameters() if p.requires_grad})
        self._last = step
        return True

    @property
    def steps(self) -> list[int]:
        return self._writer.steps if self._writer else []

    def close(self) -> None:
        """Nothing is buffered (every snapshot is on disk when `step` returns); kept so a
        loop can say where recording ends."""
        self._writer = None

    def __enter__(self) -> SnapshotRecorder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def LightningRecorder(directory: str | os.PathLike, every: int = 1, model: dict | None = None):  # noqa: N802
    """A `lightning.pytorch.Callback` that records after every `every`-th optimizer step
    (and the initial parameters), resuming with the run: the store is reopened as is."""
    import lightning.pytorch as pl

    class _Recorder(pl.Callback):
        def __init__(self):
            self.recorder = SnapshotRecorder(directory, every, model)

        def on_train_start(self, trainer, pl_module):
            if trainer.global_step == 0:
                self.recorder.step(pl_module, 0)

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.recorder.step(pl_module, trainer.global_step)

        def state_dict(self):
            return {"directory": str(directory), "every": every}

    return _Recorder()


def HFTrainerRecorder(directory: str | os.PathLike, every: int = 1, model: dict | None = None):  # noqa: N802
    """A `transformers.TrainerCallback` that records at step 0 and after every `every`-th
    optimizer step (`on_step_end`, where `state.global_step` counts optimizer steps)."""
    from transformers import TrainerCallback

    class _Recorder(TrainerCallback):
        def __init__(self):
            self.recorder = SnapshotRecorder(directory, every, model)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            if state.global_step == 0 and model is not None:
                self.recorder.step(model, 0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                self.recorder.step(model, state.global_step)

    return _Recorder()
