"""Ask Optuna for trials, run them as Hydra jobs through the configured launcher, tell
Optuna their objective. Counting and asking happen under a study-wide lock (a file lock
for SQLite, an advisory lock for PostgreSQL), so many workers on one study run exactly
`n_trials`; trials of a worker that died are failed and re-queued on the next start."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

log = logging.getLogger(__name__)
WORKER = "worker"  # trial system attribute: host:pid of the process running it
STALE = "stale"  # user attribute on trials failed because their worker died


def distribution(override: Override) -> BaseDistribution | Any:
    """An Optuna distribution from a Hydra sweep override, or the fixed value."""
    if not override.is_sweep_override():
        return override.get_value_element_as_str()
    value = override.value()
    if override.is_choice_sweep() or (override.is_range_sweep() and value.shuffle):
        return CategoricalDistribution(list(override.sweep_iterator(transformer=Transformer.encode)))
    if override.is_range_sweep():
        assert isinstance(value, RangeSweep)
        if any(isinstance(x, float) for x in (value.start, value.stop, value.step)):
            return FloatDistribution(value.start, value.stop, step=value.step)
        return IntDistribution(int(value.start), int(value.stop) - 1, step=int(value.step))
    if override.is_interval_sweep():
        assert isinstance(value, IntervalSweep)
        log_scale = "log" in value.tags
        if isinstance(value.start, int) and isinstance(value.end, int):
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(
        f"hydra.sweeper.params: {override.input_line!r} is not a supported sweep "
        f"(use choice, range or interval)"
    )


def make_sampler(name: str, seed: int | None, space: dict) -> optuna.samplers.BaseSampler:
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return optuna.samplers.CmaEsSampler(seed=seed)
    if name == "grid":
        return optuna.samplers.GridSampler(
            {
                k: list(v.choices)
                if isinstance(v, CategoricalDistribution)
                else list(range(v.low, v.high + 1, v.step))
                for k, v in space.items()
            },
            seed=seed,
        )
    raise ValueError(f"hydra.sweeper.sampler.name must be one of tpe, random, cmaes, grid; got {name!r}")


def sqlite_path(storage: str) -> Path | None:
    return Path(storage.removeprefix("sqlite:///")) if storage.startswith("sqlite:///") else None


@contextlib.contextmanager
def study_lock(storage: str, study_name: str) -> Iterator[None]:
    """Serialise count-and-ask across workers of one study."""
    path = sqlite_path(storage)
    if path is not None:
        with open(path.with_suffix(".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if storage.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    log.warning("no cross-worker lock for %s: concurrent workers may overshoot n_trials", storage)
    yield


def _in_space(dist: BaseDistribution, value: Any) -> bool:
    """Whether a configured value is a point of the search space."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    on_step = dist.step is None or math.isclose(
        (value - dist.low) / dist.step, round((value - dist.low) / dist.step)
    )
    return dist.low <= value <= dist.high and on_step


