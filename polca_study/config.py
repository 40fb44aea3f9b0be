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

from polca_study import cluster, methods, polca, source
from polca_study.cluster import ClusterConfig
from polca_study.data.corpus import SOURCES
from polca_study.data.tagging import TAGGERS
from polca_study.data.text import TextConfig
from polca_study.model import ModelConfig
from polca_study.source import SnapshotsConfig
from polca_study.train import TrainConfig

METHODS = tuple(methods.METHODS)
BASIS_KINDS = ("hessian", "random", "shuffled")
# Option sets live with the code that implements them; this module only checks them.
SECOND_ORDER = polca.SECOND_ORDER_MODES
ROUTES = polca.ROUTES
NORMALIZE, FEATURES, GROUPING = cluster.NORMALIZE, cluster.FEATURES, cluster.GROUPING
SELECTION, METRICS = cluster.SELECTION, cluster.METRICS
LOGGER_MODES = ("auto", "offline", "online", "disabled")
STAGES = ("train", "basis", "decompose")


DATASETS = ("arithmetic", "text")


@dataclass
class ArithmeticConfig:
    """The `dataset` group for 3-digit addition (`dataset=arithmetic`)."""

    name: str = "arithmetic"
    eval_size: int = 1250  # evaluation examples (4 output tokens each)
    hessian_size: int = 1250  # training examples in the Hessian sample
    carry_rate: float | None = 0.08  # share of carrying training sums; None: uniform
    seed: int = II("seed")  # the evaluation tokens and Hessian sample follow the run's seed

    @property
    def label(self) -> str:
        """The training data in a word, for run names: the carry rate, or uniform."""
        return "uniform" if self.carry_rate is None else f"carry{self.carry_rate:g}"


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
    dataset: Any = MISSING  # ArithmeticConfig or TextConfig, typed by the group option
    train: TrainConfig = field(default_factory=TrainConfig)
    snapshots: SnapshotsConfig = field(default_factory=SnapshotsConfig)
    basis: BasisConfig = field(default_factory=BasisConfig)
    polca: PolcaConfig = field(default_factory=PolcaConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    device: str = "auto"  # auto (CUDA when available) | cpu | cuda | cuda:N
    num_threads: int | None = None  # torch CPU threads; None: torch's default
    cache_dir: str = "${oc.env:POLCA_CACHE_DIR,.cache/polca_study}"
    force: list[str] = field(default_factory=list)  # stages to recompute
    progress: bool = True
    figures: bool = True
    save_trajectories: bool = True  # trajectories.parquet (and its W&B artifact)


class ConfigError(ValueError):
    """A setting a run cannot use; the message names the field, the value and what is allowed."""


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    # outside any group, so `--help` lists only real datasets as the group's options
    cs.store(name="arithmetic_schema", node=ArithmeticConfig)
    cs.store(name="text_schema", node=TextConfig)


def _choice(path: str, value: object, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{path} must be one of {list(allowed)}, got {value!r}{did_you_mean(value, allowed)}"
        )


def _at_least(path: str, value: float, low: float) -> None:
    if value is None or value < low:
        raise ConfigError(f"{path} must be >= {low}, got {value!r}")


def _validate_dataset(d) -> None:
    _choice("dataset.name", getattr(d, "name", None), DATASETS)
    _at_least("dataset.hessian_size", d.hessian_size, 1)
    if isinstance(d, ArithmeticConfig):
        _at_least("dataset.eval_size", d.eval_size, 1)
        if d.carry_rate is not None and not 0 <= d.carry_rate <= 1:
            raise ConfigError(f"dataset.carry_rate must be in [0, 1] or null, got {d.carry_rate}")
        return
    if not isinstance(d, TextConfig):
        raise ConfigError(f"dataset.name={d.name!r} needs the dataset group's schema: use dataset={d.name}")
    _choice("dataset.source", d.source, SOURCES)
    _choice("dataset.tagger", d.tagger, TAGGERS)
    if d.source == "files" and not d.files:
        raise ConfigError("dataset.files must list text files (paths or globs) for dataset.source=files")
    if d.source == "huggingface" and not d.hf_name:
        raise ConfigError("dataset.hf_name must name a Hugging Face dataset for dataset.source=huggingface")
    if not 0 < d.val_fraction < 1:
        raise ConfigError(f"dataset.val_fraction must be in (0, 1), got {d.val_fraction}")
    _at_least("dataset.vocab_size", d.vocab_size, 260)  # 256 bytes, the end-of-text token, merges
    _at_least("dataset.n_ctx", d.n_ctx, 2)
    _at_least("dataset.eval_tokens", d.eval_tokens, 1)
    _at_least("dataset.eval_positions", d.eval_positions, 1)
    if d.eval_positions > d.n_ctx - d.n_ctx // 2:
        raise ConfigError(
            f"dataset.eval_positions must be <= n_ctx/2 (targets come from the second "
            f"half of each context), got {d.eval_positions} with n_ctx={d.n_ctx}"
        )
    if d.max_chars is not None:
        _at_least("dataset.max_chars", d.max_chars, 1)


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


def did_you_mean(word: str, options) -> str:
    """' (did you mean x?)' for the closest option, or ''."""
    import difflib

    options = [str(o) for o in options]
    # compare leaf with leaf (cluster.min_cluster_siz with cluster.min_cluster_size)
    leaves = {o.rpartition(".")[2]: o for o in options}
    close = difflib.get_close_matches(str(word).rpartition(".")[2], list(leaves), n=1, cutoff=0.6)
    return f" (did you mean {leaves[close[0]]}?)" if close else ""


def validate(cfg: DictConfig) -> Config:
    """Check every value a run depends on; return the typed config. Raises ConfigError."""
    strays = unknown_keys(cfg)
    if strays:
        path, known = strays[0]
        parent, _, leaf = path.rpartition(".")
        hint = did_you_mean(leaf, [f"{parent}.{k}" if parent else k for k in known])
        raise ConfigError(f"{path} is not a setting of polca-study{hint}")
    try:
        obj: Config = OmegaConf.to_object(cfg)  # runs ModelConfig.__post_init__ checks
    except Exception as err:  # OmegaConf wraps __post_init__'s ValueError with its context
        raise ConfigError(str(err).splitlines()[0]) from err
    _validate_dataset(obj.dataset)
    _choice("snapshots.kind", obj.snapshots.kind, source.KINDS)
    ours = obj.snapshots.kind == "train"  # other sources' steps are whatever they hold
    t = obj.train
    for name in ("steps", "batch_size", "checkpoint_every"):
        _at_least(f"train.{name}", getattr(t, name), 1)
    _at_least("train.warmup_steps", t.warmup_steps, 0)
    _at_least("train.resume_every", t.resume_every, 0)
    if not t.lr > 0:
        raise ConfigError(f"train.lr must be > 0, got {t.lr}")
    _choice("basis.kind", obj.basis.kind, BASIS_KINDS)
    _at_least("basis.k", obj.basis.k, 1)
    if obj.basis.chunk_size is not None:
        _at_least("basis.chunk_size", obj.basis.chunk_size, 1)
    for path, interval in (("basis.interval", obj.basis.interval), ("polca.interval", obj.polca.interval)):
        _at_least(path, interval, 1)
        if not ours:
            continue
        if interval % t.checkpoint_every:
            raise ConfigError(
                f"{path}={interval} must be a multiple of train.checkpoint_every={t.checkpoint_every}"
            )
        if interval > t.steps:
            raise ConfigError(f"{path}={interval} must not exceed train.steps={t.steps}")
    _choice("polca.second_order", obj.polca.second_order, SECOND_ORDER)
    _choice("polca.route", obj.polca.route, ROUTES)
    c = obj.cluster
    _at_least("cluster.min_cluster_size", c.min_cluster_size, 2)
    if not c.min_samples > 0:
        raise ConfigError(
            f"cluster.min_samples must be a count >= 1 or a fraction in (0, 1), got {c.min_samples}"
        )
    _choice("cluster.selection_method", c.selection_method, SELECTION)
    _choice("cluster.metric", c.metric, METRICS)
    _choice("cluster.normalize", c.normalize, NORMALIZE)
    _choice("cluster.feature", c.feature, FEATURES)
    _choice("cluster.grouping", c.grouping, GROUPING)
    if len(c.window) != 2:
        raise ConfigError(f"cluster.window must be [start, stop] evaluation indices, got {c.window}")
    _choice("method.name", obj.method.name, METHODS)
    needs = methods.METHODS[obj.method.name].basis
    if needs is not None and obj.basis.kind != needs:
        raise ConfigError(
            f"method.name={obj.method.name} is POLCA along a {needs} basis: basis.kind must be {needs}"
        )
    if not 0.5 <= obj.score.homogeneity_threshold <= 1:
        raise ConfigError("score.homogeneity_threshold must be in [0.5, 1]")
    # the objectives are measured against their permutation null
    _at_least("score.permutations", obj.score.permutations, 1)
    _at_least("score.breakthrough_delta", obj.score.breakthrough_delta, 1)
    _at_least("score.hidden_margin", obj.score.hidden_margin, 0)
    if not 0 < obj.score.label_coverage <= 1:
        raise ConfigError(f"score.label_coverage must be in (0, 1], got {obj.score.label_coverage}")
    _at_least("score.simple_max_tags", obj.score.simple_max_tags, 1)
    _at_least("score.contexts", obj.score.contexts, 1)
    _choice("logger.mode", obj.logger.mode, LOGGER_MODES)
    for stage in obj.force:
        _choice("force[]", stage, STAGES + ("all",))
    if obj.num_threads is not None:
        _at_least("num_threads", obj.num_threads, 1)
    return obj
