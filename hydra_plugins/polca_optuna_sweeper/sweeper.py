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
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
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
    distribution_to_json,
)
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from polca_study.atomic import write_atomic
from polca_study.tracking import STUDY_ENV, TRIAL_ENV

log = logging.getLogger(__name__)
# trial system attributes
ASKED = "asked"  # set with the trial's first heartbeat, under the study lock
BATCH = "batch"  # [batch index, batch size] of the batch the trial was asked in
# user attributes
FINGERPRINT = "fingerprint"  # on the study: what determines its trials
FAIL_REASON = "fail_reason"  # on a trial that failed every retry
WAIT_SECONDS = 2.0


class StudyMismatch(Exception):
    """The storage holds a study of this name that another command built."""


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


def trial_seed(seed: int | None, number: int) -> int | None:
    """The sampler seed of trial `number`: a function of the study's seed and the trial's
    place only (Optuna's advice: seed per trial, not per process)."""
    if seed is None:
        return None
    return int(np.random.SeedSequence([int(seed), int(number)]).generate_state(1)[0])


# samplers that visit every point of the space: a baseline trial queued first would take
# a point's place, which then goes unvisited (the configured point is visited anyway)
EXHAUSTIVE = {"grid"}


def sampler_factory(name: str, space: dict, seed: int | None) -> Callable[[int | None], BaseSampler]:
    """A function from a trial's seed to the sampler `name` (the study's `seed` where a
    sampler must not change between trials)."""
    if name == "tpe":
        # constant_liar: trials still running (the rest of a batch, other workers') count
        # as bad results, so concurrent asks spread out instead of repeating each other
        return lambda seed: optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    if name == "random":
        return lambda seed: optuna.samplers.RandomSampler(seed=seed)
    if name == "cmaes":
        return lambda seed: optuna.samplers.CmaEsSampler(seed=seed)
    if name == "grid":
        grid = {
            k: list(v.choices)
            if isinstance(v, CategoricalDistribution)
            else list(range(v.low, v.high + 1, v.step))
            for k, v in space.items()
        }
        # the grid sampler shuffles its grid by its seed and maps trial k to grid point k
        # of that order: one order for the whole study, or trials repeat points and miss others
        return lambda _: optuna.samplers.GridSampler(grid, seed=seed)
    raise ValueError(f"hydra.sweeper.sampler.name must be one of tpe, random, cmaes, grid; got {name!r}")


class PerTrialSampler(BaseSampler):
    """A sampler made anew before every trial with `trial_seed(seed, trial.number)`: what
    trial k samples depends on k and the history it sees, not on how many trials this
    process asked before, nor on which worker asks it.

    Optuna stores a trial's parameters one at a time as it asks them, in `order`. A driver
    killed part-way through asking leaves a trial with the first few; asked again, Optuna
    keeps those and samples only the rest. So that the rest are what an uninterrupted ask
    gives, the first independent draw of a trial replays the draws of the parameters it
    already holds (discarding their values), bringing the fresh sampler's random state to
    where the interrupted ask left it."""

    def __init__(self, make: Callable[[int | None], BaseSampler], seed: int | None, order=()):
        self._make, self._seed, self._order = make, seed, list(order)
        self._sampler = make(seed)
        self._held: dict[str, BaseDistribution] = {}
        self._relative: set[str] = set()

    def before_trial(self, study, trial: FrozenTrial) -> None:
        self._sampler = self._make(trial_seed(self._seed, trial.number))
        self._sampler.before_trial(study, trial)
        # parameters an interrupted ask stored (fixed ones, from enqueue_trial, drew nothing)
        fixed = trial.system_attrs.get("fixed_params", {})
        self._held = {
            name: trial.distributions[name]
            for name in self._order
            if name in trial.distributions and name not in fixed
        }
        self._relative = set()

    def infer_relative_search_space(self, study, trial):
        return self._sampler.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        relative = self._sampler.sample_relative(study, trial, search_space)
        self._relative = set(relative)
        return relative

    def sample_independent(self, study, trial, param_name, param_distribution):
        held, self._held = self._held, {}
        for name, dist in held.items():
            if name not in self._relative and not dist.single():  # drew from the sampler
                self._sampler.sample_independent(study, trial, name, dist)
        return self._sampler.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._sampler.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._sampler.reseed_rng()


def sqlite_path(storage: str) -> Path | None:
    return Path(storage.removeprefix("sqlite:///")) if storage.startswith("sqlite:///") else None


@contextlib.contextmanager
def study_lock(storage: str, study_name: str) -> Iterator[None]:
    """Serialise creating, recovering and asking across the workers of one study. A
    killed holder releases it (the file is closed, the database session ends)."""
    path = sqlite_path(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
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
    raise ValueError(
        f"hydra.sweeper.storage={storage!r}: use sqlite:///<file> or postgresql+<driver>://... "
        "(the study lock needs one of them)"
    )


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


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix.rstrip("."): {}}
    return {prefix.rstrip("."): value}