def _alive(worker: str) -> bool:
    host, _, pid = worker.rpartition(":")
    if host == "unknown":
        return False
    if host != socket.gethostname():
        return True  # cannot tell; assume the other machine's worker is alive
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def _tell(study: optuna.Study, trial, *args, **kwargs) -> None:
    """study.tell, tolerating GridSampler's stop() once the grid is exhausted: outside
    `optimize` it raises, but the trial's result is already stored."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        study_name,
        storage,
        direction,
        n_trials,
        n_jobs,
        max_failures,
        sampler,
        params,
        baseline_trial=True,
        study_per=None,
        average_over=None,
        **_ignored,
    ):
        self.baseline_trial = bool(baseline_trial)
        self.study_name = study_name
        self.storage = storage
        self.direction = direction
        self.n_trials = int(n_trials)
        self.n_jobs = max(1, int(n_jobs))
        self.max_failures = int(max_failures)
        self.sampler_conf = sampler
        self.params = OmegaConf.to_container(params) if isinstance(params, DictConfig) else params or {}
        self.worker = f"{socket.gethostname()}:{os.getpid()}"
        self.study_per = study_per
        replicas = (
            OmegaConf.to_container(average_over)
            if isinstance(average_over, DictConfig)
            else (average_over or {})
        )
        keys = list(replicas)
        if len(keys) > 1:
            raise ValueError(f"hydra.sweeper.average_over takes one key, got {keys}")
        self.replicas = [{keys[0]: v} for v in replicas[keys[0]]] if keys else [{}]

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # ---------------------------------------------------------------- the study

    def _space(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
        lines = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        space, fixed = {}, {}
        for override in OverridesParser.create().parse_overrides(lines):
            value = distribution(override)
            key = override.get_key_element()
            if isinstance(value, BaseDistribution):
                space[key] = value
            else:
                fixed[key] = value
                space.pop(key, None)
        return space, fixed

    def _study(self, space: dict, name: str) -> optuna.Study:
        path = sqlite_path(self.storage)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        with study_lock(self.storage, name):  # workers on a fresh database race to create its tables
            study = optuna.create_study(
                study_name=name, storage=self.storage, load_if_exists=True, direction=self.direction
            )
        # offset the seed by the trials already there, so a resumed study (or a second
        # worker) does not replay the first session's samples
        seed = self.sampler_conf.seed
        if seed is not None:
            seed += len(study.get_trials(deepcopy=False))
        study.sampler = make_sampler(self.sampler_conf.name, seed, space)
        return study

    def _requeue_dead(self, study: optuna.Study) -> None:
        """Fail the running trials of workers that died, and queue their parameters again."""
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            # a trial without a worker was killed while being asked: asking and tagging
            # happen under the lock we hold now
            worker = t.system_attrs.get(WORKER, "unknown:-1")
            if not _alive(worker):
                study._storage.set_trial_user_attr(t._trial_id, STALE, True)
                study._storage.set_trial_user_attr(t._trial_id, "fail_reason", f"worker {worker} died")
                study.tell(t.number, state=TrialState.FAIL)
                if set(t.params) == set(t.distributions) and t.params:
                    study.enqueue_trial(t.params, skip_if_exists=False)
                log.info("trial %d: its worker %s died; failed and queued again", t.number, worker)

    def _enqueue_baseline(self, study: optuna.Study, space: dict) -> None:
        """Queue the configured values of the searched keys, unless a trial already has them."""
        baseline = {}
        for key, dist in space.items():
            value = OmegaConf.select(self.config, key, default=None)
            if not _in_space(dist, value):
                return  # a group choice or a value outside the space: no baseline
            baseline[key] = value
        if any(t.params == baseline for t in study.get_trials(deepcopy=False)):
            return
        study.enqueue_trial(baseline)
        log.info("queued the configured values as a baseline trial: %s", baseline)

    @staticmethod
    def _counts(study: optuna.Study) -> tuple[int, int]:
        """(trials that count toward n_trials, real failures)."""
        trials = study.get_trials(deepcopy=False)
        failed = sum(t.state == TrialState.FAIL and not t.user_attrs.get(STALE) for t in trials)
        taken = sum(t.state in (TrialState.COMPLETE, TrialState.RUNNING, TrialState.PRUNED) for t in trials)
        return taken + failed, failed

    def sweep(self, arguments: list[str]) -> None:
        space, fixed = self._space(arguments)
        if self.study_per is None:
            self._optimise(self.study_name, space, fixed)
            return
        per = space.pop(self.study_per, None)
        if not isinstance(per, CategoricalDistribution):
            raise ValueError(
                f"hydra.sweeper.study_per={self.study_per!r} must name a choice(...) "
                f"in hydra.sweeper.params or the overrides"
            )
        for value in per.choices:
            self._optimise(f"{self.study_name}-{value}", space, {**fixed, self.study_per: value})

    def _optimise(self, name: str, space: dict, fixed: dict) -> None:
        study = self._study(space, name)
        if self.baseline_trial and space:
            with study_lock(self.storage, name):
                self._enqueue_baseline(study, space)
        log.info(
            "study %s in %s: %d trials wanted, space %s", name, self.storage, self.n_trials, sorted(space)
        )
        while True:
            with study_lock(self.storage, name):
                self._requeue_dead(study)
                counted, failed = self._counts(study)
                if failed >= self.max_failures:
                    raise RuntimeError(
                        f"study {name}: {failed} failed trials reached "
                        f"hydra.sweeper.max_failures={self.max_failures}"
                    )
                batch = min(self.n_jobs, self.n_trials - counted)
                if batch <= 0:
                    break
                trials = [study.ask(space) for _ in range(batch)]
                for t in trials:
                    study._storage.set_trial_system_attr(t._trial_id, WORKER, self.worker)
            self._run(study, trials, fixed)
        self._finish(study, name)

    def _run(self, study: optuna.Study, trials: list, fixed: dict) -> None:
        r = len(self.replicas)
        overrides = [
            tuple(f"{k}={v}" for k, v in {**fixed, **t.params, **rep}.items())
            for t in trials
            for rep in self.replicas
        ]
        numbers = [t.number * r + i for t in trials for i in range(r)]
        # job directories are numbered by trial (and replica), so reruns never overwrite them
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            returns = self.launcher.launch(overrides, initial_job_idx=numbers[0])
        else:
            returns = [
                self.launcher.launch([o], initial_job_idx=n)[0]
                for o, n in zip(overrides, numbers, strict=True)
            ]
        for i, trial in enumerate(trials):
            try:
                values = [float(ret.return_value) for ret in returns[i * r : (i + 1) * r]]
                if not all(math.isfinite(v) for v in values):
                    raise ValueError(f"objective is {values}")
            except Exception as err:  # a job raised, or returned no usable value
                reason = f"{type(err).__name__}: {err}"
                trial.set_user_attr("fail_reason", reason[:1000])
                _tell(study, trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, reason)
                continue
            if r > 1:
                trial.set_user_attr("replica_values", values)
            value = sum(values) / len(values)
            _tell(study, trial, value)
            log.info("trial %d: %s = %.4f", trial.number, dict(trial.params), value)

    def _finish(self, study: optuna.Study, name: str) -> None:
        from hydra_plugins.polca_optuna_sweeper.report import report_study

        out = Path(self.config.hydra.sweep.dir)
        report_study(study, out if name == self.study_name else out / name, self.config)
