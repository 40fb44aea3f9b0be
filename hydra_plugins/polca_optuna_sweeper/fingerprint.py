"""A study's fingerprint: what its trials are built from (the space, the config each trial
starts from, the sampler and its seed, the budget, the package version), stored on the
study; and the one-line refusal, naming the first difference, of a command that would
build another study on the same storage and name."""

from __future__ import annotations

import json
from importlib import metadata
from typing import TYPE_CHECKING, Any

import optuna
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import distribution_to_json

from hydra_plugins.polca_optuna_sweeper.space import overrides

if TYPE_CHECKING:
    from hydra.core.config_loader import ConfigLoader

# user attribute on the study: what determines its trials
FINGERPRINT = "fingerprint"


class StudyMismatch(Exception):
    """The storage holds a study of this name that another command built."""


def task_config(loader: ConfigLoader, config: DictConfig, fixed: dict, exclude: set[str]) -> dict:
    """The config each trial starts from, composed as its jobs are (preset and data
    settings included), without the `exclude`d keys."""
    fixed = {k: v for k, v in fixed.items() if k.lstrip("+~") not in exclude}
    composed = loader.load_sweep_config(config, overrides(fixed))
    keys = [k for k in composed if k != "hydra" and k not in exclude]
    return OmegaConf.to_container(OmegaConf.masked_copy(composed, keys), resolve=True)


def package_version() -> str:
    try:
        return metadata.version("polca-study")
    except metadata.PackageNotFoundError:
        return "unknown"


def study_fingerprint(space: dict, task: dict, settings: dict[str, Any]) -> dict:
    """The fingerprint of a study searching `space` from the trial config `task`, with the
    sweeper's `settings` (sampler, budget, ...) in the order they are stored."""
    return {
        "space": {k: json.loads(distribution_to_json(v)) for k, v in sorted(space.items())},
        "config": task,
        **settings,
        "package": package_version(),
    }


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


def check(name: str, storage: str, stored: dict, current: dict, extend: bool) -> None:
    """Refuse a command that would build another study than the stored one; a larger
    n_trials is another study unless extend=true (then it continues this one)."""
    diff = fingerprint_difference({**stored, "n_trials": 0}, {**current, "n_trials": 0})
    how = ""
    if not diff:
        grown = current["n_trials"] > stored["n_trials"]
        if current["n_trials"] == stored["n_trials"] or (grown and extend):
            return
        diff = [f"n_trials: {stored['n_trials']} there, {current['n_trials']} here"]
        how = "rerun with hydra.sweeper.extend=true to add trials, or " if grown else ""
    more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
    raise StudyMismatch(
        f"study {name} in {storage} was built by another command: {diff[0]}{more}; "
        f"{how}start a new study with hydra.sweeper.study_name=<name> or another hydra.sweep.dir"
    )


def adopt(study: optuna.Study, storage: str, current: dict, extend: bool) -> None:
    """Store `current` as the study's fingerprint after checking that this command built
    it (StudyMismatch otherwise); an extended n_trials is added to n_trials_history."""
    name = study.study_name
    stored = study.user_attrs.get(FINGERPRINT)
    if stored is None and study.get_trials(deepcopy=False):
        raise StudyMismatch(
            f"study {name} in {storage} has trials but no fingerprint (an older "
            "polca-study made it); start a new study with hydra.sweeper.study_name=<name>"
        )
    if stored is not None:
        check(name, storage, stored, current, extend)
        if current["n_trials"] > stored["n_trials"]:  # extend=true, checked above
            history = study.user_attrs.get("n_trials_history", [stored["n_trials"]])
            study.set_user_attr("n_trials_history", [*history, current["n_trials"]])
    study.set_user_attr(FINGERPRINT, current)
