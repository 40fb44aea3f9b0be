"""Config schemas, registered in Hydra's ConfigStore.

The YAML files in `conf/` fill these dataclasses; a misspelt key or a wrong type fails
when Hydra composes the config. Each group checks its own values in `__post_init__`
(the model's, the dataset's and the cluster settings' schemas live with their code);
`validate` runs those checks and the few that span groups, before any work starts.
Every error names the field, the value and what is allowed (`ConfigError`).

Light on purpose: every command-line check imports this module, so it imports no
pandas, scipy, hdbscan, scikit-learn, matplotlib or W&B.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from polca_study.analysis.cluster import ClusterConfig
from polca_study.analysis.methods import METHODS
from polca_study.core.checks import ROUTES, SECOND_ORDER_MODES
from polca_study.errors import ConfigError, at_least, choice, did_you_mean
from polca_study.snapshots.model import ModelConfig
from polca_study.snapshots.train_config import TrainConfig
from polca_study.study.bases import KINDS as BASIS_KINDS
from polca_study.tasks import TASKS
from polca_study.tasks.arithmetic import ArithmeticScore
from polca_study.tasks.text import TextScore

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")  # installed with the package
LOGGER_MODES = ("auto", "offline", "online", "disabled")
STAGES = ("train", "basis", "decompose")
DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


@dataclass
class BasisConfig:
    kind: str = "hessian"  # hessian | random | shuffled (checkpoints in shuffled order)
    k: int = 1  # eigenvectors per basis checkpoint
    interval: int = 100  # steps between basis checkpoints
    tol: float = 1e-3  # Lanczos relative eigenvalue tolerance
    maxiter: int | None = None  # Lanczos restarts cap; None: scipy's default
    seed: int = II("seed")  # Lanczos start vectors, the random basis, the shuffled order
    drop_rising: bool = True  # drop vectors whose mean projected loss rises
    # Hessian-sample examples per graph: None holds one double-backward graph over the
    # whole sample (fastest); a chunk size bounds memory, each product then recomputes
    # the chunks' graphs (the paper model: 10.5 GB unchunked over 1,250 examples)
    chunk_size: int | None = None

    def __post_init__(self):
        choice("basis.kind", self.kind, BASIS_KINDS)
        at_least("basis.k", self.k, 1)
        at_least("basis.interval", self.interval, 1)
        if self.chunk_size is not None:
            at_least("basis.chunk_size", self.chunk_size, 1)


@dataclass
class PolcaConfig:
    interval: int = 25  # steps between evaluation points
    second_order: str = "path"  # none | exact | paper | path
    route: str = "auto"  # first-order route: auto | forward | reverse
    # basis kinds whose decompositions a decompose pass computes beside its own when they
    # are missing (modes none and path: one per-position backward serves every basis;
    # each is cached as if computed alone, bit for bit). The comparison sets all three.
    alongside: list[str] = field(default_factory=list)

    def __post_init__(self):
        at_least("polca.interval", self.interval, 1)
        choice("polca.second_order", self.second_order, SECOND_ORDER_MODES)
        choice("polca.route", self.route, ROUTES)
        for kind in self.alongside:
            choice("polca.alongside", kind, BASIS_KINDS)


@dataclass
class MethodConfig:
    name: str = "polca"

    def __post_init__(self):
        choice("method.name", self.name, METHODS)


@dataclass
class ScoreConfig:
    """What every task's scores share, and each task's own settings (`score.<task>`,
    defined beside the task)."""

    permutations: int = 100  # draws of the permutation null
    breakthrough_delta: int = 50  # Δ in steps for the maximum-acceleration time
    # a cluster's breakthrough is hidden when later than the aggregate loss's by this margin
    hidden_margin: int = 100
    # the metric a search maximises; null: the task's (carry_recovery_excess,
    # label_purity_excess), or one label's, e.g. label_copy_recovery_excess
    objective: str | None = None
    arithmetic: ArithmeticScore = field(default_factory=ArithmeticScore)
    text: TextScore = field(default_factory=TextScore)

    def __post_init__(self):
        # the objectives are measured against their permutation null
        at_least("score.permutations", self.permutations, 1)
        at_least("score.breakthrough_delta", self.breakthrough_delta, 1)
        at_least("score.hidden_margin", self.hidden_margin, 0)


# Each source has its own `snapshots` node: a setting of another source is refused.
# `tokenizer` (all of them): for text, a pretrained tokenizer (hub id or directory) in
# place of one trained on the corpus. `allow_duplicates` (all of them): analyse a store
# in which two steps hold identical parameters (refused by default: a recorder writing
# one snapshot twice, or a suite serving one revision's weights under another's name).


@dataclass
class TrainSnapshots:
    """`snapshots=train`: our own training (train.*), written into the cache as it goes."""

    kind: str = "train"
    tokenizer: str | None = None
    allow_duplicates: bool = False


@dataclass
class RecordedSnapshots:
    """`snapshots=recorded`: a store recorded in your own loop (`record.SnapshotRecorder`)."""

    kind: str = "recorded"
    path: str | None = None  # the store's directory (or the run directory holding snapshots/)
    # "package.module:function" returning the module (called with the manifest's config),
    # for a model that is neither ours nor a `transformers` one
    factory: str | None = None
    tokenizer: str | None = None
    allow_duplicates: bool = False

    def __post_init__(self):
        if not self.path:
            raise ConfigError(
                "snapshots.path must name the directory of a recorded snapshot store (snapshots=recorded)"
            )


@dataclass
class HuggingFaceSnapshots:
    """`snapshots=huggingface`: a `transformers` causal LM at several revisions."""

    kind: str = "huggingface"
    path: str | None = None  # a hub id (EleutherAI/pythia-70m) or a local directory of checkpoints
    # revisions (hub: step1000, ...; local: checkpoint-500, ...); empty: every checkpoint-N/
    # in a local directory
    revisions: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)  # each revision's step; empty: from its name
    tokenizer: str | None = None  # the yaml sets the model's own (its path)
    tokenizer_revision: str | None = None  # the yaml sets the first listed revision
    allow_duplicates: bool = False

    def __post_init__(self):
        if not self.path:
            raise ConfigError(
                "snapshots.path must name a Hugging Face model: a hub id (org/name) or a local directory"
            )


# the `snapshots` group's option -> its schema; `sources.SOURCES` has the code of each
SNAPSHOT_SCHEMAS = {s.kind: s for s in (TrainSnapshots, RecordedSnapshots, HuggingFaceSnapshots)}


# the `snapshots` group's option -> its schema; `sources.SOURCES` has the code of each
SNAPSHOT_SCHEMAS = {s.kind: s for s in (TrainSnapshots, RecordedSnapshots, HuggingFaceSnapshots)}


@dataclass
class LoggerConfig:
    mode: str = "auto"  # auto: online with an API key, else offline | offline | online | disabled
    project: str = "polca-study"
    entity: str | None = None
    group: str | None = None  # None: derived from the sweep directory
    tags: list[str] = field(default_factory=list)
    log_artifacts: bool = True

    def __post_init__(self):
        choice("logger.mode", self.mode, LOGGER_MODES)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: Any = MISSING  # the task's schema (tasks.TASKS), typed by the group option
    train: TrainConfig = field(default_factory=TrainConfig)
    snapshots: Any = MISSING  # the source's own schema (SNAPSHOT_SCHEMAS), typed by the group option
    basis: BasisConfig = field(default_factory=BasisConfig)
    polca: PolcaConfig = field(default_factory=PolcaConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    num_threads: int | None = None  # torch, BLAS and OpenMP threads; None: every core this process may use
    cache_dir: str = "${oc.env:POLCA_CACHE_DIR,.cache/polca_study}"
    force: list[str] = field(default_factory=list)  # stages to recompute
    progress: bool = True
    figures: bool = True
    save_trajectories: bool = True  # trajectories.parquet (and its W&B artifact)

    def __post_init__(self):
        # numpy's generators take seeds in [0, 2**32)
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")
        if not DEVICE.fullmatch(str(self.device)):
            raise ConfigError(f"device must be one of auto, cpu, cuda, cuda:N, got {self.device!r}")
        for stage in self.force:
            choice("force[]", stage, STAGES + ("all",))
        if self.num_threads is not None:
            at_least("num_threads", self.num_threads, 1)


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    # outside any group, so `--help` lists only real datasets as the group's options
    for kind in TASKS.values():
        cs.store(name=f"{kind.name}_schema", node=kind.schema)
    for name, schema in SNAPSHOT_SCHEMAS.items():
        cs.store(name=f"{name}_snapshots_schema", node=schema)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys no schema knows (a `+key=value` appended with a typo), each with the keys its
    node does know: [(dotted key, known keys of that node)]."""
    out = []
    schema = OmegaConf.get_type(cfg)
    known = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
    for key in cfg.keys():
        path = f"{prefix}{key}"
        if not prefix and key == "hydra":  # Hydra's own node (present in a job's config)
            continue
        if known is not None and key not in known:
            out.append((path, known))
            continue
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_missing() and not node._is_none():
            out += unknown_keys(node, f"{path}.")
    return out


