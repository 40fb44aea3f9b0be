"""Weights & Biases tracking: one run per Hydra job, offline unless an API key is set.

Offline runs never touch the network; `wandb sync <run dir>` uploads them later.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import pandas as pd

log = logging.getLogger(__name__)
# The Optuna study and trial a job runs for: the sweeper sets them in the job's
# environment, the job puts them in its W&B config (trial and run lead to each other).
STUDY_ENV, TRIAL_ENV = "POLCA_STUDY_NAME", "POLCA_TRIAL_NUMBER"


def resolve_mode(mode: str) -> str:
    """ "auto" is online with WANDB_API_KEY set, offline otherwise (never waits on a login)."""
    if mode == "auto":
        return "online" if os.environ.get("WANDB_API_KEY") else "offline"
    return mode


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

    def log(self, data: dict[str, Any], step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(data, step=step)

    def summary(self, data: dict[str, Any]) -> None:
        if self.run is not None:
            self.run.summary.update(data)

    def images(self, paths: dict[str, Path]) -> None:
        if self.run is not None and paths:
            import wandb

            self.run.log({f"figures/{k}": wandb.Image(str(p)) for k, p in paths.items()})

    def table(self, key: str, frame: pd.DataFrame) -> None:
        if self.run is not None and len(frame):
            import wandb

            self.run.log({key: wandb.Table(dataframe=frame.reset_index(drop=True))})

    def artifact(self, name: str, kind: str, paths: list[Path]) -> None:
        if self.run is not None:
            import wandb

            art = wandb.Artifact(name, type=kind)
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
        tags=list(logger_cfg.tags) + tags,
        config=config,
        dir=str(run_dir),
        mode=mode,
        reinit="finish_previous",
        settings=wandb.Settings(console="off", silent=True, x_disable_stats=True),
    )
    log.info("W&B %s run %s in %s", mode, run.id, run.dir)
    return Tracker(run)
