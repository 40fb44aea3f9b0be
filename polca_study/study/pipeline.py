"""The study: train → basis → decompose → cluster → score → report.

`run(cfg)` is a plain function; the Hydra entry point only calls it. Expensive stages
are cached by the config that determines them (see `cache.py`), so a clustering-only
change never retrains or re-decomposes, and a killed run resumes at its last finished
stage.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from omegaconf import DictConfig, OmegaConf

from polca_study.analysis.cluster import cluster_all
from polca_study.analysis.methods import METHODS, method_curves, rising_vectors, unallocated_share
from polca_study.analysis.score import (
    breakthrough_time,
    cluster_breakthroughs,
    delta_points,
)
from polca_study.analysis.skills import skill_scores
from polca_study.atomic import write_atomic
from polca_study.core.basis import Basis
from polca_study.core.decompose import Decomposition
from polca_study.errors import ConfigError
from polca_study.reporting import tracking
from polca_study.reporting.charts import log_study_charts
from polca_study.snapshots.run import SnapshotRun
from polca_study.snapshots.store import CorruptSnapshot
from polca_study.study import environment
from polca_study.study.cache import StageCache
from polca_study.study.config import Config, validate
from polca_study.study.environment import pinned_threads
from polca_study.study.sources import make_source
from polca_study.study.stages import StageContext, other_bases, stage_basis, stage_decompose
from polca_study.tasks import TASKS, make_task
from polca_study.tasks.task import Task

log = logging.getLogger("polca_study")


# ------------------------------------------------------------------------ helpers


def peak_memory_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@contextmanager
def stage(name: str, timings: dict, memory: dict):
    """Time a stage and log a one-line summary with the process's peak memory so far."""
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start
    memory[name] = peak_memory_mb()
    log.info("[%s] %.1f s, peak memory %.0f MB", name, timings[name], memory[name])


def resolve_device(name: str) -> torch.device:
    """The validated `device` setting as a torch device; a GPU this machine lacks is a
    setting it cannot take."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device={name}, but torch finds no CUDA device here: use device=cpu or device=auto"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device={name}, but this machine has {torch.cuda.device_count()} CUDA devices")
    return device


# ---------------------------------------------------------------------- analysis


def analyse(cfg: Config, task: Task, method: str, traj: Decomposition, lca: Decomposition | None):
    """Cluster one method's curves and score them. Returns (metrics, tables, assignments,
    curves): tables holds "clusters" (one row per cluster), and for text "contexts";
    assignments (n, columns) the cluster of each token per column (-2: a dropped column)."""
    labels = task.eval_split.labels
    curves = method_curves(method, traj, lca)
    dropped: list[int] = []
    keep = np.arange(curves.curves.shape[2])
    if cfg.basis.drop_rising and METHODS[method].basis_columns:
        dropped = rising_vectors(traj).tolist()
        keep = np.setdiff1d(keep, dropped)
        if dropped:
            log.info("dropped %d basis vectors whose mean projected loss rises: %s", len(dropped), dropped)
    kept = curves.curves[:, :, keep]
    assign = cluster_all(kept, task.groups, cfg.cluster, curves.rises[:, keep])
    s = cfg.score
    table, metrics, tables = task.score(cfg, assign, kept, labels, curves.curves.shape[2])
    # hidden: later than the aggregate loss's own breakthrough by a margin
    aggregate = traj.losses.mean(axis=0)
    aggregate_step = breakthrough_time(aggregate, traj.steps, delta_points(traj.steps, s.breakthrough_delta))
    breakthroughs = cluster_breakthroughs(
        assign, kept, curves.steps, s.breakthrough_delta, aggregate_step + s.hidden_margin
    )
    for frame in (table, breakthroughs, *tables.values()):  # kept-column indices -> the method's
        if len(frame):
            frame["vector"] = keep[frame["vector"].to_numpy()]
    table = table.merge(breakthroughs, on=["vector", "cluster"], how="left")
    _remap_columns(metrics, keep, curves.curves.shape[2])
    tables["clusters"] = table
    metrics = {
        "method": method,
        "basis": cfg.basis.kind,
        "second_order": cfg.polca.second_order,
        "seed": cfg.seed,
        "dataset": task.name,
        "vectors": int(curves.curves.shape[2]),
        "vectors_dropped": dropped,
        "clusters": int(len(table)),
        **metrics,
        "aggregate_breakthrough_step": aggregate_step,
        "hidden_breakthrough_fraction": float(table["hidden"].mean()) if len(table) else 0.0,
    }
    if "label" in labels:  # a label file's skills, each against its null
        metrics.update(_skill_metrics(cfg, assign, labels["label"].to_numpy(object), traj, keep))
    metrics["objective"] = s.objective or task.objective
    full = np.zeros((len(labels), curves.curves.shape[2]), dtype=int) - 2
    full[:, keep] = assign
    return metrics, tables, full, curves


def _skill_metrics(cfg: Config, assign: np.ndarray, labels: np.ndarray, traj: Decomposition, keep) -> dict:
    """Each label's scores, nested under `labels` and flat (`label_<name>_<score>`)."""
    s = cfg.score
    skills = skill_scores(
        assign,
        labels,
        traj.losses,
        traj.steps,
        s.breakthrough_delta,
        s.hidden_margin,
        s.permutations,
        cfg.seed,
    )
    out: dict = {"labels": {}}
    for name, score in skills.items():
        # the top cluster's column among the method's, as in the cluster tables
        score = replace(score, top_vector=int(keep[score.top_vector]) if score.top_vector >= 0 else -1)
        out["labels"][name] = asdict(score)
        out.update(score.flat(name))
    return out