def validate(cfg: DictConfig) -> Config:
    """The typed config, every group's own checks run, then the checks across groups.
    Raises ConfigError."""
    strays = unknown_keys(cfg)
    if strays:
        path, known = strays[0]
        parent, _, leaf = path.rpartition(".")
        hint = did_you_mean(leaf, [f"{parent}.{k}" if parent else k for k in known])
        raise ConfigError(f"{path} is not a setting of polca-study{hint}")
    try:
        obj: Config = OmegaConf.to_object(cfg)  # runs every schema's __post_init__
    except Exception as err:  # OmegaConf wraps __post_init__'s error with its context
        raise ConfigError(str(err).splitlines()[0]) from err
    _check_group_schemas(obj)
    _check_intervals(obj)
    needs = METHODS[obj.method.name].basis
    if needs is not None and obj.basis.kind != needs:
        raise ConfigError(
            f"method.name={obj.method.name} is POLCA along a {needs} basis: basis.kind must be {needs}"
        )
    return obj


def _check_group_schemas(obj: Config) -> None:
    """The dataset and snapshots nodes carry the schema of the option they name."""
    name = getattr(obj.dataset, "name", None)
    choice("dataset.name", name, TASKS)
    if not isinstance(obj.dataset, TASKS[name].schema):
        raise ConfigError(f"dataset.name={name!r} needs the dataset group's schema: use dataset={name}")
    kind = getattr(obj.snapshots, "kind", None)
    choice("snapshots.kind", kind, SNAPSHOT_SCHEMAS)
    if not isinstance(obj.snapshots, SNAPSHOT_SCHEMAS[kind]):
        raise ConfigError(f"snapshots.kind={kind!r} needs the snapshots group's schema: use snapshots={kind}")


def _check_intervals(obj: Config) -> None:
    """Our trainer's snapshots fall on multiples of train.checkpoint_every: the basis and
    POLCA intervals must too (another source's steps are whatever it holds)."""
    if obj.snapshots.kind != "train":
        return
    t = obj.train
    for path, interval in (("basis.interval", obj.basis.interval), ("polca.interval", obj.polca.interval)):
        if interval % t.checkpoint_every:
            raise ConfigError(
                f"{path}={interval} must be a multiple of train.checkpoint_every={t.checkpoint_every}"
            )
        if interval > t.steps:
            raise ConfigError(f"{path}={interval} must not exceed train.steps={t.steps}")
