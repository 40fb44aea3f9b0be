"""What a study needs of its task, whatever the task: the model's input sizes, the
evaluation tokens with their labels, the Hessian sample, the training stream, the
per-token loss and the learning-curve evaluation; and how its clusters are scored,
reported and summarised. The pipeline and the report call these and never ask which
task they have: a new task is a builder here and an entry in `TASKS`.

Arithmetic labels are ground-truth skills (place, carry, value); text labels are the
part-of-speech contexts of `data.tagging`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from polca_study.atomic import write_atomic
from polca_study.cluster import features
from polca_study.cluster_labels import (
    best_label_purity,
    cluster_contexts,
    simply_labelled_fraction,
    simply_labelled_null,
    text_cluster_table,
)
from polca_study.score import (
    ami_and_coverage,
    carry_probe_auc,
    carry_recovery,
    cluster_table,
    filter_carry_rates,
    permutation_null,
    top_homogeneity,
)


@dataclass
class Task:
    name: str  # the dataset: arithmetic | text
    spec: dict  # what determines the data (part of the training stage's cache key)
    n_ctx: int
    d_vocab: int
    eval_split: Any  # inputs, targets, labels (one row per evaluation token), batch()
    hessian_split: Callable[[], Any]
    train_batches: Callable[[int, int], Any]  # (batch_size, seed) -> iterator of (inputs, targets)
    token_loss: Callable  # (logits, batch) -> (S, P) losses
    evaluate: Callable  # (model, split) -> learning-curve record (dict of lists)
    groups: np.ndarray  # (n,) group of each evaluation token for cluster.grouping=place
    objective: str  # the metric a search maximises
    # (cfg, assign, curves, labels, columns) -> (cluster table, metrics, further tables)
    score: Callable
    # (figures dir, history, curves, assign, labels, table) -> {name: png path}
    figures: Callable
    headline: Callable[[dict, Path], str]  # (metrics, run dir) -> the run's one-line result
    # (evaluation labels) -> the skill category of each token, for composition charts
    skill: Callable[[pd.DataFrame], pd.Series]
    # (run dir, metrics, tables, tracker) -> None: files and W&B tables besides clusters.csv
    write_outputs: Callable = lambda run_dir, metrics, tables, tracker: None


def make_task(dataset, cache=None) -> Task:
    """The task of a validated dataset config (ArithmeticConfig or TextConfig)."""
    if dataset.name not in TASKS:
        raise ValueError(f"dataset.name must be one of {sorted(TASKS)}, got {dataset.name!r}")
    return TASKS[dataset.name](dataset, cache)


def arithmetic_task(dataset, cache=None) -> Task:
    from polca_study import report
    from polca_study.data import arithmetic

    data = arithmetic.ArithmeticData(
        dataset.eval_size, dataset.hessian_size, dataset.carry_rate, dataset.seed
    )
    split = data.eval_split()
    return Task(
        name="arithmetic",
        spec=asdict(dataset),
        n_ctx=arithmetic.SEQ_LEN,
        d_vocab=arithmetic.VOCAB_SIZE,
        eval_split=split,
        hessian_split=data.hessian_split,
        train_batches=data.train_batches,
        token_loss=arithmetic.token_loss,
        evaluate=arithmetic.evaluate,
        groups=split.labels["place"].astype(str).to_numpy(),
        objective="carry_recovery_excess",
        score=score_arithmetic,
        figures=report.arithmetic_figures,
        skill=lambda labels: labels["place"].astype(str) + np.where(labels["carry"], " carry", " no carry"),
        headline=lambda m, run_dir: (
            f"carry_recovery {m['carry_recovery']:.3f}, top carry homogeneity "
            f"{[round(r['carry_homogeneity'], 3) for r in m['top_carry']]}, coverage {m['coverage']:.2f}"
        ),
    )


def text_task(dataset, cache=None) -> Task:
    from polca_study import report
    from polca_study.data import text

    data = text.TextData(dataset, cache)
    split = data.eval_split()
    return Task(
        name="text",
        spec=data.spec,
        n_ctx=data.n_ctx,
        d_vocab=data.d_vocab,
        eval_split=split,
        hessian_split=data.hessian_split,
        train_batches=data.train_batches,
        token_loss=text.token_loss,
        evaluate=text.evaluate,
        # text has no digit places: grouping=place clusters all tokens together
        groups=np.zeros(len(split.labels), dtype=int),
        objective="label_purity_excess",
        score=score_text,
        figures=report.text_figures,
        skill=lambda labels: labels["tag_w0"].astype(str),
        headline=lambda m, run_dir: (
            f"simply-labelled fraction {m['simply_labelled_fraction']:.3f} (null mean "
            f"{m.get('simply_labelled_fraction_null_mean', float('nan')):.3f}), label purity "
            f"{m['label_purity']:.3f} (null mean {m.get('label_purity_null_mean', float('nan')):.3f}), "
            f"{m['simply_labelled_clusters']} of {m['clusters']} clusters simply labelled, coverage "
            f"{m['coverage']:.2f}; labels and contexts in {run_dir / 'clusters.md'}"
        ),
        write_outputs=write_text_outputs,
    )


TASKS: dict[str, Callable[..., Task]] = {"arithmetic": arithmetic_task, "text": text_task}


# ------------------------------------------------------------------------- scores


def score_arithmetic(cfg, assign: np.ndarray, curves: np.ndarray, labels: pd.DataFrame, columns: int):
    """Carry, place and value scores of the clusters against the known skills.
    Returns (cluster table, metrics, further tables)."""
    s = cfg.score
    table = cluster_table(assign, labels, s.homogeneity_threshold)
    metrics: dict = {
        "carry_recovery": carry_recovery(table),
        "carry_base_rate": float(labels["carry"][labels["place"].astype(str).isin(["10s", "100s"])].mean()),
        "top_carry": top_homogeneity(table, "carry"),
        "top_place": top_homogeneity(table, "place"),
        "top_value": top_homogeneity(table, "value"),
    }
    metrics.update(ami_and_coverage(assign, labels))
    if s.probe:
        metrics["probe_auc"] = carry_probe_auc(curves, labels, seed=cfg.seed)
    metrics.update(permutation_null(assign, labels, s.permutations, s.homogeneity_threshold, cfg.seed))
    if "carry_recovery_null_mean" in metrics:
        metrics["carry_recovery_excess"] = metrics["carry_recovery"] - metrics["carry_recovery_null_mean"]
    # what the filter alone does: the carry rate of the 10s/100s tokens each column keeps
    rates = filter_carry_rates(assign, labels)
    metrics["filter_carry_rate_per_vector"] = np.round(rates, 4).tolist()
    metrics["filter_carry_rate_max"] = float(np.nanmax(rates)) if np.isfinite(rates).any() else float("nan")
    for i, row in enumerate(metrics["top_carry"][:3]):
        for key in ("carry_homogeneity", "carry_recall", "carry_f1"):
            metrics[f"carry_top{i + 1}_{key}"] = float(row[key])
    return table, metrics, {}


def score_text(cfg, assign: np.ndarray, curves: np.ndarray, labels: pd.DataFrame, columns: int):
    """Automatic part-of-speech labels of the clusters, their nearest contexts, and the
    share of basis vectors with a simply-labelled cluster (against a permutation null).
    `columns` counts all the method's columns, dropped ones included."""
    s = cfg.score
    table = text_cluster_table(assign, labels, s.label_coverage, s.simple_max_tags)
    fraction = simply_labelled_fraction(table, columns)
    purity = best_label_purity(table, columns)
    metrics: dict = {
        "simply_labelled_fraction": fraction,
        "simply_labelled_clusters": int(table.simply_labelled.sum()) if len(table) else 0,
        "label_purity": purity,
    }
    metrics.update(ami_and_coverage(assign, labels, skills=("tag_w0",)))
    null = simply_labelled_null(assign, labels, s.permutations, s.label_coverage, s.simple_max_tags, cfg.seed)
    for name, observed in (("simply_labelled_fraction", fraction), ("label_purity", purity)):
        if not null:
            break
        # the null's values average over the clustered columns; rescale to all columns
        values = null[name] * assign.shape[1] / max(columns, 1)
        metrics[f"{name}_null_mean"] = float(values.mean())
        metrics[f"{name}_null95"] = float(np.quantile(values, 0.95))
        metrics[f"{name}_p"] = float((1 + (values >= observed).sum()) / (1 + len(values)))
    # the search objective: purity above what the same clusters give with shuffled tags
    metrics["label_purity_excess"] = purity - metrics.get("label_purity_null_mean", 0.0)
    contexts = cluster_contexts(
        assign, lambda j: features(curves[:, :, j], cfg.cluster), labels, table, s.contexts
    )
    return table, metrics, {"contexts": contexts}


def write_text_outputs(run_dir: Path, metrics: dict, tables: dict, tracker) -> None:
    """contexts.csv, clusters.md (labels and nearest contexts) and their W&B table."""
    from polca_study import report

    table, contexts = tables["clusters"], tables["contexts"]
    write_atomic(run_dir / "contexts.csv", lambda p: contexts.to_csv(p, index=False))
    markdown = report.text_clusters_markdown(metrics, table, contexts)
    write_atomic(run_dir / "clusters.md", lambda p: p.write_text(markdown))
    tracker.table("cluster_contexts", report.contexts_table(table, contexts))
