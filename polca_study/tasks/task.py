"""What a study needs of its task, whatever the task. The pipeline, the report and the
comparison tables call these and never ask which task they have.

A task comes in two parts. Its `TaskKind` is what exists before any data: the name, the
`dataset` group's schema (which validates itself), how a `Task` is built, how its
learning-curve rows are grouped and which metrics its tables compare. The `Task` is the
built thing: evaluation tokens and their labels, the Hessian sample, the training
stream, the per-token loss, how clusters are scored, reported and summarised.

A new task is a module of its own (a schema, a builder and a `TaskKind`) and one line in
`polca_study.tasks.TASKS`; `tests/test_third_task.py` adds one that way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Task:
    name: str  # the dataset's name, its TaskKind's
    spec: dict  # what determines the data (part of the training stage's cache key)
    n_ctx: int
    d_vocab: int
    eval_split: Any  # inputs, targets, labels (one row per evaluation token), batch()
    hessian_split: Callable[[], Any]
    train_batches: Callable[[int, int], Any]  # (batch_size, seed) -> iterator of (inputs, targets)
    token_loss: Callable  # (logits, batch) -> (S, P) losses
    evaluate: Callable  # (model, split) -> learning-curve record (dict of lists)
    groups: Any  # (n,) array: the group of each evaluation token for cluster.grouping=place
    objective: str  # the metric a search maximises
    # (cfg, assign, curves, labels, columns) -> (cluster table, metrics, further tables)
    score: Callable
    # (figures dir, history, curves, assign, labels, table) -> {name: png path}
    figures: Callable
    headline: Callable[[dict, Path], str]  # (metrics, run dir) -> the run's one-line result
    # (evaluation labels) -> the skill category of each token, for composition charts
    skill: Callable
    # (run dir, metrics, tables, tracker) -> None: files and W&B tables besides clusters.csv
    write_outputs: Callable = lambda run_dir, metrics, tables, tracker: None


@dataclass(frozen=True)
class TaskMetrics:
    """The metrics a task's runs are compared on (the tables of `compare.py` and the
    W&B views), besides the ones every task has (breakthroughs, coverage...)."""

    columns: Mapping[str, str]  # metric -> its heading in comparison.md (one row per job)
    seeds: tuple[str, ...]  # per condition over seeds (seeds.md)
    paired: tuple[str, ...]  # POLCA minus each baseline, paired by seed (paired.md)
    summary: Mapping[str, str] = field(default_factory=dict)  # summary.md: metric -> heading
    headline: tuple[str, ...] = ()  # the objective and its excess: summary.md's paired part
    views: tuple[str, ...] = ()  # bar charts of the W&B workspace's headline section
    objective: str = ""  # the metric a tuning study maximises (the W&B tuning plot's axis)
    # the config keys that tell the task's data regimes apart: a comparison's conditions
    # are the method and these (the W&B views group runs by them)
    regime: tuple[str, ...] = ()
    # published values to read ours beside: (source, {method: {metric: value}})
    published: tuple[str, Mapping[str, Mapping[str, float]]] | None = None


@dataclass(frozen=True)
class TaskKind:
    name: str  # the `dataset` group's option and `dataset.name`
    # the dataset config's dataclass; its __post_init__ raises ConfigError on a bad value
    schema: type
    build: Callable[[Any, Any], Task]  # (validated dataset config, stage cache) -> Task
    # a learning-curve row (a mapping of the record `Task.evaluate` returns) -> its group
    history_group: Callable[[Mapping], str]
    metrics: TaskMetrics
