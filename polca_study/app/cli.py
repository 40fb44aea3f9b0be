"""The `polca-study` command: a thin Hydra entry point around `pipeline.run`."""

from __future__ import annotations

import logging
import math
import os
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from polca_study.errors import ConfigError
from polca_study.study.config import CONF_DIR, register

log = logging.getLogger("polca_study")

register()


def job_info() -> dict:
    """What tracking needs of the Hydra job: a multirun's jobs share one group (the
    sweep's, see `tracking.group_name`); the overrides and the preset go in the config."""
    hc = HydraConfig.get()
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "sweep_dir": hc.sweep.dir if multirun else None,
        "multirun": multirun,
        "overrides": list(hc.overrides.task),
        "preset": hc.runtime.choices.get("experiment") or "default",
        "run_dir": hc.runtime.output_dir,
    }


# Paths a user gives relative to where they ran the command (not the job's directory,
# nor a launcher worker's): always resolved, or resolved when they exist there (a hub id
# such as EleutherAI/pythia-70m is not a path).
PATHS = ("cache_dir", "dataset.data_dir")
PATHS_IF_THERE = ("snapshots.path", "snapshots.tokenizer")


def resolve_paths(cfg: DictConfig, cwd: str) -> None:
    for key in PATHS + PATHS_IF_THERE:
        value = OmegaConf.select(cfg, key, default=None)
        if not isinstance(value, str) or not value or os.path.isabs(os.path.expanduser(value)):
            continue
        there = os.path.join(cwd, value)
        if key in PATHS or os.path.exists(there):
            OmegaConf.update(cfg, key, there)
    files = OmegaConf.select(cfg, "dataset.files", default=None)
    if files:
        absolute = [f if os.path.isabs(os.path.expanduser(f)) else os.path.join(cwd, f) for f in files]
        OmegaConf.update(cfg, "dataset.files", absolute)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def study(cfg: DictConfig) -> float:
    from polca_study.study.pipeline import run
    from polca_study.tasks.corpus import CorpusMissing

    info = job_info()
    resolve_paths(cfg, HydraConfig.get().runtime.cwd)
    try:
        metrics = run(cfg, info.pop("run_dir"), info)
    except (ConfigError, CorpusMissing) as err:
        # a bad setting of a single run: one line, no traceback (a sweep records it as
        # its trial's failure instead; HYDRA_FULL_ERROR=1 shows the traceback)
        if HydraConfig.get().mode == RunMode.RUN and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"polca-study: error: {err}", file=sys.stderr)
            sys.exit(2)
        raise
    objective = metrics["objective"]  # the task's: carry_recovery_excess or label_purity_excess
    value = metrics.get(objective)
    if metrics.get("clusters", 0) == 0:  # a search scores it (as no recovery), a user is told
        log.warning(
            "no clusters were found (method %s); loosen cluster.min_cluster_size or cluster.min_samples",
            metrics.get("method"),
        )
    if value is None or not math.isfinite(value):
        raise RuntimeError(f"the run produced no finite {objective}: {value!r}")
    return float(value)


def main() -> None:
    """The `polca-study` command: the command line is checked first, every job of a
    multirun included, so a bad setting is one line (with a "did you mean") before any
    job starts; then Hydra runs the study."""
    from polca_study.app.preflight import check_command_line

    problem = check_command_line(sys.argv[1:])
    if problem:
        print(f"polca-study: error: {problem}", file=sys.stderr)
        sys.exit(2)
    study()


if __name__ == "__main__":
    main()
