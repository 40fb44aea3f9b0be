# No `from __future__ import annotations`: Hydra imports plugin modules outside
# sys.modules, where dataclasses cannot resolve string annotations.
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConf:
    name: str = "tpe"  # tpe | random | grid | cmaes
    seed: int | None = 0


@dataclass
class OptunaSweeperConf:
    _target_: str = "hydra_plugins.polca_optuna_sweeper.sweeper.OptunaSweeper"
    study_name: str = "polca"
    # Any SQLAlchemy URL; sqlite files are created with their directory.
    storage: str = "sqlite:///optuna/studies.db"
    direction: str = "maximize"
    n_trials: int = 20  # trials in the whole study, across reruns and workers
    n_jobs: int = 1  # trials handed to the launcher at once (parallel with joblib)
    max_failures: int = 5  # the study stops once this many trials have failed
    # Queue the configured values of the searched keys as a trial (once per study), so
    # every study measures its baseline and can only improve on it.
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


ConfigStore.instance().store(
    group="hydra/sweeper", name="polca_optuna", node=OptunaSweeperConf, provider="polca_study"
)
