"""Config schemas, registered in Hydra's ConfigStore.

The YAML files in `conf/` fill these dataclasses; a misspelt key or a wrong type fails
when Hydra composes the config, and `validate` checks values (every field is named in
its error with what is allowed) before any work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING, DictConfig, OmegaConf

from polca_study import bases, cluster, methods, source
from polca_study.cluster import ClusterConfig
from polca_study.errors import ConfigError, at_least, choice, did_you_mean
from polca_study.model import ModelConfig
from polca_study.tasks import TASKS
from polca_study.train import TrainConfig

# Option sets live with the code that implements them; this module only checks them.
METHODS = tuple(methods.METHODS)
BASIS_KINDS = tuple(bases.KINDS)
NORMALIZE, FEATURES, GROUPING = cluster.NORMALIZE, cluster.FEATURES, cluster.GROUPING
SELECTION, METRICS = cluster.SELECTION, cluster.METRICS
LOGGER_MODES = ("auto", "offline", "online", "disabled")
STAGES = ("train", "basis", "decompose")


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


@dataclass
class PolcaConfig:
    interval: int = 25  # steps between evaluation points
    second_order: str = "path"  # none | exact | paper | path
    route: str = "auto"  # first-order route: auto | forward | reverse
    # basis kinds whose decompositions a decompose pass computes beside its own when they
    # are missing (modes none and path: one per-position backward serves every basis;
    # each is cached as if computed alone, bit for bit). The comparison sets all three.
    alongside: list[str] = field(default_factory=list)


@dataclass
class MethodConfig:
    name: str = "polca"


@dataclass
class ScoreConfig:
    homogeneity_threshold: float = 0.85  # share of a cluster's carries in the 10s/100s
    permutations: int = 100  # draws of the permutation null
    breakthrough_delta: int = 50  # Δ in steps for the maximum-acceleration time
    # a cluster's breakthrough is hidden when later than the aggregate loss's by this margin
    hidden_margin: int = 100
    probe: bool = True  # the supervised carry probe (cross-validated AUC)
    label_coverage: float = 0.7  # text: a cluster's label covers this share of its tokens
    simple_max_tags: int = 2  # text: simply labelled when no position needs more tags
    contexts: int = 10  # text: contexts shown per cluster, nearest its medoid


@dataclass
class LoggerConfig:
    mode: str = "auto"  # auto: online with an API key, else offline | offline | online | disabled
    project: str = "polca-study"
    entity: str | None = None
    group: str | None = None  # None: derived from the sweep directory
    tags: list[str] = field(default_factory=list)
    log_artifacts: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: Any = MISSING  # the task's schema (tasks.TASKS), typed by the group option
    train: TrainConfig = field(default_factory=TrainConfig)
    snapshots: Any = MISSING  # the source's own schema (source.SOURCES), typed by the group option
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


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    # outside any group, so `--help` lists only real datasets as the group's options
    for kind in TASKS.values():
        cs.store(name=f"{kind.name}_schema", node=kind.schema)
    for name, src in source.SOURCES.items():
        cs.store(name=f"{name}_snapshots_schema", node=src.schema)


def unknown_keys(cfg: DictConfig, prefix: str = "") -> list[tuple[str, list[str]]]:
    """Keys no schema knows (a `+key=value` appended with a typo), each with the keys its
    node does know: [(dotted key, known keys of that node)]."""
    import dataclasses

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
    """Check every value a run depends on; return the typed config. Raises ConfigError."""
    strays = unknown_keys(cfg)
    if strays:
        path, known = strays[0]
        parent, _, leaf = path.rpartition(".")
        hint = did_you_mean(leaf, [f"{parent}.{k}" if parent else k for k in known])
        raise ConfigError(f"{path} is not a setting of polca-study{hint}")
    from polca_study import polca  # its option sets; scipy is not for `--help` to import

    try:
        # runs the schemas' __post_init__ checks (the model's, the dataset's)
        obj: Config = OmegaConf.to_object(cfg)
    except Exception as err:  # OmegaConf wraps __post_init__'s ValueError with its context
        raise ConfigError(str(err).splitlines()[0]) from err
    name = getattr(obj.dataset, "name", None)
    choice("dataset.name", name, TASKS)
    if not isinstance(obj.dataset, TASKS[name].schema):
        raise ConfigError(f"dataset.name={name!r} needs the dataset group's schema: use dataset={name}")
    kind = getattr(obj.snapshots, "kind", None)
    choice("snapshots.kind", kind, source.SOURCES)
    if not isinstance(obj.snapshots, source.SOURCES[kind].schema):
        raise ConfigError(f"snapshots.kind={kind!r} needs the snapshots group's schema: use snapshots={kind}")
    ours = obj.snapshots.kind == "train"  # other sources' steps are whatever they hold
    t = obj.train
    for name in ("steps", "batch_size", "checkpoint_every"):
        at_least(f"train.{name}", getattr(t, name), 1)
    at_least("train.warmup_steps", t.warmup_steps, 0)
    at_least("train.resume_every", t.resume_every, 0)
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    choice("basis.kind", obj.basis.kind, BASIS_KINDS)
    at_least("basis.k", obj.basis.k, 1)
    if obj.basis.chunk_size is not None:
        at_least("basis.chunk_size", obj.basis.chunk_size, 1)
    for path, interval in (("basis.interval", obj.basis.interval), ("polca.interval", obj.polca.interval)):
        at_least(path, interval, 1)
        if not ours:
            continue
        if interval % t.checkpoint_every:
            raise ConfigError(
                f"{path}={interval} must be a multiple of train.checkpoint_every={t.checkpoint_every}"
            )
        if interval > t.steps:
            raise ConfigError(f"{path}={interval} must not exceed train.steps={t.steps}")
    choice("polca.second_order", obj.polca.second_order, polca.SECOND_ORDER_MODES)
    choice("polca.route", obj.polca.route, polca.ROUTES)
    for kind in obj.polca.alongside:
        choice("polca.alongside", kind, BASIS_KINDS)
    c = obj.cluster
    at_least("cluster.min_cluster_size", c.min_cluster_size, 2)
    if not c.min_samples > 0:
        raise ConfigError(
            f"cluster.min_samples must be a count >= 1 or a fraction in (0, 1), got {c.min_samples}"
        )
    choice("cluster.selection_method", c.selection_method, SELECTION)
    choice("cluster.metric", c.metric, METRICS)
    choice("cluster.normalize", c.normalize, NORMALIZE)
    choice("cluster.feature", c.feature, FEATURES)
    choice("cluster.grouping", c.grouping, GROUPING)
    if len(c.window) != 2:
        raise ConfigError(f"cluster.window must be [start, stop] evaluation indices, got {c.window}")
    choice("method.name", obj.method.name, METHODS)
    needs = methods.METHODS[obj.method.name].basis
    if needs is not None and obj.basis.kind != needs:
        raise ConfigError(
            f"method.name={obj.method.name} is POLCA along a {needs} basis: basis.kind must be {needs}"
        )
    if not 0.5 <= obj.score.homogeneity_threshold <= 1:
        raise ConfigError("score.homogeneity_threshold must be in [0.5, 1]")
    # the objectives are measured against their permutation null
    at_least("score.permutations", obj.score.permutations, 1)
    at_least("score.breakthrough_delta", obj.score.breakthrough_delta, 1)
    at_least("score.hidden_margin", obj.score.hidden_margin, 0)
    if not 0 < obj.score.label_coverage <= 1:
        raise ConfigError(f"score.label_coverage must be in (0, 1], got {obj.score.label_coverage}")
    at_least("score.simple_max_tags", obj.score.simple_max_tags, 1)
    at_least("score.contexts", obj.score.contexts, 1)
    choice("logger.mode", obj.logger.mode, LOGGER_MODES)
    for stage in obj.force:
        choice("force[]", stage, STAGES + ("all",))
    if obj.num_threads is not None:
        at_least("num_threads", obj.num_threads, 1)
    return obj
