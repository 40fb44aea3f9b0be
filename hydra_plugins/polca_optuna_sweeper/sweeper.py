"""Ask Optuna for trials, run them as Hydra jobs through the configured launcher, tell
Optuna their objective.

A study is a function of its command. Trial k samples with a seed derived from
(sampler seed, k) and sees the history of the batches before its own, so:
- trials are asked in batches of `batch_size` (part of the study) and told in trial
  order; the launcher's parallelism changes the wall time, not the history;
- a trial lost with its worker (Optuna's RDB heartbeat went stale) is run again in its
  own place with its own parameters, so "killed, then the same command again" ends with
  the study an uninterrupted run gives;
- a failed job is run again with the same parameters (`retries`); a trial that fails
  every time is recorded as failed and does not count toward `n_trials`;
- each study stores a fingerprint of what determines its trials, and a command that
  would build another study on the same storage and name is refused.
Asking happens under a study-wide lock (a file lock for SQLite, an advisory lock for
PostgreSQL), so workers sharing a study never ask the same place twice.

This module orchestrates; the search space is in `space`, the samplers and their seeding
in `samplers`, the storage, its lock and lost trials in `storage`, what a study is built
from and the refusal of another command in `fingerprint`.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import optuna
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from hydra_plugins.polca_optuna_sweeper.fingerprint import (
    StudyMismatch,
    adopt,
    study_fingerprint,
    task_config,
)
from hydra_plugins.polca_optuna_sweeper.samplers import EXHAUSTIVE, PerTrialSampler, sampler_factory, tell
from hydra_plugins.polca_optuna_sweeper.space import configured_point, overrides, parse_space
from hydra_plugins.polca_optuna_sweeper.storage import (
    BATCH,
    heartbeat,
    mark_asked,
    rdb_storage,
    record_studies,
    recover,
    study_lock,
)
from polca_study.reporting.keys import STUDY_ENV, TRIAL_ENV

log = logging.getLogger(__name__)
FAIL_REASON = "fail_reason"  # user attribute on a trial that failed every retry
WAIT_SECONDS = 2.0


def replicas(average_over) -> list[dict[str, Any]]:
    """The runs of each trial: one per value of the `average_over` key ([{}]: one run)."""
    values = (
        OmegaConf.to_container(average_over) if isinstance(average_over, DictConfig) else (average_over or {})
    )
    keys = list(values)
    if len(keys) > 1:
        raise ValueError(f"hydra.sweeper.average_over takes one key, got {keys}")
    return [{keys[0]: v} for v in values[keys[0]]] if keys else [{}]


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name,
        storage,
        direction,
        n_trials,
        max_failures,
        sampler,
        params,
        batch_size=1,
        asynchronous=False,
        retries=2,
        extend=False,
        heartbeat_interval=10,
        grace_period=60,
        baseline_trial=True,
        study_per=None,
        average_over=None,
        fingerprint_exclude=(),
        **unknown,
    ):
        if unknown:
            raise ValueError(f"hydra.sweeper: unknown keys {sorted(unknown)}")
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.n_trials = int(n_trials)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError(f"hydra.sweeper.batch_size must be >= 1, got {batch_size}")
        self.asynchronous = bool(asynchronous)
        self.retries = max(0, int(retries))
        self.max_failures = int(max_failures)
        self.extend = bool(extend)
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace_period)
        if self.heartbeat_interval < 1 or self.grace_period <= self.heartbeat_interval:
            raise ValueError(
                "hydra.sweeper.heartbeat_interval must be >= 1 s and grace_period longer than it, "
                f"got {heartbeat_interval} and {grace_period}"
            )
        self.baseline_trial = bool(baseline_trial)
        self.sampler_conf = sampler
        self.params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else params or {}
        self.study_per = study_per
        self.fingerprint_exclude = set(fingerprint_exclude or ())
        self.replicas = replicas(average_over)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---------------------------------------------------------------- the study

    def _storage(self) -> optuna.storages.RDBStorage:
        """The study's storage, with the heartbeat that finds trials whose worker is gone."""
        return rdb_storage(
            self.storage, self.heartbeat_interval, self.grace_period, self.asynchronous, self.retries
        )

    def fingerprint(self, space: dict, fixed: dict) -> dict:
        """Everything that determines a study's trials: the space, the config each trial
        starts from (composed as its jobs are, preset and data settings included), the
        sampler, the budget and the package."""
        task = task_config(self.hydra_context.config_loader, self.config, fixed, self.fingerprint_exclude)
        settings = {
            "average_over": self.replicas,
            "sampler": {"name": self.sampler_conf.name, "seed": self.sampler_conf.seed},
            "direction": self.direction,
            "batch_size": self.batch_size,
            "baseline_trial": self.baseline_trial,
            "n_trials": self.n_trials,
        }
        return study_fingerprint(space, task, settings)

    def _study(self, name: str, space: dict, fixed: dict) -> optuna.Study:
        """Create the study, or load it after checking that this command built it."""
        current = self.fingerprint(space, fixed)
        with study_lock(self.storage, name):  # workers on a fresh database race to create its tables
            study = optuna.create_study(
                study_name=name, storage=self._storage(), load_if_exists=True, direction=self.direction
            )
            adopt(study, self.storage, current, self.extend)
            baseline = self.baseline_trial and self.sampler_conf.name not in EXHAUSTIVE
            if baseline and space and not study.get_trials(deepcopy=False):
                self._enqueue_baseline(study, space)
        study.sampler = PerTrialSampler(
            sampler_factory(self.sampler_conf.name, space, self.sampler_conf.seed),
            self.sampler_conf.seed,
            order=space,
        )
        return study

    def _enqueue_baseline(self, study: optuna.Study, space: dict) -> None:
        """Queue the configured values of the searched keys as the study's first trial."""
        baseline = configured_point(space, self.config)
        if baseline is None:
            return  # a group choice or a value outside the space: no baseline
        study.enqueue_trial(baseline)
        log.info("queued the configured values as a baseline trial: %s", baseline)

    def _recover(self, study: optuna.Study) -> None:
        """Run again, or fail, the trials whose worker is gone (`storage.recover`)."""
        recover(study, self.asynchronous)

    def _ask(self, study: optuna.Study, space: dict) -> list[optuna.trial.Trial]:
        """The next batch (under the lock), or [] when the study is done or must wait."""
        trials = study.get_trials(deepcopy=False)
        failed = [t for t in trials if t.state == TrialState.FAIL and FAIL_REASON in t.user_attrs]
        if len(failed) >= self.max_failures:
            raise RuntimeError(
                f"study {study.study_name}: {len(failed)} failed trials reached "
                f"hydra.sweeper.max_failures={self.max_failures}"
            )
        complete = sum(t.state == TrialState.COMPLETE for t in trials)
        running = [t for t in trials if t.state == TrialState.RUNNING]
        lost = [t for t in trials if t.state == TrialState.WAITING and BATCH in t.system_attrs]
        if self.asynchronous:
            count = min(self.batch_size, self.n_trials - complete - len(running))
            batch = None
        elif running:
            return []  # another driver's batch: the next one depends on it
        elif lost:  # the batch a killed driver left: its lost trials, and any it had not asked
            batch = lost[0].system_attrs[BATCH]
            members = sum(t.system_attrs.get(BATCH, [None])[0] == batch[0] for t in trials)
            count = len(lost) + batch[1] - members
        else:
            count = min(self.batch_size, self.n_trials - complete)
            index = 1 + max((t.system_attrs[BATCH][0] for t in trials if BATCH in t.system_attrs), default=-1)
            batch = [index, count]
        asked = []
        for _ in range(max(0, count)):
            with warnings.catch_warnings():  # "Heartbeat ... supposed to be used with Study.optimize"
                warnings.simplefilter("ignore", UserWarning)
                trial = study.ask(space)
            mark_asked(study, trial, batch)
            asked.append(trial)
        return asked

    def _done(self, study: optuna.Study) -> bool:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return len(complete) >= self.n_trials

    def _studies(self, arguments: list[str]) -> list[tuple[str, dict, dict]]:
        """(name, space, fixed) of each study of this command: one, or one per value of
        `study_per`."""
        space, fixed = parse_space(self.params, arguments)
        if self.study_per is None:
            return [(self.study_name, space, fixed)]
        per = space.pop(self.study_per, None)
        if not isinstance(per, CategoricalDistribution):
            raise ValueError(
                f"hydra.sweeper.study_per={self.study_per!r} must name a choice(...) "
                f"in hydra.sweeper.params or the overrides"
            )
        return [
            (f"{self.study_name}-{value}", space, {**fixed, self.study_per: value}) for value in per.choices
        ]

    def sweep(self, arguments: list[str]) -> None:
        studies = self._studies(arguments)
        # every study is checked before any runs: a refused command changes nothing
        try:
            opened = [(self._study(name, s, f), s, f) for name, s, f in studies]
        except StudyMismatch as err:  # one line, exit code 2, nothing run or exported
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        record_studies(Path(self.config.hydra.sweep.dir), self.storage, [name for name, _, _ in studies])
        for study, s, f in opened:
            self._optimise(study, s, f)

    # ---------------------------------------------------------------- the trials

    def _optimise(self, study: optuna.Study, space: dict, fixed: dict) -> None:
        name = study.study_name
        log.info(
            "study %s in %s: %d complete trials wanted, batches of %d, space %s",
            name,
            self.storage,
            self.n_trials,
            self.batch_size,
            sorted(space),
        )
        waiting = False
        while True:
            with study_lock(self.storage, name):
                self._recover(study)
                trials = self._ask(study, space)
            if trials:
                self._run(study, trials, fixed)
                waiting = False
                continue
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if self._done(study) and not (self.asynchronous and running):
                break
            if not waiting:
                log.info(
                    "waiting for trials %s, running elsewhere (a trial whose worker died runs "
                    "again here once its heartbeat is %d s old)",
                    [t.number for t in running],
                    self.grace_period,
                )
                waiting = True
            time.sleep(WAIT_SECONDS)
        self._finish(study, name)

    def _launch(self, jobs: list[tuple[tuple[str, ...], int]]) -> list:
        """Launch jobs (overrides, job number); job directories are numbered by trial (and
        replica), so reruns write into the same directories and never another trial's."""
        numbers = [n for _, n in jobs]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return list(self.launcher.launch([o for o, _ in jobs], initial_job_idx=numbers[0]))
        return [self.launcher.launch([o], initial_job_idx=n)[0] for o, n in jobs]

    def _jobs(self, study: optuna.Study, trials: list, fixed: dict) -> dict:
        """{(trial number, replica): (overrides, job number)} of a batch."""
        r = len(self.replicas)
        jobs = {}
        for t in trials:
            trial_env = (
                f"++hydra.job.env_set.{STUDY_ENV}={study.study_name}",
                f"++hydra.job.env_set.{TRIAL_ENV}={t.number}",
            )
            for i, rep in enumerate(self.replicas):
                values = {**fixed, **t.params, **rep}
                jobs[(t.number, i)] = (tuple(overrides(values)) + trial_env, t.number * r + i)
        return jobs

    def _run_jobs(self, jobs: dict) -> tuple[dict, dict]:
        """Run the jobs, each failed one again up to `retries` times: (results, errors) by
        job key, a result as (objective, job return), an error as the last one's text."""
        results: dict[tuple[int, int], Any] = {}
        errors: dict[tuple[int, int], str] = {}
        pending = list(jobs)
        for attempt in range(self.retries + 1):
            if attempt:
                log.warning(
                    "running %d failed jobs again with the same parameters (retry %d of %d)",
                    len(pending),
                    attempt,
                    self.retries,
                )
            for key, ret in zip(pending, self._launch([jobs[k] for k in pending]), strict=True):
                try:
                    value = float(ret.return_value)  # raises the job's exception
                    if not math.isfinite(value):
                        raise ValueError(f"objective is {value}")
                except Exception as err:  # a job raised, or returned no usable value
                    errors[key] = f"{type(err).__name__}: {err}"
                    continue
                results[key] = (value, ret)
            pending = [k for k in pending if k not in results]
            if not pending:
                break
        return results, errors

    def _run(self, study: optuna.Study, trials: list, fixed: dict) -> None:
        jobs = self._jobs(study, trials, fixed)
        with heartbeat(study, trials, self.heartbeat_interval):
            results, errors = self._run_jobs(jobs)
        for trial in sorted(trials, key=lambda t: t.number):  # told in trial order
            self._tell_trial(study, trial, results, errors)

    def _tell_trial(self, study: optuna.Study, trial, results: dict, errors: dict) -> None:
        """Tell a trial its mean objective over its runs, or that it failed (with the
        reason); its job directories and W&B runs are recorded on it either way."""
        keys = [(trial.number, i) for i in range(len(self.replicas))]
        dirs = [_output_dir(results[k][1]) for k in keys if k in results]
        trial.set_user_attr("job_dirs", [str(d) for d in dirs])
        runs = [_wandb_run(d) for d in dirs]
        if any(runs):
            trial.set_user_attr("wandb_runs", runs)
        failed = [k for k in keys if k not in results]
        if failed:
            reason = errors[failed[0]]
            trial.set_user_attr(FAIL_REASON, f"after {self.retries + 1} attempts: {reason}"[:1000])
            tell(study, trial, state=TrialState.FAIL)
            log.warning("trial %d failed: %s", trial.number, reason)
            return
        values = [results[k][0] for k in keys]
        if len(keys) > 1:
            trial.set_user_attr("replica_values", values)
        value = sum(values) / len(values)
        tell(study, trial, value)
        log.info("trial %d: %s = %.4f", trial.number, dict(trial.params), value)

    def _finish(self, study: optuna.Study, name: str) -> None:
        # matplotlib (its Agg backend) and pandas, only when a study ends: Hydra's plugin
        # scan imports every module here not named _*, at every command's start
        from hydra_plugins.polca_optuna_sweeper._summary import summarise_study

        out = Path(self.config.hydra.sweep.dir)
        summarise_study(study, out if name == self.study_name else out / name, self.config, self.storage)


def _output_dir(ret) -> str | None:
    """A job's output directory (its working directory is the caller's: chdir=false)."""
    try:
        return str(ret.hydra_cfg.hydra.runtime.output_dir)
    except Exception:  # a launcher that returns no Hydra config
        return ret.working_dir


def _wandb_run(job_dir: str | None) -> str | None:
    """The W&B run path a job wrote into its summary.json, if any."""
    if not job_dir:
        return None
    try:
        return json.loads((Path(job_dir) / "summary.json").read_text()).get("wandb_run")
    except (OSError, ValueError):
        return None
