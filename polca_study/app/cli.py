"""The `polca-study` command: a thin Hydra entry point around `pipeline.run`."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from polca_study.atomic import write_text_atomic
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
        "job_num": hc.job.num if multirun else None,
    }


# Paths a user gives relative to where they ran the command (not the job's directory,
# nor a launcher worker's): always resolved, or resolved when they exist there (a hub id
# such as EleutherAI/pythia-70m is not a path).
PATHS = ("cache_dir", "dataset.data_dir", "dataset.labels")
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

    info = job_info()
    resolve_paths(cfg, HydraConfig.get().runtime.cwd)
    run_dir = info.pop("run_dir")
    try:
        metrics = run(cfg, run_dir, info)
    except ConfigError as err:  # a setting, a store or a corpus this job cannot use
        return refused(err, info, run_dir)
    objective = metrics["objective"]  # score.objective, or the task's
    if objective not in metrics:  # the run's results are written; only its objective is not
        excess = sorted(k for k in metrics if k.endswith("_excess"))
        return refused(
            ConfigError(f"score.objective={objective} is not a metric of this run; its own: {excess}"),
            info,
            run_dir,
        )
    value = metrics.get(objective)
    if metrics.get("clusters", 0) == 0:  # a search scores it (as no recovery), a user is told
        log.warning(
            "no clusters were found (method %s); loosen cluster.min_cluster_size or cluster.min_samples",
            metrics.get("method"),
        )
    if value is None or not math.isfinite(value):
        raise RuntimeError(f"the run produced no finite {objective}: {value!r}")
    return float(value)


def refused(err: ConfigError, info: dict, run_dir: str) -> float:
    """A job that cannot run as set: one line, no traceback (HYDRA_FULL_ERROR=1 shows it).
    A single run exits with 2. A trial of an Optuna study fails, for the study to record
    (and retry). A job of any other multirun records why in its directory (`failed.json`)
    and lets the others run: the comparison names it and the multirun exits with 1."""
    from polca_study.reporting.jobs import FAILED
    from polca_study.reporting.keys import STUDY_ENV

    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        raise err
    if not info["multirun"]:
        print(f"polca-study: error: {err}", file=sys.stderr)
        sys.exit(2)
    if STUDY_ENV in os.environ:
        raise err
    job = f"job {info['job_num']} ({' '.join(info['overrides'])})"
    print(f"polca-study: error: {job}: {err}", file=sys.stderr)
    record = {"job": info["job_num"], "overrides": info["overrides"], "error": str(err)}
    write_text_atomic(Path(run_dir) / FAILED, json.dumps(record, indent=2) + "\n")
    return float("nan")


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
