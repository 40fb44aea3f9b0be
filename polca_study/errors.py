"""The one error a user's setting gets, and the checks that raise it.

Light on purpose: the config schemas, the tasks' schemas and the sources raise it, and
`import polca_study.study.config` must stay cheap (every CLI process pays it).
"""

from __future__ import annotations

import difflib


class ConfigError(ValueError):
    """A setting a run cannot use; the message names the field, the value and what is allowed."""


def did_you_mean(word: object, options) -> str:
    """' (did you mean x?)' for the closest option, or ''."""
    options = [str(o) for o in options]
    # compare leaf with leaf (cluster.min_cluster_siz with cluster.min_cluster_size)
    leaves = {o.rpartition(".")[2]: o for o in options}
    close = difflib.get_close_matches(str(word).rpartition(".")[2], list(leaves), n=1, cutoff=0.6)
    return f" (did you mean {leaves[close[0]]}?)" if close else ""


def choice(path: str, value: object, allowed) -> None:
    """`value` must be one of `allowed` (any iterable of options: a tuple, a registry)."""
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(f"{path} must be one of {allowed}, got {value!r}{did_you_mean(value, allowed)}")


def at_least(path: str, value: float | None, low: float) -> None:
    if value is None or value < low:
        raise ConfigError(f"{path} must be >= {low}, got {value!r}")


def first_line(err: BaseException) -> str:
    """An error's message, first line only (a library's message can run to pages)."""
    return (str(err).strip().splitlines() or [type(err).__name__])[0]