def _remap_columns(metrics: dict, keep: np.ndarray, width: int) -> None:
    """Per-column metrics name a column by its index in the method's columns (a dropped
    basis vector's entry is None), as the cluster tables do, not by its kept position."""
    for key, value in metrics.items():
        if key.endswith("_per_vector") and isinstance(value, list) and len(value) == len(keep):
            full: list = [None] * width
            for position, column in enumerate(keep):
                full[column] = value[position]
            metrics[key] = full
        elif key.startswith("top_") and isinstance(value, list):
            for entry in value:
                entry["vector"] = int(keep[entry["vector"]])


def approximation_error(traj: Decomposition) -> dict[str, float]:
    """RMSE and relative error of the paper's second-order term against the exact one."""
    if traj.exact_second is None or traj.paper_second is None:
        return {}
    exact, paper = traj.exact_second, traj.paper_second
    rmse = float(np.sqrt(np.mean((paper - exact) ** 2)))
    scale = float(np.sqrt(np.mean(exact**2)))
    return {
        "paper_second_order_rmse": rmse,
        "paper_second_order_relative_error": rmse / scale if scale > 0 else float("nan"),
    }


def trajectories_frame(traj: Decomposition, labels: pd.DataFrame) -> pd.DataFrame:
    """Long table: one row per (token, evaluation interval) with labels, loss, loss
    change and POLCA per basis vector."""
    n, T, m = traj.polca.shape
    steps = traj.steps
    # contexts stay in contexts.csv; a text token's string is "token_text"
    labels = labels.drop(columns=["context"], errors="ignore").rename(columns={"token": "token_text"})
    frame = labels.loc[np.repeat(np.arange(n), T)].reset_index(names="token")
    frame["step"] = np.tile(steps[1:], n)
    frame["loss"] = traj.losses[:, 1:].reshape(-1)
    frame["loss_change"] = np.diff(traj.losses, axis=1).reshape(-1)
    polca = traj.polca.reshape(n * T, m)
    return pd.concat([frame, pd.DataFrame(polca, columns=[f"polca_{j}" for j in range(m)])], axis=1)


# --------------------------------------------------------------------------- run


def run(cfg: DictConfig, run_dir: str | os.PathLike = ".", job: dict | None = None) -> dict:
    """Run one study; returns the metrics written to `summary.json`."""
    settings = validate(cfg)  # fails before any work
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = job or {}
    device = resolve_device(settings.device)
    with pinned_threads(settings.num_threads) as threads:
        env = environment.describe(threads, device)
        cache = StageCache(settings.cache_dir, set(settings.force), env)
        trial = study_trial()
        tracker = tracking.start(
            settings.logger,
            {**OmegaConf.to_container(cfg, resolve=True), **run_keys(settings, job), **trial},
            run_dir,
            group=tracking.group_name(settings.logger, job.get("sweep_dir")),
            job_type="trial" if trial else ("job" if job.get("multirun") else "run"),
            name=run_name(settings, trial),
            tags=[],
        )
        failed = True
        try:
            metrics = _run(settings, cfg, run_dir, cache, tracker, device, {"environment": env, **trial})
            failed = False
            return metrics
        finally:
            tracker.finish(failed=failed)


