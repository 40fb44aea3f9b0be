"""The search space: Hydra overrides (`hydra.sweeper.params` and the command line) parsed
into Optuna distributions and fixed values, configured values checked against the space,
and values written back as override strings for a trial's jobs."""

from __future__ import annotations

import math
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import IntervalSweep, Override, RangeSweep, Transformer
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)


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


def overrides(values: dict[str, Any]) -> list[str]:
    """Hydra override strings `key=value`, in the order of `values`."""
    return [f"{k}={v}" for k, v in values.items()]


def parse_space(
    params: dict[str, Any], arguments: list[str]
) -> tuple[dict[str, BaseDistribution], dict[str, str]]:
    """The searched keys with their distributions, and the fixed keys with their values,
    from `hydra.sweeper.params` then the command line (a later override of a key wins)."""
    space, fixed = {}, {}
    for override in OverridesParser.create().parse_overrides(overrides(params) + list(arguments)):
        value = distribution(override)
        key = override.get_key_element()
        if isinstance(value, BaseDistribution):
            space[key] = value
        else:
            fixed[key] = value
            space.pop(key, None)
    return space, fixed


def in_space(dist: BaseDistribution, value: Any) -> bool:
    """Whether a configured value is a point of the search space."""
    if isinstance(dist, CategoricalDistribution):
        return value in dist.choices
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    on_step = dist.step is None or math.isclose(
        (value - dist.low) / dist.step, round((value - dist.low) / dist.step)
    )
    return dist.low <= value <= dist.high and on_step


def configured_point(space: dict[str, BaseDistribution], config: DictConfig) -> dict[str, Any] | None:
    """The configured values of the searched keys, or None where one is not a point of the
    space (a group choice or a value outside it)."""
    point = {}
    for key, dist in space.items():
        value = OmegaConf.select(config, key, default=None)
        if isinstance(dist, IntDistribution) and isinstance(value, float) and value.is_integer():
            value = int(value)
        if not in_space(dist, value):
            return None
        point[key] = value
    return point
