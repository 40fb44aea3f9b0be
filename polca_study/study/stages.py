"""The cached analysis stages between the snapshots and the clustering: the basis and
the decompositions along it (or along single parameters). Each is a function of a
`StageContext` and is cached under the config that determines it (`cache.py`)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch

from polca_study.core.basis import Basis
from polca_study.core.decompose import SHARED_PASS_MODES, Decomposition, decompose_trajectories
from polca_study.core.derivatives import SecondOrderError, check_second_order
from polca_study.core.directions import Coordinates
from polca_study.core.module_loss import ModuleLoss
from polca_study.errors import ConfigError
from polca_study.snapshots.run import SnapshotRun
from polca_study.snapshots.store import CorruptSnapshot
from polca_study.study.bases import KINDS
from polca_study.study.cache import StageCache, stage_key
from polca_study.study.config import Config
from polca_study.study.sources import Source, snapshot_steps
from polca_study.tasks.task import Task

log = logging.getLogger("polca_study")


@dataclass(frozen=True)
class StageContext:
    """What every analysis stage reads: the run's config, its task, where its snapshots
    come from and the snapshots themselves (trained here or imported), the stage cache."""

    cfg: Config
    task: Task
    source: Source
    run: SnapshotRun  # the snapshots, trained here or imported, and their learning curves
    train_key: str  # the snapshots' cache key, the parent of every stage below
    cache: StageCache
    device: torch.device
    progress: bool


def steps_at(run: SnapshotRun, every: int, last: int, least: int = 1) -> np.ndarray:
    """The stored steps that are multiples of `every` and ≤ last; at least `least`."""
    steps = snapshot_steps(run, every, last)
    if len(steps) < least:
        raise ConfigError(
            f"an interval of {every} steps leaves {len(steps)} of the stored snapshots "
            f"(steps {run.steps[:5].tolist()}...); this stage needs {least}: choose an "
            "interval that divides more of them"
        )
    return steps


def basis_spec(ctx: StageContext) -> dict:
    """What determines the basis: its cache spec."""
    b = ctx.cfg.basis
    spec = {
        "train": ctx.train_key,
        "kind": b.kind,
        "k": b.k,
        "interval": b.interval,
        "tol": b.tol,
        "maxiter": b.maxiter,
        "seed": b.seed,
    }
    if b.chunk_size is not None:  # sums in another order: another basis in its last bits
        spec["chunk_size"] = b.chunk_size
    return spec


def stage_basis(ctx: StageContext) -> tuple[Basis, str]:
    """The basis of kind `basis.kind` (bases.KINDS) at every multiple of the interval
    but the last snapshot (no interval follows it)."""

    b = ctx.cfg.basis

    def compute() -> Basis:
        return KINDS[b.kind](ctx, steps_at(ctx.run, b.interval, int(ctx.run.steps[-1]) - 1))

    return ctx.cache.get_or_compute("basis", basis_spec(ctx), compute, Basis)


def other_bases(ctx: StageContext) -> list[tuple[Callable[[], torch.Tensor], str]]:
    """The bases of the kinds in `polca.alongside` other than this run's, as (their
    vectors on demand, their basis key): the decompositions a decompose pass computes
    beside its own. A basis is computed (or read) only if its decomposition is missing,
    through a view of the cache whose hits are not the job's own."""
    out = []
    for kind in dict.fromkeys(ctx.cfg.polca.alongside):
        if kind == ctx.cfg.basis.kind:
            continue
        cfg = replace(ctx.cfg, basis=replace(ctx.cfg.basis, kind=kind))
        other = replace(ctx, cfg=cfg, cache=ctx.cache.aside())
        out.append((lambda other=other: _vectors_aside(other), stage_key("basis", basis_spec(other))))
    return out


def _vectors_aside(ctx: StageContext) -> torch.Tensor:
    start = time.perf_counter()
    vectors = stage_basis(ctx)[0].vectors
    log.info(
        "%s basis for a decomposition alongside: %.1f s", ctx.cfg.basis.kind, time.perf_counter() - start
    )
    return vectors


