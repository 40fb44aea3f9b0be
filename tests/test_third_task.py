"""A third task, added the way a maintainer would: a schema, a builder and a `TaskKind`
in a file of its own (this one), and one registry line. Nothing in the package knows
it, yet the whole study runs on it and its metrics reach the comparison tables.

The task plants two skills: the answer is the first of two digits after the token
`first`, the second after `second`; the training stream shows `second` rarely, so it
is learned later."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from omegaconf import II
from torch.nn import functional as F

from polca_study.errors import ConfigError, at_least
from polca_study.reporting import compare
from polca_study.study.config import CONF_DIR
from polca_study.study.pipeline import run
from polca_study.tasks import TASKS
from polca_study.tasks.task import Task, TaskKind, TaskMetrics

DIGITS, FIRST, SECOND = 5, 5, 6  # tokens 0-4 are digits; 5 and 6 name the skill


@dataclass
class PlantedConfig:
    name: str = "planted"
    eval_size: int = 80
    hessian_size: int = 40
    second_rate: float = 0.2  # share of training examples that need the later skill
    seed: int = II("seed")

    def __post_init__(self):
        at_least("dataset.eval_size", self.eval_size, 2)
        if not 0 < self.second_rate < 1:
            raise ConfigError(f"dataset.second_rate must be in (0, 1), got {self.second_rate}")

    @property
    def label(self) -> str:
        return f"second{self.second_rate:g}"


@dataclass
class PlantedSplit:
    inputs: torch.Tensor  # (S, 3): skill token, two digits
    targets: torch.Tensor  # (S, 1)
    labels: pd.DataFrame

    def batch(self) -> dict:
        return {"inputs": self.inputs, "targets": self.targets}


def examples(n: int, second_rate: float, rng: np.random.Generator) -> PlantedSplit:
    second = rng.random(n) < second_rate
    a, b = rng.integers(0, DIGITS, n), rng.integers(0, DIGITS, n)
    inputs = np.stack([np.where(second, SECOND, FIRST), a, b], axis=1)
    answer = np.where(second, b, a)
    labels = pd.DataFrame({"skill": np.where(second, "second", "first"), "answer": answer})
    return PlantedSplit(torch.as_tensor(inputs), torch.as_tensor(answer[:, None]), labels)


def token_loss(logits, batch) -> torch.Tensor:
    return F.cross_entropy(logits[:, -1], batch["targets"][:, 0], reduction="none")[:, None]


def evaluate(model, split: PlantedSplit) -> dict:
    logits = model(split.inputs)
    loss = token_loss(logits, split.batch())[:, 0].detach().numpy()
    correct = (logits[:, -1].argmax(-1) == split.targets[:, 0]).numpy()
    frame = split.labels.assign(loss=loss, correct=correct).groupby("skill")
    out = frame.agg(loss=("loss", "mean"), accuracy=("correct", "mean"), tokens=("loss", "size"))
    return {c: out.reset_index()[c].tolist() for c in ["skill", "loss", "accuracy", "tokens"]}


def score(cfg, assign, curves, labels, columns):
    """Each cluster's share of its majority skill; the run's skill purity is the best
    cluster's over the clusters holding at least 5% of the tokens."""
    rows = []
    for j in range(assign.shape[1]):
        for c in np.unique(assign[:, j][assign[:, j] >= 0]):
            skills = labels.skill[assign[:, j] == c]
            rows.append(
                {
                    "vector": j,
                    "cluster": int(c),
                    "size": len(skills),
                    "purity": skills.value_counts(normalize=True).max(),
                }
            )
    table = pd.DataFrame(rows, columns=["vector", "cluster", "size", "purity"])
    big = table[table["size"] >= 0.05 * len(labels)]
    metrics = {
        "skill_purity": float(big.purity.max()) if len(big) else 0.0,
        "coverage": float((assign >= 0).mean()),
    }
    return table, metrics, {}


def build(dataset: PlantedConfig, cache=None) -> Task:
    rng = np.random.default_rng(dataset.seed)
    evaluation = examples(dataset.eval_size, 0.5, rng)  # both skills alike
    hessian = examples(dataset.hessian_size, dataset.second_rate, rng)

    def train_batches(batch_size: int, seed: int):
        stream = np.random.default_rng([dataset.seed, seed])
        while True:
            s = examples(batch_size, dataset.second_rate, stream)
            yield s.inputs, s.targets

    return Task(
        name="planted",
        spec=asdict(dataset),
        n_ctx=3,
        d_vocab=7,
        eval_split=evaluation,
        hessian_split=lambda: hessian,
        train_batches=train_batches,
        token_loss=token_loss,
        evaluate=evaluate,
        groups=np.zeros(dataset.eval_size, dtype=int),
        objective="skill_purity",
        score=score,
        figures=lambda *args: {},
        headline=lambda m, run_dir: f"skill purity {m['skill_purity']:.3f}",
        skill=lambda labels: labels["skill"],
    )