def run_name(cfg: Config, trial: dict) -> str:
    """Short and meaningful: method, data setting, seed (and the trial in a study)."""
    name = f"{cfg.method.name}-{cfg.dataset.label}-s{cfg.seed}"
    return f"{name}-t{trial['optuna_trial']}" if trial else name


def run_keys(cfg: Config, job: dict) -> dict:
    """Flat config keys to filter and group runs by in the W&B UI (the full config is
    there too, nested), and the command's overrides."""
    return {
        "preset": job.get("preset", "default"),
        "task": cfg.dataset.name,
        "method_name": cfg.method.name,
        "data": cfg.dataset.label,
        "basis_kind": cfg.basis.kind,
        "second_order": cfg.polca.second_order,
        "overrides": job.get("overrides", []),
    }


def study_trial() -> dict:
    """The Optuna study and trial this job runs for (the sweeper sets them in the job's
    environment), so a W&B run leads to its trial."""
    if tracking.STUDY_ENV not in os.environ:
        return {}
    return {
        "optuna_study": os.environ[tracking.STUDY_ENV],
        "optuna_trial": int(os.environ[tracking.TRIAL_ENV]),
    }


@dataclass
class Computed:
    """What the cached stages give a job: its task, snapshots, basis and decompositions."""

    task: Task
    snapshots: SnapshotRun
    basis: Basis
    traj: Decomposition  # POLCA along the basis
    lca: Decomposition | None  # along the method's own parameters (LCA's), if it has any
    keys: dict[str, str]  # the cache keys of the train, basis and decompose stages


def _run(
    cfg: Config, raw: DictConfig, run_dir: Path, cache: StageCache, tracker, device, context: dict
) -> dict:
    timings: dict[str, float] = {}
    memory: dict[str, float] = {}
    write_atomic(run_dir / "config.yaml", lambda p: p.write_text(OmegaConf.to_yaml(raw, resolve=True)))
    done = _compute(cfg, cache, tracker, device, timings, memory)
    with stage("cluster+score", timings, memory):
        metrics, tables, assign, curves = analyse(cfg, done.task, cfg.method.name, done.traj, done.lca)
    metrics.update(approximation_error(done.traj))
    metrics["unallocated_share"] = unallocated_share(cfg.method.name, done.traj, done.lca)
    history = done.snapshots.history
    final_acc = history[history.step == history.step.max()]
    basis = done.basis
    metrics.update(
        {
            "final_accuracy": float(np.average(final_acc.accuracy, weights=final_acc.tokens)),
            "basis_residual_max": float(np.nanmax(basis.residuals.numpy())) if basis.hvps else float("nan"),
            "basis_hvps": int(basis.hvps),
            "cache_hits": dict(cache.hits),
            "seconds": {**timings, "train_compute": float(done.snapshots.seconds)},
            "peak_memory_mb": peak_memory_mb(),
            "peak_memory_mb_after": memory,
            "wandb_run": tracker.path,
            **context,
        }
    )
    with stage("report", timings, memory):
        _report(cfg, run_dir, done, metrics, tables, assign, curves, tracker)
    log.info(done.task.headline(metrics, run_dir))
    return metrics


def _compute(cfg: Config, cache: StageCache, tracker, device, timings: dict, memory: dict) -> Computed:
    """The cached stages, in order: data, snapshots (trained or imported), basis, decompositions."""
    source = make_source(cfg)
    source.check_settings()  # before any work
    with stage("data", timings, memory):
        task = make_task(cfg.dataset, cache)
    with stage("train", timings, memory):  # or the snapshots of another source
        snapshots, train_key = source.prepare(task, cache, device, cfg.progress)
    tracker.define_training_metrics()
    _log_history(tracker, snapshots.history, snapshots.train_loss, TASKS[task.name].history_group)
    ctx = StageContext(cfg, task, source, snapshots, train_key, cache, device, cfg.progress)
    try:
        basis, traj, lca, keys = _basis_and_decompositions(ctx, timings, memory)
    except CorruptSnapshot as err:  # found at the first read: the source makes its store again
        snapshots, train_key = source.again(err, task, cache, device, cfg.progress)
        ctx = replace(ctx, run=snapshots, train_key=train_key)
        basis, traj, lca, keys = _basis_and_decompositions(ctx, timings, memory)
    return Computed(task, snapshots, basis, traj, lca, {"train": train_key, **keys})


