"""Samplers: which Optuna sampler a study uses, and how it is seeded. Trial k samples with
a seed derived from (sampler seed, k) (`PerTrialSampler`), and a trial asked again after an
interrupted ask replays the draws it already holds, so it samples what an uninterrupted
ask gives."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial


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


def tell(study: optuna.Study, trial, *args, **kwargs) -> None:
    """study.tell, tolerating GridSampler's stop() once the grid is exhausted: outside
    `optimize` it raises, but the trial's result is already stored."""
    try:
        study.tell(trial, *args, **kwargs)
    except RuntimeError as err:
        if "Study.stop" not in str(err):
            raise
