"""Training: AdamW with linear warm-up, seeded and deterministic, with parameter snapshots.

Snapshots of the flat parameter vector are kept every `checkpoint_every` steps (step 0
included); the basis and the decomposition read them, so their intervals must be
multiples of it. Evaluation losses and per-place accuracy are recorded at each snapshot.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from tqdm.auto import tqdm

from polca_study.model import Transformer
from polca_study.polca import flatten_parameters


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


@dataclass
class TrainResult:
    steps: np.ndarray  # (C,) snapshot steps
    snapshots: Tensor  # (C, d) flat parameters, float32
    history: pd.DataFrame  # evaluation: step, place, carry, loss, accuracy, tokens
    train_loss: pd.DataFrame  # step, mean training loss over the preceding snapshot interval
    seconds: float


def make_optimizer(model: Transformer, cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )


def train(
    model: Transformer,
    batches,
    cfg: TrainConfig,
    token_loss: Callable[[Tensor, dict], Tensor],
    evaluate: Callable[[Transformer], dict[str, list]],
    *,
    device: torch.device,
    progress: bool = True,
    on_eval: Callable[[int, dict], None] | None = None,
) -> TrainResult:
    """Train `model` on `batches` (an iterator of (inputs, targets)) for `cfg.steps` steps."""
    model.to(device)
    opt = make_optimizer(model, cfg)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    )
    steps, snaps, rows, train_rows, running = [], [], [], [], []
    start = time.perf_counter()

    def snapshot(step: int) -> None:
        model.eval()
        with torch.no_grad():
            record = evaluate(model)
        model.train()
        steps.append(step)
        snaps.append(flatten_parameters(model).float().cpu())
        frame = pd.DataFrame(record).assign(step=step)
        rows.append(frame)
        if on_eval:
            on_eval(step, record)

    snapshot(0)
    bar = tqdm(range(1, cfg.steps + 1), desc="train", disable=not progress)
    for step in bar:
        inputs, targets = next(batches)
        inputs, targets = inputs.to(device), targets.to(device)
        loss = token_loss(model(inputs), {"targets": targets}).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        running.append(loss.item())
        if step % cfg.checkpoint_every == 0:
            snapshot(step)
            train_rows.append({"step": step, "loss": float(np.mean(running))})
            bar.set_postfix(loss=f"{train_rows[-1]['loss']:.3f}")
            running = []
    return TrainResult(
        steps=np.asarray(steps),
        snapshots=torch.stack(snaps),
        history=pd.concat(rows, ignore_index=True),
        train_loss=pd.DataFrame(train_rows, columns=["step", "loss"]),
        seconds=time.perf_counter() - start,
    )
