"""Weights & Biases tracking: one run per Hydra job, offline unless an API key is set.

Offline runs never touch the network; `wandb sync <run dir>` uploads them later.

What a user compares in the UI is what this module writes:
- runs named short (method, data, seed), in one group per sweep or study, with a
  `job_type` (run, job, trial, study, comparison) and flat config keys to filter by;
- every series declared with `define_metric` (its step axis and summary);
- every scalar of `summary.json` in the run summary, nested keys joined by "/", never
  overwritten by a table (tables live under `tables/`, charts under `charts/`);
- tables with numeric columns (NaN where missing) and native charts (line series,
  bars); the PNG figures are copies for the run directory.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from polca_study.reporting.keys import STUDY_ENV, TRIAL_ENV  # noqa: F401  (the job's W&B config names them)

log = logging.getLogger(__name__)
STEP = "trainer/step"  # the training step axis of every training-time series


def resolve_mode(mode: str) -> str:
    """ "auto" is online with WANDB_API_KEY set, offline otherwise (never waits on a login)."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


def group_name(logger_cfg, sweep_dir: str | os.PathLike | None) -> str | None:
    """One group per sweep or study: `logger.group`, else the sweep directory's name. Its
    jobs (trials), its study summaries and its comparison run all use it."""
    group = getattr(logger_cfg, "group", None) if logger_cfg is not None else None
    if group:
        return str(group)
    return Path(sweep_dir).name if sweep_dir else None


def flat_summary(metrics: dict[str, Any], prefix: str = "") -> dict[str, float | int | str]:
    """Every scalar of a nested metrics dict under a "/"-joined key (lists by position,
    from 1 for rankings such as top_carry); booleans as 0/1, None left out."""
    out: dict[str, float | int | str] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_summary(value, f"{name}/"))
        elif isinstance(value, (list, tuple)):
            out.update(flat_summary({str(i + 1): v for i, v in enumerate(value)}, f"{name}/"))
        elif isinstance(value, (bool, np.bool_)):
            out[name] = int(value)
        elif isinstance(value, (int, float, np.integer, np.floating)):
            out[name] = value.item() if isinstance(value, np.generic) else value
        elif isinstance(value, str):
            out[name] = value
    return out


def numeric_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """A table W&B can sort and plot: numeric columns stay numbers (missing as NaN),
    columns of text stay text, anything else (lists, dicts) becomes its text."""
    out = frame.reset_index(drop=True).copy()
    for column in out.columns:
        values = out[column]
        if values.dtype == object:
            numbers = pd.to_numeric(values, errors="coerce")
            if numbers.notna().sum() == values.notna().sum():
                out[column] = numbers.astype(float)
            else:
                out[column] = values.map(lambda v: None if v is None else str(v))
        elif values.dtype == bool:
            out[column] = values.astype(int)
    return out


class Tracker:
    """A thin wrapper that is a no-op when W&B is disabled."""

    def __init__(self, run=None):
        self.run = run

    @property
    def active(self) -> bool:
        return self.run is not None

    @property
    def path(self) -> str | None:
        """entity/project/run id (an offline run has no entity yet: project/run id)."""
        if self.run is None:
            return None
        return "/".join(p for p in (self.run.entity, self.run.project, self.run.id) if p)

    def define_training_metrics(self) -> None:
        """Training-time series against the training step; summaries that mean something
        (the lowest loss, the highest accuracy), not the last logged value by accident."""
        if self.run is None:
            return
        self.run.define_metric(STEP)
        for pattern, summary in (
            ("train/loss", "min"),
            ("eval/loss", "min"),
            ("eval/accuracy", "max"),
            ("eval_loss/*", "min"),
            ("eval_accuracy/*", "max"),
        ):
            self.run.define_metric(pattern, step_metric=STEP, summary=summary)

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        """Nested metrics flattened (see `flat_summary`) into the run summary."""
        if self.run is not None:
            self.run.summary.update(flat_summary(data))

    def images(self, paths: dict[str, Path]) -> None:
        if self.run is not None and paths:
            import wandb

            self.run.log({f"figures/{k}": wandb.Image(str(p)) for k, p in paths.items()})

    def table(self, key: str, frame: pd.DataFrame) -> None:
        """`tables/<key>`, numeric columns kept numeric."""
        if self.run is not None and len(frame):
            import wandb

            self.run.log({f"tables/{key}": wandb.Table(dataframe=numeric_frame(frame))})

    def line_series(
        self, key: str, xs: list, ys: list, names: list[str], title: str, xname: str = "step"
    ) -> None:
        """`charts/<key>`: a native line plot of several series (xs shared or one per series)."""
        if self.run is not None and ys:
            import wandb

            ys = [[float(v) if math.isfinite(float(v)) else None for v in y] for y in ys]
            xs = [list(map(float, x)) for x in xs] if xs and np.ndim(xs[0]) else list(map(float, xs))
            chart = wandb.plot.line_series(xs=xs, ys=ys, keys=list(names), title=title, xname=xname)
            self.run.log({f"charts/{key}": chart})

    def bar(self, key: str, frame: pd.DataFrame, label: str, value: str, title: str) -> None:
        """`charts/<key>`: a native bar chart of `value` per `label`."""
        if self.run is not None and len(frame):
            import wandb

            table = wandb.Table(dataframe=numeric_frame(frame[[label, value]]))
            self.run.log({f"charts/{key}": wandb.plot.bar(table, label, value, title=title)})

    def scatter(self, key: str, frame: pd.DataFrame, x: str, y: str, title: str) -> None:
        if self.run is not None and len(frame):
            import wandb

            table = wandb.Table(dataframe=numeric_frame(frame))
            self.run.log({f"charts/{key}": wandb.plot.scatter(table, x, y, title=title)})

    def artifact(self, name: str, kind: str, paths: list[Path], metadata: dict | None = None) -> None:
        if self.run is not None:
            import wandb

            art = wandb.Artifact(name, type=kind, metadata=metadata or {})
            for p in paths:
                art.add_file(str(p))
            self.run.log_artifact(art)

    def finish(self, failed: bool = False) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)
            self.run = None


def start(
    logger_cfg,
    config: dict,
    run_dir: Path,
    *,
    group: str | None,
    job_type: str,
    name: str | None,
    tags: list[str],
) -> Tracker:
    mode = resolve_mode(logger_cfg.mode)
    if mode == "disabled":
        return Tracker()
    import wandb

    run = wandb.init(
        project=logger_cfg.project,
        entity=logger_cfg.entity,
        group=logger_cfg.group or group,
        job_type=job_type,
        name=name,
        tags=list(dict.fromkeys([*logger_cfg.tags, *tags])),
        config=config,
        dir=str(run_dir),
        mode=mode,
        reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    log.info("W&B %s run %s in %s", mode, run.id, run.dir)
    return Tracker(run)


@contextmanager
def sweep_run(
    logger_cfg,
    sweep_dir: str | os.PathLike,
    config: dict,
    *,
    job_type: str,
    tags: list[str],
    name: str | None = None,
) -> Iterator[Tracker]:
    """A run in a sweep's group that summarises it (the comparison, a study), finished
    however the body ends. Its name defaults to `<group>-<job_type>`."""
    group = group_name(logger_cfg, sweep_dir)
    tracker = start(
        logger_cfg,
        config,
        Path(sweep_dir),
        group=group,
        job_type=job_type,
        name=name or f"{group}-{job_type}",
        tags=tags,
    )
    try:
        yield tracker
    finally:
        tracker.finish()
