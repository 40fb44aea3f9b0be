"""English text: clusters labelled by the part-of-speech context of their tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from polca_study.errors import ConfigError, at_least, choice
from polca_study.tasks.corpus import CORPORA
from polca_study.tasks.tagging import TAGGERS
from polca_study.tasks.task import Task, TaskKind, TaskMetrics


@dataclass
class TextConfig:
    """The `dataset` group for text (`dataset=text`)."""

    name: str = "text"
    source: str = "austen"  # austen (offline, fetched on first use) | files | huggingface
    # where the offline corpus is (fetched there on first use); None: $POLCA_DATA_DIR or
    # the user's data directory
    data_dir: str | None = None
    files: list[str] = field(default_factory=list)  # source=files: paths or globs of UTF-8 text
    hf_name: str | None = None  # source=huggingface: e.g. wikitext, roneneldan/TinyStories
    hf_config: str | None = None  # e.g. wikitext-103-raw-v1
    hf_split: str = "train"
    hf_text_field: str = "text"
    max_chars: int | None = None  # read at most this many characters of the corpus
    val_fraction: float = 0.05  # held-out tail of each document
    vocab_size: int = 1024  # BPE vocabulary, trained locally on the training split
    # a pretrained tokenizer (hub id or directory; needs `transformers`) in place of the
    # trained BPE: a model analysed at its revisions reads text the way it was trained to
    tokenizer: str | None = None
    tokenizer_revision: str | None = None  # a hub tokenizer's revision (None: its default)
    n_ctx: int = 32  # tokens per context
    eval_tokens: int = 3000  # evaluation tokens (the paper: 12,600)
    eval_positions: int = 16  # evaluation tokens per held-out context
    hessian_size: int = 64  # training contexts in the Hessian sample
    tagger: str = "auto"  # auto (spaCy when en_core_web_sm is installed) | spacy | rules
    # a label file (tasks/label_file.py): its passages are the evaluation text, every one of
    # their tokens an evaluation token (eval_tokens does not apply), scored per label
    labels: str | None = None
    seed: int = 0

    def __post_init__(self):
        choice("dataset.source", self.source, CORPORA)
        choice("dataset.tagger", self.tagger, TAGGERS)
        if self.source == "files" and not self.files:
            raise ConfigError("dataset.files must list text files (paths or globs) for dataset.source=files")
        if self.source == "huggingface" and not self.hf_name:
            raise ConfigError(
                "dataset.hf_name must name a Hugging Face dataset for dataset.source=huggingface"
            )
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"dataset.val_fraction must be in (0, 1), got {self.val_fraction}")
        at_least("dataset.vocab_size", self.vocab_size, 260)  # 256 bytes, the end-of-text token, merges
        at_least("dataset.n_ctx", self.n_ctx, 2)
        at_least("dataset.hessian_size", self.hessian_size, 1)
        at_least("dataset.eval_tokens", self.eval_tokens, 1)
        at_least("dataset.eval_positions", self.eval_positions, 1)
        if self.eval_positions > self.n_ctx - self.n_ctx // 2:
            raise ConfigError(
                f"dataset.eval_positions must be <= n_ctx/2 (targets come from the second "
                f"half of each context), got {self.eval_positions} with n_ctx={self.n_ctx}"
            )
        if self.max_chars is not None:
            at_least("dataset.max_chars", self.max_chars, 1)
        if self.labels is not None:  # checked whole with the settings, before any work
            from polca_study.tasks.label_file import read_labels

            read_labels(self.labels)

    @property
    def label(self) -> str:
        """The training data in a word, for run names: the corpus."""
        return self.hf_name or self.source


@dataclass
class TextScore:
    """`score.text`: how clusters are labelled by part-of-speech context. A cluster's label
    per word position is the smallest tag set covering `label_coverage` of its tokens;
    it is simply labelled when no position needs more than `simple_max_tags` tags (the
    paper's rule)."""

    label_coverage: float = 0.7
    simple_max_tags: int = 2
    contexts: int = 10  # contexts shown per cluster, nearest its medoid

    def __post_init__(self):
        if not 0 < self.label_coverage <= 1:
            raise ConfigError(f"score.text.label_coverage must be in (0, 1], got {self.label_coverage}")
        at_least("score.text.simple_max_tags", self.simple_max_tags, 1)
        at_least("score.text.contexts", self.contexts, 1)


def build(dataset: TextConfig, cache=None) -> Task:
    import numpy as np

    from polca_study.tasks import figures, text_data

    data = text_data.TextData(dataset, cache)
    split = data.eval_split()
    return Task(
        name="text",
        spec=data.spec,
        n_ctx=data.n_ctx,
        d_vocab=data.d_vocab,
        eval_split=split,
        hessian_split=data.hessian_split,
        train_batches=data.train_batches,
        token_loss=text_data.token_loss,
        evaluate=text_data.evaluate,
        # text has no digit places: grouping=place clusters all tokens together
        groups=np.zeros(len(split.labels), dtype=int),
        objective=METRICS.objective,
        score=score,
        figures=figures.text_figures,
        skill=lambda labels: labels["tag_w0"].astype(str),
        headline=lambda m, run_dir: (
            f"simply-labelled fraction {m['simply_labelled_fraction']:.3f} (null mean "
            f"{m.get('simply_labelled_fraction_null_mean', float('nan')):.3f}), label purity "
            f"{m['label_purity']:.3f} (null mean {m.get('label_purity_null_mean', float('nan')):.3f}), "
            f"{m['simply_labelled_clusters']} of {m['clusters']} clusters simply labelled, coverage "
            f"{m['coverage']:.2f}; labels and contexts in {run_dir / 'clusters.md'}"
            + "".join(
                f"; {name}: recovery {s['recovery']:.3f} (null mean {s['recovery_null_mean']:.3f}, "
                f"p {s['recovery_p']:.3f}), breakthrough at {s['breakthrough_step']}"
                f"{' (hidden)' if s['hidden'] else ''}"
                for name, s in (m.get("labels") or {}).items()
            )
        ),
        write_outputs=write_outputs,
    )


def history_group(row) -> str:
    """A learning-curve row's group: the tag of the target's word."""
    return str(row["tag"])


def score(cfg, assign, curves, labels, columns: int):
    """Automatic part-of-speech labels of the clusters, their nearest contexts, and the
    share of basis vectors with a simply-labelled cluster (against a permutation null).
    `columns` counts all the method's columns, dropped ones included."""
    import numpy as np

    from polca_study.analysis.cluster import features
    from polca_study.analysis.score import ami_and_coverage
    from polca_study.tasks.text_labels import (
        best_label_purity,
        cluster_contexts,
        simply_labelled_fraction,
        simply_labelled_null,
        text_cluster_table,
    )

    s = cfg.score.text
    table = text_cluster_table(assign, labels, s.label_coverage, s.simple_max_tags)
    fraction = simply_labelled_fraction(table, columns)
    purity = best_label_purity(table, columns)
    metrics: dict = {
        "simply_labelled_fraction": fraction,
        "simply_labelled_clusters": int(table.simply_labelled.sum()) if len(table) else 0,
        "label_purity": purity,
    }
    metrics.update(ami_and_coverage(assign, labels, skills=("tag_w0",)))
    null = simply_labelled_null(
        assign, labels, cfg.score.permutations, s.label_coverage, s.simple_max_tags, cfg.seed
    )
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


def write_outputs(run_dir: Path, metrics: dict, tables: dict, tracker) -> None:
    """contexts.csv, clusters.md (labels and nearest contexts) and their W&B table."""
    from polca_study.atomic import write_atomic
    from polca_study.tasks import figures

    table, contexts = tables["clusters"], tables["contexts"]
    write_atomic(run_dir / "contexts.csv", lambda p: contexts.to_csv(p, index=False))
    markdown = figures.text_clusters_markdown(metrics, table, contexts)
    write_atomic(run_dir / "clusters.md", lambda p: p.write_text(markdown))
    tracker.table("cluster_contexts", figures.contexts_table(table, contexts))


METRICS = TaskMetrics(
    columns={
        "simply_labelled_fraction": "simply labelled frac.",
        "simply_labelled_fraction_null_mean": "simple null mean",
        "simply_labelled_fraction_p": "simple p",
        "simply_labelled_clusters": "simple clusters",
        "label_purity": "label purity",
        "label_purity_null_mean": "purity null mean",
        "label_purity_excess": "purity excess",
        "label_purity_p": "purity p",
    },
    seeds=("label_purity", "label_purity_excess", "simply_labelled_fraction"),
    paired=("label_purity_excess",),
    summary={"label_purity_excess": "purity excess"},
    headline=("label_purity_excess",),
    views=("label_purity_excess",),
    objective="label_purity_excess",
    regime=("dataset.source",),
)

KIND = TaskKind("text", TextConfig, build, history_group, METRICS)
