"""Training: AdamW with linear warm-up, seeded and deterministic, snapshots streamed to disk.

Every `checkpoint_every` steps (step 0 included) the parameters go to a snapshot store
(`store.py`) as they are taken, and the evaluation losses and per-place accuracy are
recorded; the basis and the decomposition read the snapshots back one at a time, so
their intervals must be multiples of `checkpoint_every`.

Every `resume_every` snapshots the whole training state is saved beside the store
(model, optimizer, scheduler, RNG, the records so far). A killed run started again in
the same directory continues from the last save: the data stream, a seeded generator,
is replayed to that step, and on CPU the snapshots are bit-identical to those of an
uninterrupted run. Nothing is unpickled: tensors in safetensors, the rest in JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from polca_study.atomic import write_atomic
from polca_study.snapshots.run import SnapshotRun
from polca_study.snapshots.store import SnapshotStore, SnapshotWriter
from polca_study.snapshots.train_config import TrainConfig


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def train(
    model: nn.Module,
    batches,
    cfg: TrainConfig,
    token_loss: Callable[[Tensor, dict], Tensor],
    evaluate: Callable[[nn.Module], dict[str, list]],
    directory: str | os.PathLike,
    *,
    device: torch.device,
    progress: bool = True,
    model_info: dict | None = None,
    on_eval: Callable[[int, dict], None] | None = None,
) -> SnapshotRun:
    """Train `model` on `batches` (an iterator of (inputs, targets)) for `cfg.steps` steps,
    writing `directory`/snapshots (the store) and, when it already holds a saved state,
    continuing from it."""
    directory = Path(directory)
    model.to(device)
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg)
    store = SnapshotWriter.for_module(directory / "snapshots", model, model_info)
    rows: list[pd.DataFrame] = []
    train_rows: list[dict] = []
    running: list[float] = []
    start = time.perf_counter()

    def snapshot(step: int) -> None:
        model.eval()
        with torch.no_grad():
            record = evaluate(model)
        model.train()
        store.write(step, model)
        rows.append(pd.DataFrame(record).assign(step=step))
        if on_eval:
            on_eval(step, record)

    first = _restore(directory / "resume", model, opt, sched)
    if first is None:
        store.keep_until(-1)
        snapshot(0)
        first = 0
    else:
        history, train_loss = first[1], first[2]
        rows, train_rows, first = [history], train_loss.to_dict("records"), first[0]
        store.keep_until(first)
        for _ in range(first):  # replay the seeded stream to where the saved run was
            next(batches)
    bar = tqdm(range(first + 1, cfg.steps + 1), desc="train", disable=not progress, initial=first)
    for step in bar:
        running.append(_step(model, next(batches), cfg, opt, sched, token_loss, device))
        if step % cfg.checkpoint_every == 0:
            snapshot(step)
            train_rows.append({"step": step, "loss": float(np.mean(running))})
            bar.set_postfix(loss=f"{train_rows[-1]['loss']:.3f}")
            running = []
            count = step // cfg.checkpoint_every
            if cfg.resume_every and count % cfg.resume_every == 0 and step < cfg.steps:
                _save_state(directory / "resume", step, model, opt, sched, rows, train_rows)
    return _finish(directory, rows, train_rows, time.perf_counter() - start)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from 0 over `warmup_steps`, then constant."""
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )


def _step(model, batch, cfg: TrainConfig, opt, sched, token_loss, device) -> float:
    """One optimizer step on a batch (inputs, targets); returns its mean training loss."""
    inputs, targets = (x.to(device) for x in batch)
    loss = token_loss(model(inputs), {"targets": targets}).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    sched.step()
    return loss.item()


def _finish(directory: Path, rows: list, train_rows: list[dict], seconds: float) -> SnapshotRun:
    """The finished run, saved beside its store; the saved training state is dropped."""
    run = SnapshotRun(
        SnapshotStore(directory / "snapshots"),
        pd.concat(rows, ignore_index=True),
        pd.DataFrame(train_rows, columns=["step", "loss"]),
        seconds,
    )
    run.save(directory)
    shutil.rmtree(directory / "resume", ignore_errors=True)  # the finished run needs none
    return run


# ------------------------------------------------------------------ training state


def _save_state(where: Path, step: int, model, opt, sched, rows, train_rows) -> None:
    """The state at `step`, written to a new directory and then pointed to (atomic)."""
    target = where / f"step-{step:08d}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    optimizer = opt.state_dict()
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    plain_state = {}
    for index, state in optimizer["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                plain_state[f"{index}.{name}"] = value
    tensors["rng.torch"] = torch.get_rng_state()
    save_file(tensors, target / "tensors.safetensors")
    pd.concat(rows, ignore_index=True).to_parquet(target / "history.parquet", index=False)
    values = {
        "step": step,
        "param_groups": optimizer["param_groups"],
        "optimizer_values": plain_state,
        "scheduler": sched.state_dict(),
        "train_loss": train_rows,
    }
    (target / "state.json").write_text(json.dumps(values))
    write_atomic(where / "latest.json", lambda p: p.write_text(json.dumps({"directory": target.name})))
    for old in where.glob("step-*"):
        if old != target:
            shutil.rmtree(old, ignore_errors=True)


def _restore(where: Path, model, opt, sched) -> tuple[int, pd.DataFrame, pd.DataFrame] | None:
    """Load the last saved state into model, optimizer and scheduler; None if there is none."""
    pointer = where / "latest.json"
    if not pointer.exists():
        return None
    target = where / json.loads(pointer.read_text())["directory"]
    values = json.loads((target / "state.json").read_text())
    tensors = load_file(target / "tensors.safetensors")
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in values["optimizer_values"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": values["param_groups"]})
    sched.load_state_dict(values["scheduler"])
    torch.set_rng_state(tensors["rng.torch"])
    history = pd.read_parquet(target / "history.parquet")
    return values["step"], history, pd.DataFrame(values["train_loss"], columns=["step", "loss"])