def _basis_and_decompositions(ctx: StageContext, timings: dict, memory: dict):
    """The basis, the decomposition along it and, for a method with its own directions
    (LCA), along those; and the cache keys of the first two."""
    cfg = ctx.cfg
    with stage("basis", timings, memory):
        basis, basis_key = stage_basis(ctx)
    with stage("decompose", timings, memory):
        traj, decompose_key = stage_decompose(
            ctx, lambda: basis.vectors, basis_key, "decompose", cfg.polca.second_order, other_bases(ctx)
        )
        lca = None
        parameters = METHODS[cfg.method.name].parameters
        if parameters is not None:  # the method's own directions: single parameters
            lca, _ = stage_decompose(
                ctx,
                lambda: parameters.choose(ctx.run),
                f"{ctx.train_key}/{parameters.name}",
                parameters.name,
                "none",
            )
    return basis, traj, lca, {"basis": basis_key, "decompose": decompose_key}


def _report(
    cfg: Config, run_dir: Path, done: Computed, metrics: dict, tables: dict, assign, curves, tracker
) -> None:
    """summary.json, clusters.csv, trajectories, assignments, the task's own outputs and
    figures, and the W&B run's summary, tables, charts and artifact."""
    task, history, labels = done.task, done.snapshots.history, done.task.eval_split.labels
    table = tables["clusters"]
    write_atomic(
        run_dir / "summary.json", lambda p: p.write_text(json.dumps(metrics, indent=2, default=_jsonable))
    )
    write_atomic(run_dir / "clusters.csv", lambda p: table.to_csv(p, index=False))
    if cfg.save_trajectories:
        frame = trajectories_frame(done.traj, labels)
        write_atomic(run_dir / "trajectories.parquet", lambda p: frame.to_parquet(p, index=False))
    write_atomic(run_dir / "assignments.npy", lambda p: _save_npy(p, assign))
    task.write_outputs(run_dir, metrics, tables, tracker)
    figures = task.figures(run_dir / "figures", history, curves, assign, labels, table) if cfg.figures else {}
    tracker.summary(metrics)
    tracker.images(figures)
    tracker.table("clusters", table)
    history_group = TASKS[task.name].history_group
    log_study_charts(tracker, task.skill, history_group, history, done.traj, curves, assign, labels, table)
    if cfg.logger.log_artifacts and cfg.save_trajectories:
        # named by the decomposition it holds, so a version means the same inputs
        tracker.artifact(
            f"trajectories-{cfg.method.name}-{done.keys['decompose']}",
            "trajectories",
            [run_dir / "trajectories.parquet", run_dir / "clusters.csv"],
            metadata={"cache_keys": done.keys, "stages": stage_specs(cfg), "run": run_name(cfg, {})},
        )


def stage_specs(cfg: Config) -> dict:
    """The configs of the cached stages a decomposition comes from."""
    return {
        "dataset": asdict(cfg.dataset),
        "model": asdict(cfg.model),
        "train": asdict(cfg.train),
        "snapshots": asdict(cfg.snapshots),
        "basis": asdict(cfg.basis),
        "polca": asdict(cfg.polca),
    }


def _log_history(tracker, history: pd.DataFrame, train_loss: pd.DataFrame | None, history_group) -> None:
    """Training loss, and evaluation loss and accuracy overall and per group (the task's
    `history_group` of each learning-curve row)."""
    if not tracker.active:
        return
    train = {} if train_loss is None else dict(zip(train_loss.step, train_loss.loss, strict=True))
    for step, rows in history.groupby("step"):
        w = rows.tokens
        data = {
            tracking.STEP: int(step),
            "eval/loss": float(np.average(rows.loss, weights=w)),
            "eval/accuracy": float(np.average(rows.accuracy, weights=w)),
        }
        if step in train:
            data["train/loss"] = train[step]
        for _, r in rows.iterrows():
            group = history_group(r).replace(" ", "_")
            data[f"eval_loss/{group}"] = r.loss
            data[f"eval_accuracy/{group}"] = r.accuracy
        tracker.log(data, step=int(step))


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a name
        np.save(f, array)


def _jsonable(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