METRICS = TaskMetrics(
    columns={"skill_purity": "skill purity"},
    seeds=("skill_purity",),
    paired=("skill_purity",),
    summary={"skill_purity": "skill purity"},
    headline=("skill_purity",),
)
PLANTED = TaskKind("planted", PlantedConfig, build, lambda row: str(row["skill"]), METRICS)


@pytest.fixture
def planted(monkeypatch):
    monkeypatch.setitem(TASKS, "planted", PLANTED)  # the one registry line
    store = ConfigStore.instance()
    store.store(group="dataset", name="planted", node=PlantedConfig)  # dataset=planted
    yield
    store.repo["dataset"].pop("planted.yaml")  # other tests' `dataset` group as shipped


@pytest.mark.slow
def test_a_third_task_runs_the_whole_study_from_its_own_file(planted, tmp_path):
    overrides = [
        "dataset=planted",
        "seed=0",
        "model=tiny",
        "train.steps=60",
        "train.checkpoint_every=10",
        "train.warmup_steps=10",
        "basis.interval=30",
        "polca.interval=10",
        "cluster.min_cluster_size=5",
        "cluster.min_samples=2",
        "cluster.grouping=none",
        "score.breakthrough_delta=10",
        "score.hidden_margin=10",
        "logger=disabled",
        "figures=false",
        "progress=false",
        "num_threads=1",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        metrics = run(compose("config", overrides=overrides), tmp_path / "run")
        with pytest.raises(ConfigError, match=r"dataset.second_rate must be in \(0, 1\), got 1.5"):
            run(compose("config", overrides=[*overrides, "dataset.second_rate=1.5"]), tmp_path / "bad")
    assert metrics["dataset"] == "planted" and metrics["objective"] == "skill_purity"
    # the metric again from the saved assignments and the evaluation set rebuilt from its
    # seed: each cluster of at least 5% of the tokens, the share of its commonest skill
    assign = np.load(tmp_path / "run" / "assignments.npy", allow_pickle=False)
    skills = examples(80, 0.5, np.random.default_rng(0)).labels.skill.to_numpy()
    assert assign.shape[0] == len(skills) and (assign >= 0).any()
    shares = [
        max(np.mean(skills[column == c] == s) for s in ("first", "second"))
        for column in assign.T
        for c in np.unique(column[column >= 0])
        if np.sum(column == c) >= 0.05 * len(skills)
    ]
    assert shares and metrics["skill_purity"] == pytest.approx(max(shares))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skill_purity"] == metrics["skill_purity"]
    clusters = pd.read_csv(tmp_path / "run" / "clusters.csv")
    assert {"vector", "cluster", "purity", "hidden"} <= set(clusters.columns)
    # the comparison tables know the task's metrics while it is registered
    assert "skill_purity" in compare.seed_metrics() and "skill_purity" in compare.paired_metrics()
    assert compare.columns()["skill_purity"] == "skill purity"


def test_the_learning_curves_are_grouped_by_the_tasks_own_rows(planted):
    split = examples(50, 0.5, np.random.default_rng(0))
    from polca_study.reporting import charts
    from polca_study.snapshots.model import ModelConfig, Transformer
    from polca_study.study.pipeline import _log_history

    model = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=3, d_vocab=7)).eval()
    with torch.no_grad():
        history = pd.concat([pd.DataFrame(evaluate(model, split)).assign(step=s) for s in (0, 10)])

    class Recorder:  # what the pipeline hands W&B
        active = True

        def __init__(self):
            self.logged, self.series = {}, {}

        def log(self, data, step=None):
            self.logged[step] = data

        def line_series(self, name, xs, ys, names, title):
            self.series[name] = names

    tracker = Recorder()
    _log_history(tracker, history, None, TASKS["planted"].history_group)
    charts.learning_curves(tracker, history, TASKS["planted"].history_group)
    assert sorted(tracker.logged) == [0, 10]
    for data in tracker.logged.values():
        assert {"eval_loss/first", "eval_loss/second", "eval_accuracy/first", "eval_accuracy/second"} <= set(
            data
        )
    assert tracker.series == {
        "learning_curves_accuracy": ["first", "second"],
        "learning_curves_loss": ["first", "second"],
    }