def stage_decompose(
    ctx: StageContext,
    directions: Callable[[], torch.Tensor | Coordinates],
    parent_key: str,
    name: str,
    second_order: str,
    alongside: Sequence[tuple[Callable[[], torch.Tensor | Coordinates], str]] = (),
) -> tuple[Decomposition, str]:
    """POLCA of every evaluation token along `directions()` between evaluation points,
    reading the snapshots one at a time (a cache hit needs neither). Cached as stage
    `name` under the directions' key `parent_key`.

    `alongside`: other (directions, key) whose decompositions, when missing, are computed
    in the same pass and cached as if computed alone (they are the same bit for bit). Only
    the first-order-only modes share work across sets; the others ignore it."""
    if second_order == "paper":
        # the exact decomposition holds the paper's approximation beside the exact term:
        # one cached decomposition serves both modes (a `paper` job after an `exact` one
        # computes nothing; alone it costs about 1.2x the paper route)
        exact, key = stage_decompose(ctx, directions, parent_key, name, "exact")
        return exact.as_paper(), f"{key}-paper"
    cfg, task, device = ctx.cfg, ctx.task, ctx.device
    members = [(directions, parent_key)]
    if second_order in SHARED_PASS_MODES:
        members += [(d, k) for d, k in alongside if k != parent_key]
    settings = {"interval": cfg.polca.interval, "second_order": second_order, "route": cfg.polca.route}
    specs = [{"parent": key, **settings} for _, key in members]  # keys are hashed sorted

    def compute(missing: list[int]) -> list[Decomposition]:
        if len(missing) > 1:
            log.info("decomposing along %d sets of directions in one pass", len(missing))
        sets, kept = _directions(members, missing)
        steps = steps_at(ctx.run, cfg.polca.interval, int(ctx.run.steps[-1]), least=2)
        thetas = ctx.run.store.sequence(steps, device=device)
        model = ctx.source.model(task).to(device)
        batch = {k: v.to(device) for k, v in task.eval_split.batch().items()}
        loss = ModuleLoss(model, batch, task.token_loss)
        if second_order == "exact":  # before any work: nested forward mode must be right here
            _check_exact(model, batch, task.token_loss, thetas[0])
        trajs = decompose_trajectories(
            loss,
            thetas,
            [v if isinstance(v, Coordinates) else v.to(device) for v in sets],
            second_order,
            route=cfg.polca.route,
            progress=ctx.progress,
        )
        done = {
            i: traj.numpy(steps, v.indices.numpy() if isinstance(v, Coordinates) else None)
            for i, traj, v in zip(kept, trajs, sets, strict=True)
        }
        return [done.get(i) for i in missing]

    return ctx.cache.get_or_compute_together(name, specs, compute, Decomposition)[0]


def _directions(members: list, missing: list[int]) -> tuple[list, list[int]]:
    """The directions of the missing members, and which members they are. Another
    basis that fails to build is logged and left to its own job; the job's own fails."""
    sets, kept = [], []
    for i in missing:
        try:
            sets.append(members[i][0]())
            kept.append(i)
        except CorruptSnapshot:  # the snapshots every set is read from: the job's own fault
            raise
        except Exception as err:  # noqa: BLE001  another basis's failure is its own job's
            if i == 0:
                raise
            log.warning("no decomposition along %s alongside: %s", members[i][1], err)
    return sets, kept


def _check_exact(model, batch: dict, token_loss, theta: torch.Tensor) -> None:
    """The exact second order on this model agrees with double backward, on two rows."""
    check = ModuleLoss(model, {k: v[:2] for k, v in batch.items()}, token_loss)
    try:
        error = check_second_order(check, theta)
    except SecondOrderError as err:  # a setting this model cannot take: one clear line
        raise ConfigError(str(err)) from err
    log.info("exact second order checked against double backward: relative error %.1e", error)
