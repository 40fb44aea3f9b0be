"""A Hydra app of a second per trial for the sweeper's tests: a known objective of three
parameters, with the faults the tests inject (a slow trial to kill, a trial that fails
once) driven by environment variables."""

import os
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path=".", config_name="config")
def main(cfg: DictConfig) -> float:
    trial = os.environ.get("POLCA_TRIAL_NUMBER")
    time.sleep(float(os.environ.get("SWEEP_APP_SLEEP", "0")))
    fail_once = os.environ.get("SWEEP_APP_FAIL_ONCE")  # "<trial number>:<marker file>"
    if fail_once:
        number, marker = fail_once.split(":", 1)
        if trial == number and not Path(marker).exists():
            Path(marker).write_text(f"{cfg.x} {cfg.y} {cfg.c}\n")
            raise RuntimeError(f"injected failure of trial {trial}")
    bonus = {"a": 0.0, "b": 0.3, "c": -0.2}[cfg.c]
    return -((cfg.x - 0.3) ** 2) - 0.01 * (cfg.y - 7) ** 2 + bonus + cfg.offset


if __name__ == "__main__":
    main()