def fingerprint_difference(stored: dict, current: dict) -> list[str]:
    """The keys (dotted) whose values differ, each as 'key: <stored> there, <current> here'."""
    a, b = _flatten(stored), _flatten(current)
    return [
        f"{k}: {a.get(k, '<unset>')!r} there, {b.get(k, '<unset>')!r} here"
        for k in sorted(set(a) | set(b))
        if a.get(k, "<unset>") != b.get(k, "<unset>")
    ]


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

    def _storage(self) -> optuna.storages.RDBStorage:
        with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            callback = None
            if self.asynchronous:  # a lost trial is failed and queued again under a new number
                callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=self.retries)
            return optuna.storages.RDBStorage(
                self.storage,
                heartbeat_interval=self.heartbeat_interval,
                grace_period=self.grace_period,
                heartbeat_stale_trial_callback=callback,
            )

    def fingerprint(self, space: dict, fixed: dict) -> dict:
        """Everything that determines a study's trials: the space, the config each trial
        starts from (composed as its jobs are, preset and data settings included), the
        sampler, the budget and the package."""
        overrides = [f"{k}={v}" for k, v in fixed.items() if k.lstrip("+~") not in self.fingerprint_exclude]
        composed = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        keys = [k for k in composed if k != "hydra" and k not in self.fingerprint_exclude]
        task = OmegaConf.to_container(OmegaConf.masked_copy(composed, keys), resolve=True)
        try:
            version = metadata.version("polca-study")
        except metadata.PackageNotFoundError:
            version = "unknown"
        return {
            "space": {k: json.loads(distribution_to_json(v)) for k, v in sorted(space.items())},
            "config": task,
            "average_over": self.replicas,
            "sampler": {"name": self.sampler_conf.name, "seed": self.sampler_conf.seed},
            "direction": self.direction,
            "batch_size": self.batch_size,
            "baseline_trial": self.baseline_trial,
            "n_trials": self.n_trials,
            "package": version,
        }

    def _study(self, name: str, space: dict, fixed: dict) -> optuna.Study:
        """Create the study, or load it after checking that this command built it."""
        current = self.fingerprint(space, fixed)
        with study_lock(self.storage, name):  # workers on a fresh database race to create its tables
            study = optuna.create_study(
                study_name=name, storage=self._storage(), load_if_exists=True, direction=self.direction
            )
            stored = study.user_attrs.get(FINGERPRINT)
            if stored is None and study.get_trials(deepcopy=False):
                raise StudyMismatch(
                    f"study {name} in {self.storage} has trials but no fingerprint (an older "
                    "polca-study made it); start a new study with hydra.sweeper.study_name=<name>"
                )
            if stored is not None:
                self._check(name, stored, current)
                if current["n_trials"] > stored["n_trials"]:  # extend=true, checked above
                    history = study.user_attrs.get("n_trials_history", [stored["n_trials"]])
                    study.set_user_attr("n_trials_history", [*history, current["n_trials"]])
            study.set_user_attr(FINGERPRINT, current)
            baseline = self.baseline_trial and self.sampler_conf.name not in EXHAUSTIVE
            if baseline and space and not study.get_trials(deepcopy=False):
                self._enqueue_baseline(study, space)
        study.sampler = PerTrialSampler(
            sampler_factory(self.sampler_conf.name, space, self.sampler_conf.seed),
            self.sampler_conf.seed,
            order=space,
        )
        return study

    def _check(self, name: str, stored: dict, current: dict) -> None:
        """Refuse a command that would build another study than the stored one; a larger
        n_trials is another study unless extend=true (then it continues this one)."""
        diff = fingerprint_difference({**stored, "n_trials": 0}, {**current, "n_trials": 0})
        how = ""
        if not diff:
            grown = current["n_trials"] > stored["n_trials"]
            if current["n_trials"] == stored["n_trials"] or (grown and self.extend):
                return
            diff = [f"n_trials: {stored['n_trials']} there, {current['n_trials']} here"]
            how = "rerun with hydra.sweeper.extend=true to add trials, or " if grown else ""
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise StudyMismatch(
            f"study {name} in {self.storage} was built by another command: {diff[0]}{more}; "
            f"{how}start a new study with hydra.sweeper.study_name=<name> or another hydra.sweep.dir"
        )

    def _enqueue_baseline(self, study: optuna.Study, space: dict) -> None:
        """Queue the configured values of the searched keys as the study's first trial."""
        baseline = {}
        for key, dist in space.items():
            value = OmegaConf.select(self.config, key, default=None)
            if isinstance(dist, IntDistribution) and isinstance(value, float) and value.is_integer():
                value = int(value)
            if not _in_space(dist, value):
                return  # a group choice or a value outside the space: no baseline
            baseline[key] = value
        study.enqueue_trial(baseline)
        log.info("queued the configured values as a baseline trial: %s", baseline)

    def _recover(self, study: optuna.Study) -> None:
        """Trials whose worker is gone: a stale heartbeat, or none at all (killed while
        being asked; we hold the lock it was asked under). Synchronous studies run them
        again in place; asynchronous ones fail them and Optuna's callback queues a copy."""
        storage = study._storage
        stale = set(storage._get_stale_trial_ids(study._study_id))
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if ASKED in t.system_attrs and t._trial_id not in stale:
                continue
            if self.asynchronous and ASKED in t.system_attrs:
                continue  # fail_stale_trials below
            storage.set_trial_state_values(t._trial_id, state=TrialState.WAITING)
            log.info("trial %d lost its worker; it runs again with its parameters", t.number)
        if self.asynchronous:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)

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
            storage = study._storage
            storage.record_heartbeat(trial._trial_id)
            storage.set_trial_system_attr(trial._trial_id, ASKED, True)
            if batch is not None:
                storage.set_trial_system_attr(trial._trial_id, BATCH, batch)
            asked.append(trial)
        return asked

    def _done(self, study: optuna.Study) -> bool:
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        return len(complete) >= self.n_trials

    def sweep(self, arguments: list[str]) -> None:
        space, fixed = self._space(arguments)
        if self.study_per is None:
            studies = [(self.study_name, space, fixed)]
        else:
            per = space.pop(self.study_per, None)
            if not isinstance(per, CategoricalDistribution):
                raise ValueError(
                    f"hydra.sweeper.study_per={self.study_per!r} must name a choice(...) "
                    f"in hydra.sweeper.params or the overrides"
                )
            studies = [
                (f"{self.study_name}-{value}", space, {**fixed, self.study_per: value})
                for value in per.choices
            ]
        # every study is checked before any runs: a refused command changes nothing
        try:
            opened = [(self._study(name, s, f), s, f) for name, s, f in studies]
        except StudyMismatch as err:  # one line, exit code 2, nothing run or exported
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        self._record_studies([name for name, _, _ in studies])
        for study, s, f in opened:
            self._optimise(study, s, f)

    def _record_studies(self, names: list[str]) -> None:
        """studies.json in the sweep directory: which storage holds this command's studies."""
        out = Path(self.config.hydra.sweep.dir)
        out.mkdir(parents=True, exist_ok=True)
        record = json.dumps({"storage": self.storage, "studies": names}, indent=2)
        write_atomic(out / "studies.json", lambda p: p.write_text(record))

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

    @contextlib.contextmanager
    def _heartbeat(self, study: optuna.Study, trials: list) -> Iterator[None]:
        """Record the batch's heartbeats while its jobs run."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.heartbeat_interval):
                for t in trials:
                    study._storage.record_heartbeat(t._trial_id)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def _launch(self, jobs: list[tuple[tuple[str, ...], int]]) -> list:
        """Launch jobs (overrides, job number); job directories are numbered by trial (and
        replica), so reruns write into the same directories and never another trial's."""
        numbers = [n for _, n in jobs]
        if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
            return list(self.launcher.launch([o for o, _ in jobs], initial_job_idx=numbers[0]))
        return [self.launcher.launch([o], initial_job_idx=n)[0] for o, n in jobs]

    def _run(self, study: optuna.Study, trials: list, fixed: dict) -> None:
        r = len(self.replicas)
        jobs = {}
        for t in trials:
            trial_env = (
                f"++hydra.job.env_set.{STUDY_ENV}={study.study_name}",
                f"++hydra.job.env_set.{TRIAL_ENV}={t.number}",
            )
            for i, rep in enumerate(self.replicas):
                values = {**fixed, **t.params, **rep}
                jobs[(t.number, i)] = (
                    tuple(f"{k}={v}" for k, v in values.items()) + trial_env,
                    t.number * r + i,
                )
        results: dict[tuple[int, int], Any] = {}
        errors: dict[tuple[int, int], str] = {}
        pending = list(jobs)
        with self._heartbeat(study, trials):
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
        for trial in sorted(trials, key=lambda t: t.number):  # told in trial order
            keys = [(trial.number, i) for i in range(r)]
            dirs = [_output_dir(results[k][1]) for k in keys if k in results]
            trial.set_user_attr("job_dirs", [str(d) for d in dirs])
            runs = [_wandb_run(d) for d in dirs]
            if any(runs):
                trial.set_user_attr("wandb_runs", runs)
            failed = [k for k in keys if k not in results]
            if failed:
                reason = errors[failed[0]]
                trial.set_user_attr(FAIL_REASON, f"after {self.retries + 1} attempts: {reason}"[:1000])
                _tell(study, trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, reason)
                continue
            values = [results[k][0] for k in keys]
            if r > 1:
                trial.set_user_attr("replica_values", values)
            value = sum(values) / len(values)
            _tell(study, trial, value)
            log.info("trial %d: %s = %.4f", trial.number, dict(trial.params), value)

    def _finish(self, study: optuna.Study, name: str) -> None:
        from hydra_plugins.polca_optuna_sweeper.report import report_study

        out = Path(self.config.hydra.sweep.dir)
        report_study(study, out if name == self.study_name else out / name, self.config, self.storage)


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
