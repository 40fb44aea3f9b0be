"""The command line checked before Hydra runs anything: every config error (Hydra's
composition errors included) becomes one line naming the key, the value and what is
allowed, with a "did you mean" for a misspelt key or option; a `+key` no schema knows is
refused; and every job of a multirun is composed and validated before the first starts.

Options Hydra handles itself (--help, --cfg, --info, ...) skip the check, and so does
HYDRA_FULL_ERROR=1 (Hydra's own messages and tracebacks)."""

from __future__ import annotations

import itertools
import os

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from polca_study.errors import ConfigError, did_you_mean
from polca_study.paths import unwritable
from polca_study.study.config import CONF_DIR, validate

MULTIRUN = ("-m", "--multirun")
MAX_JOBS = 1000  # beyond this many combinations only the first are composed


def check_command_line(args: list[str]) -> str | None:
    """None when every job the command would run composes and validates; else the problem."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return None
    if any(a.startswith("-") and a not in MULTIRUN for a in args):
        return None  # --help, --cfg, --config-dir ...: Hydra's own
    overrides = [a for a in args if not a.startswith("-")]
    multirun = any(a in MULTIRUN for a in args)

    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3", job_name="preflight"):
            return _check(overrides, multirun)
    finally:
        GlobalHydra.instance().clear()


def _check(overrides: list[str], multirun: bool) -> str | None:
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as err:
        return f"{_first_line(err)} (Hydra's override grammar)"
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [o for o in parsed if o.is_sweep_override()]
    if sweeps and not multirun:
        return f"{sweeps[0].input_line} is a sweep: add -m (--multirun) to run one job per value"
    base = _compose(fixed, hydra=True)  # the run directories and the sweeper's params live there
    if isinstance(base, str):
        return base
    problem = _output_dir(base, multirun)
    if problem or not multirun:  # one job: its composition, without Hydra's node
        return problem or _validate(_compose(fixed), "")
    jobs = _jobs(base, parsed)
    for values in itertools.islice(jobs, MAX_JOBS):
        values = list(values)
        cfg = _compose(fixed + values)
        problem = _validate(cfg, " ".join(values))
        if problem:
            return problem
    return None


def _output_dir(base, multirun: bool) -> str | None:
    """Hydra creates the job's directory before the job runs: one it cannot create or
    write would end in a traceback."""
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    try:
        path = OmegaConf.select(base, key)
    except OmegaConfBaseException as err:
        return f"{key}: {_first_line(err)}"
    problem = unwritable(path)
    return (
        f"{key}={path} cannot be created: {problem}; set {key} to a writable directory" if problem else None
    )


def _jobs(base, command_line) -> itertools.product:
    """The value combinations a multirun would launch: the command line's sweeps and the
    basic sweeper's `hydra.sweeper.params`; an optimiser's intervals (Optuna) are left at
    their configured values, its choices expanded. A key the command line sets replaces
    the params' axis, as in Hydra's sweepers (a fixed value is in every job already)."""
    lines = {}
    params = OmegaConf.select(base, "hydra.sweeper.params", default=None) or {}
    for key, value in params.items():
        lines[key] = f"{key}={value}"
    for o in command_line:
        if o.is_sweep_override():
            lines[o.get_key_element()] = o.input_line
        else:
            lines.pop(o.get_key_element(), None)
    axes = []
    for override in OverridesParser.create().parse_overrides(list(lines.values())):
        if not override.is_sweep_override():
            axes.append([override.input_line])
        elif override.is_interval_sweep():
            continue
        else:
            key = override.get_key_element()
            axes.append([f"{key}={v}" for v in override.sweep_string_iterator()])
    return itertools.product(*axes)


def _compose(overrides: list[str], hydra: bool = False):
    """The composed config (with Hydra's node if `hydra`), or the composition error as
    one line."""
    try:
        return compose(config_name="config", overrides=overrides, return_hydra_config=hydra)
    except MissingConfigException as err:
        return _missing_option(err, overrides)
    except HydraException as err:
        return _override_error(err, overrides)
    except OmegaConfBaseException as err:
        return _first_line(err)


def _validate(cfg, job: str) -> str | None:
    if isinstance(cfg, str):
        return f"{cfg} (job {job})" if job else cfg
    try:
        validate(cfg)
    except ConfigError as err:
        return f"{err} (job {job})" if job else str(err)
    return None


def _missing_option(err: MissingConfigException, overrides: list[str]) -> str:
    """`group=option` that does not exist: the options there are, and the closest."""
    options = list(err.options or [])
    wanted = str(err.missing_cfg_file)
    group, _, option = wanted.rpartition("/")
    choices = ", ".join(o for o in options if not o.endswith("_schema"))
    if not group:
        return _first_line(err)
    return f"{group}={option} is not an option of {group}: {choices}{did_you_mean(option, options)}"


def _override_error(err: HydraException, overrides: list[str]) -> str:
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    text = _first_line(cause) if cause is not None else _first_line(err)
    if cause is not None and "not in" in str(cause) and full_key:
        return _unknown_key(full_key, overrides)
    if full_key:
        value = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+~").startswith(f"{full_key}=")), "")
        return f"{full_key}={value}: {text}"
    return text


def _unknown_key(full_key: str, overrides: list[str]) -> str:
    """A key the config does not have: the closest key of its node."""
    parent, _, leaf = full_key.rpartition(".")
    base = compose(config_name="config", overrides=[o for o in overrides if full_key not in o])
    node = OmegaConf.select(base, parent) if parent else base
    known = list(node.keys()) if node is not None and OmegaConf.is_dict(node) else []
    hint = did_you_mean(leaf, [f"{parent}.{k}" if parent else k for k in known])
    return f"{full_key} is not a setting of polca-study{hint}"


def _first_line(err: BaseException) -> str:
    """The message's first line, and the line after it when the first only introduces it
    (Hydra's "ConfigKeyError raised while composing config:" names no key by itself)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    if lines[0].endswith(":") and len(lines) > 1:
        return f"{lines[0]} {lines[1]}"
    return lines[0]
