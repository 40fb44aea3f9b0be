"""A Hydra sweeper for current Optuna: trials are Hydra jobs, studies live in any Optuna
storage (SQLite by default, PostgreSQL for many workers) and a study is a function of its
command: run twice, killed and rerun, or with more launcher jobs, it holds the same trials."""

# No `from __future__ import annotations`: Hydra imports plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore

from polca_study.reporting.keys import RUN_KEYS


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid | cmaes
    # Trial k samples with a seed derived from (seed, k), never from the trials present;
    # None: unseeded (not reproducible).
    seed: int | None = 0


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.polca_optuna_sweeper.sweeper.OptunaSweeper"
    study_name: str = "polca"
    # Any SQLAlchemy URL; sqlite files are created with their directory. By default the
    # study lives beside its jobs, so a rerun of the same command (same sweep directory)
    # resumes it and another sweep directory starts a new one.
    storage: str = "sqlite:///${hydra.sweep.dir}/optuna.db"
    direction: str = "maximize"
    n_trials: int = 20  # complete trials the study ends with (failed ones do not count)
    # Trials asked together and handed to the launcher at once; part of the study's
    # definition (it shapes the history), unlike the launcher's parallelism
    # (hydra.launcher.n_jobs, SLURM array size), which changes only the wall time.
    batch_size: int = 1
    # False: one driver at a time advances the study, batch by batch (reproducible; other
    # drivers on the same study wait). True: independent workers on one RDB study ask
    # whenever budget remains (faster on a cluster, not reproducible; never duplicates).
    asynchronous: bool = False
    retries: int = 2  # a failed job is run again with the same parameters this many times
    max_failures: int = 5  # the study stops once this many trials failed every retry
    # n_trials is part of the study; a larger one continues it only with extend=true
    # (trial k does not depend on n_trials, so the extended study equals a longer one).
    extend: bool = False
    # Optuna's RDB heartbeat: a running trial whose heartbeat is older than grace_period
    # seconds lost its worker and is run again (in its own place, with its parameters).
    heartbeat_interval: int = 10
    grace_period: int = 60
    # Queue the configured values of the searched keys as trial 0 of a new study, so
    # every study measures its baseline and can only improve on it (not on a grid: it
    # visits every point).
    baseline_trial: bool = True
    sampler: SamplerConf = field(default_factory=SamplerConf)
    # One study per value of this key (a choice in `params`), named <study_name>-<value>,
    # each with the same space, sampler, seed and n_trials: a fair budget per method.
    study_per: str | None = None
    # Each trial runs once per value here (e.g. {seed: [100, 101]}) and scores the mean,
    # so settings are chosen on several seeds, never on one.
    average_over: dict[str, Any] = field(default_factory=dict)
    # Search space in Hydra's override grammar, e.g. "int(interval(20, 200))",
    # "choice(eom, leaf)", "tag(log, interval(1e-4, 1e-1))", "range(1, 5)".
    params: dict[str, Any] = field(default_factory=dict)
    # Config keys that do not change a trial's result (where it is cached or logged); the
    # study's fingerprint leaves them out, so changing them does not make a new study.
    # polca-study's list (the comparison leaves the same keys out of its conditions).
    fingerprint_exclude: list[str] = field(default_factory=lambda: list(RUN_KEYS))


ConfigStore.instance().store(
    group="hydra/sweeper", name="polca_optuna", node=OptunaSweeperConf, provider="polca_study"
)
