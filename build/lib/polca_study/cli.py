"""The `polca-study` command: a thin Hydra entry point around `pipeline.run`."""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from polca_study.config import ConfigError, register

CONF_DIR = str(Path(__file__).resolve().parent / "conf")  # installed with the package
log = logging.getLogger("polca_study")

register()


def job_info() -> dict:
    """W&B grouping from the Hydra job: a multirun's jobs share a group (its sweep
    directory) and carry their overrides as name and tags."""
    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    multirun = hc.mode == RunMode.MULTIRUN
    return {
        "group": Path(hc.sweep.dir).as_posix().replace("/", "_") if multirun else None,
        "name": ",".join(overrides) or "default",
        "tags": ["multirun" if multirun else "run"],
        "run_dir": hc.runtime.output_dir,
    }


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    from polca_study.pipeline import run

    info = job_info()
    try:
        metrics = run(cfg, info.pop("run_dir"), info)
    except ConfigError as err:
        # a bad setting of a single run: one line, no traceback (a sweep records it as
        # its trial's failure instead; HYDRA_FULL_ERROR=1 shows the traceback)
        if HydraConfig.get().mode == RunMode.RUN and os.environ.get("HYDRA_FULL_ERROR") != "1":
            print(f"polca-study: error: {err}", file=sys.stderr)
            sys.exit(2)
        raise
    objective = metrics["objective"]  # the dataset's: carry_recovery or label_purity_excess
    value = metrics.get(objective)
    if metrics.get("clusters", 0) == 0:  # a search scores it (as no recovery), a user is told
        log.warning(
            "no clusters were found (method %s); loosen cluster.min_cluster_size or cluster.min_samples",
            metrics.get("method"),
        )
    if value is None or not math.isfinite(value):
        raise RuntimeError(f"the run produced no finite {objective}: {value!r}")
    return float(value)


if __name__ == "__main__":
    main()
