"""Where a study's snapshots come from: the `snapshots` config group.

    snapshots=train        our trainer writes them into the cache (the default)
    snapshots=recorded     a store written by `record.SnapshotRecorder` in your own loop
                           (or by our trainer elsewhere), read in place
    snapshots=huggingface  a causal language model at a list of revisions: a hub id with
                           revisions such as Pythia's step1000, or a local directory of
                           saved checkpoints (checkpoint-500/, ...)

Every source hands the stages the same thing: a `SnapshotRun` (a snapshot store and the
learning curves of the evaluation tokens at each snapshot) and a module of the right
architecture to evaluate the loss through `functional_call`. The stages never ask which
source they have: a new source is a class here and an entry in `SOURCES`.

A model is rebuilt only from what the user's config or a known library names: our
`Transformer` from its config, a `transformers` model from its config (with eager
attention, which forward-mode AD can differentiate), anything else through
`snapshots.factory`, an import path the user gives. A store's manifest never chooses
code to import.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from abc import ABC, abstractmethod
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from polca_study.errors import ConfigError, choice, first_line
from polca_study.snapshots.architecture import ModelOf, build_model, model_info
from polca_study.snapshots.checks import check_intervals, check_store
from polca_study.snapshots.run import SnapshotRun
from polca_study.snapshots.store import (
    CorruptSnapshot,
    SnapshotStore,
    SnapshotWriter,
    StoreError,
    parameters_of,
    read_manifest,
    snapshot_bytes,
)
from polca_study.snapshots.train import train
from polca_study.study.config import HuggingFaceSnapshots, RecordedSnapshots, TrainSnapshots

log = logging.getLogger("polca_study")


def check_matches(store: SnapshotStore, module: nn.Module) -> None:
    """The module's parameters have the store's shapes in the store's order."""
    have = [tuple(p.shape) for p in parameters_of(module)]
    want = [p.shape for p in store.parameters]
    if have != want:
        pairs = enumerate(zip(have, want, strict=False))
        first = next((i for i, (a, b) in pairs if a != b), min(len(have), len(want)))
        raise ConfigError(
            f"the model built for {store.directory} has {len(have)} parameters, the store "
            f"{len(want)}; they first differ at index {first}"
            ": check snapshots.factory or the store's model config"
        )


def evaluate_snapshots(store: SnapshotStore, module: nn.Module, task, device) -> pd.DataFrame:
    """The learning curves of the evaluation tokens: `task.evaluate` at every snapshot,
    one snapshot in memory at a time."""
    module = module.to(device).eval()
    rows = []
    for step in store.steps:
        torch.nn.utils.vector_to_parameters(store.flat(int(step), torch.float32, device), module.parameters())
        with torch.no_grad():
            rows.append(pd.DataFrame(task.evaluate(module, task.eval_split)).assign(step=int(step)))
    return pd.concat(rows, ignore_index=True)


class Source(ABC):
    """Snapshots for the stages. `prepare` returns (SnapshotRun, key): the key names the
    snapshots in the cache keys of the stages that read them. A source is a class here
    with its config node (`schema`, a dataclass) and an entry in `SOURCES`.

    Every source checks its store (`snapshots.checks`): the manifest and the steps an
    interval needs as it opens it, the files (integrity, identical parameters) before the
    first read, so a run whose stages are all cached reads none. A store it made itself
    and finds damaged it makes again (`again`); one made elsewhere it refuses, naming the
    file and the step."""

    schema: type
    # steps on a regular grid (our trainer, a recorder): every multiple of the basis and
    # POLCA intervals in the store's range must be a snapshot. A suite of revisions is
    # whatever steps were listed.
    regular: bool = True

    def __init__(self, cfg):
        self.cfg = cfg
        self.snapshots = cfg.snapshots
        self._info: dict | None = None

    @abstractmethod
    def prepare(self, task, cache, device, progress) -> tuple[SnapshotRun, str]:
        """The checked snapshots and their learning curves, and the key that names them."""

    def check_settings(self) -> None:  # noqa: B027  most sources have nothing to check early
        """What can be checked of the source before any work (a path that is not there)."""

    def watch(self, store: SnapshotStore) -> SnapshotStore:
        """The store, its steps checked now and its files before the first read: whole, as
        its manifest says, without two steps of identical parameters (unless allowed).
        The file checks raise CorruptSnapshot (a file) or StoreError."""
        if self.regular:
            intervals = {"basis.interval": self.cfg.basis.interval, "polca.interval": self.cfg.polca.interval}
            check_intervals(store.steps.tolist(), intervals, str(store.directory))
        store.before_first_read = lambda: check_store(store, self.snapshots.allow_duplicates)
        return store

    def again(self, err: CorruptSnapshot, task, cache, device, progress) -> tuple[SnapshotRun, str]:
        """The snapshots made afresh, when a damaged file was found in them (`err`)."""
        raise StoreError(f"{err}; a recorded store cannot be recomputed here: record it again") from None

    def model(self, task) -> nn.Module:
        """A fresh module of the snapshots' architecture in eval mode, for every stage
        that evaluates it (the parameters come from the snapshots). Whatever mode it was
        built or recorded in, the analysis must be deterministic: dropout left on made
        Hessian-vector products random (a silently wrong basis) and the decomposition
        fail under vmap."""
        return self.build(task).eval()

    def build(self, task) -> nn.Module:
        """A fresh module of the snapshots' architecture, in the mode it is built in."""
        return build_model(self._info, getattr(self.snapshots, "factory", None))

    def _opened(self, store: SnapshotStore, key: str, task, cache, device) -> tuple[SnapshotRun, str]:
        """A store made elsewhere, checked against the model it describes, with its
        learning curves evaluated once and cached."""
        self._info = store.model
        module = self.model(task)
        check_matches(store, module)
        history = _curves(cache, {"snapshots": key, "dataset": task.spec}, store, module, task, device)
        return SnapshotRun(store, history, pd.DataFrame(columns=["step", "loss"]), 0.0), key


class TrainedHere(Source):
    """Our trainer, writing the store into the cache as it goes; a killed run resumes."""

    schema = TrainSnapshots

    def model_config(self, task):
        m = self.cfg.model
        m = replace(m, n_ctx=m.n_ctx or task.n_ctx, d_vocab=m.d_vocab or task.d_vocab)
        if m.n_ctx < task.n_ctx or m.d_vocab < task.d_vocab:
            raise ConfigError(
                f"model.n_ctx={m.n_ctx} and model.d_vocab={m.d_vocab} must be at least the "
                f"dataset's {task.n_ctx} and {task.d_vocab} (null: take the dataset's)"
            )
        return m

    def build(self, task) -> nn.Module:
        from polca_study.snapshots.model import Transformer

        torch.manual_seed(self.cfg.seed)
        return Transformer(self.model_config(task))

    def prepare(self, task, cache, device, progress):
        cfg = self.cfg
        m = self.model_config(task)
        settings = asdict(cfg.train)
        settings.pop("resume_every")  # when the state is saved does not change the run
        spec = {"model": asdict(m), "dataset": task.spec, "train": settings, "seed": cfg.seed}

        def build(work: Path) -> None:
            model = self.build(task).train()
            check_disk(work, model, cfg.train)
            if device.type == "cuda":
                torch.backends.cudnn.deterministic = True
            train(
                model,
                task.train_batches(cfg.train.batch_size, cfg.seed),
                cfg.train,
                task.token_loss,
                lambda m: task.evaluate(m, task.eval_split),
                work,
                device=device,
                progress=progress,
                model_info=model_info(model),
            )

        run, key = cache.get_or_build("train", spec, build, SnapshotRun.load, again=self._again)
        self.watch(run.store)
        return run, key

    _again = False

    def again(self, err, task, cache, device, progress):
        """Ours to make again, as a corrupt cache entry is: train afresh (bit for bit the
        same snapshots on CPU)."""
        if self._again:  # trained afresh and still damaged: nothing more to do here
            raise StoreError(str(err)) from None
        log.warning("the cached training run is damaged (%s): training it again", err)
        self._again = True
        return self.prepare(task, cache, device, progress)


def check_disk(where: Path, model: nn.Module, train_cfg) -> None:
    """Log the snapshot store's size and fail before training when it cannot fit."""
    snapshots = train_cfg.steps // train_cfg.checkpoint_every + 1
    per = snapshot_bytes(parameters_of(model, torch.float32))
    need = snapshots * per + 4 * per  # and the saved training state (model, optimizer, RNG)
    free = shutil.disk_usage(where).free
    log.info(
        "the snapshot store will hold %d snapshots of %.1f MB: %.2f GB (%.1f GB free in %s)",
        snapshots,
        per / 1e6,
        need / 1e9,
        free / 1e9,
        where.parent,
    )
    if need > free:
        raise ConfigError(
            f"the cache at {where.parent} has {free / 1e9:.1f} GB free, but training writes "
            f"{snapshots} snapshots of {per / 1e6:.1f} MB ({need / 1e9:.1f} GB); free space, "
            f"point cache_dir elsewhere, or raise train.checkpoint_every (now {train_cfg.checkpoint_every})"
        )


def store_fingerprint(store: SnapshotStore) -> str:
    """The store's content: its parameters, the SHA-256 of every snapshot its manifest
    lists, and the model they belong to (class and config: an edited activation or norm
    epsilon is another model, whose stages are computed anew)."""
    manifest = read_manifest(store.directory)
    blob = json.dumps([manifest["parameters"], manifest["snapshots"], manifest.get("model")], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _curves(cache, spec: dict, store: SnapshotStore, module, task, device) -> pd.DataFrame:
    result, _ = cache.get_or_compute(
        "curves", spec, lambda: {"history": evaluate_snapshots(store, module, task, device)}
    )
    return result["history"]


class RecordedSource(Source):
    """A store recorded elsewhere (`SnapshotRecorder`, or our trainer), read in place."""

    schema = RecordedSnapshots

    def _directory(self) -> Path:
        path = Path(self.snapshots.path)
        if not path.is_dir():
            raise ConfigError(
                f"snapshots.path={self.snapshots.path} is not a directory: name a recorded snapshot store"
            )
        return path / "snapshots" if (path / "snapshots" / "manifest.json").exists() else path

    def check_settings(self) -> None:
        read_manifest(self._directory())

    def prepare(self, task, cache, device, progress):
        store = self.watch(SnapshotStore(self._directory()))
        try:
            return self._opened(store, f"recorded-{store_fingerprint(store)}", task, cache, device)
        except CorruptSnapshot as err:  # read by the learning curves
            return self.again(err, task, cache, device, progress)


def revision_step(revision: str) -> int:
    """The training step in a revision's name: step1000 -> 1000, checkpoint-500 -> 500."""
    numbers = re.findall(r"\d+", revision)
    if not numbers:
        raise ConfigError(
            f"cannot read a training step from revision {revision!r}: list them in snapshots.steps"
        )
    return int(numbers[-1])


class HuggingFaceSource(Source):
    """A `transformers` causal LM at several revisions. Each revision is loaded in
    float32 with eager attention, written into a store in the cache and released, so
    one model is in memory at a time; an interrupted import resumes at the revision it
    had reached."""

    schema = HuggingFaceSnapshots
    regular = False

    def revisions(self) -> list[tuple[str, int]]:
        s = self.snapshots
        path = Path(s.path)
        revisions = list(s.revisions)
        if not revisions:
            if not path.is_dir():
                raise ConfigError(
                    "snapshots.revisions must list the revisions of a hub model "
                    "(e.g. [step0,step1000]); only a local directory can be scanned for checkpoint-N/"
                )
            revisions = sorted((d.name for d in path.glob("checkpoint-*") if d.is_dir()), key=revision_step)
            if not revisions:
                raise ConfigError(f"snapshots.path={s.path} holds no checkpoint-N/ directories")
        if s.steps and len(s.steps) != len(revisions):
            raise ConfigError(
                f"snapshots.steps has {len(s.steps)} entries for {len(revisions)} revisions; "
                "give one step per revision or none"
            )
        steps = list(s.steps) or [revision_step(r) for r in revisions]
        if len(set(steps)) != len(steps):
            shared = dict(zip(revisions, steps, strict=True))
            raise ConfigError(f"snapshots: two revisions share a step: {shared}")
        return sorted(zip(revisions, steps, strict=True), key=lambda rs: rs[1])

    def _local(self, revision: str) -> Path | None:
        local = Path(self.snapshots.path) / revision
        return local if local.is_dir() else None

    def _where(self, revision: str) -> tuple[str, dict]:
        local = self._local(revision)
        return (str(local), {}) if local else (self.snapshots.path, {"revision": revision})

    def _refused(self, revision: str, err: OSError) -> ConfigError:
        first = first_line(err)
        which = f"revision {revision} of {self.snapshots.path}"
        return ConfigError(f"snapshots.revisions: {which} could not be loaded: {first}")

    def check_revisions(self, pairs: list[tuple[str, int]]) -> None:
        """Every revision's config is there (in the cache offline) before any is imported:
        a missing one is named now, not after the others were imported."""
        from transformers import AutoConfig

        for revision, _ in pairs:
            where, kwargs = self._where(revision)
            try:
                AutoConfig.from_pretrained(where, **kwargs)
            except OSError as err:  # not in the cache offline, not on the hub, or no such revision
                raise self._refused(revision, err) from None

    def _load(self, revision: str) -> nn.Module:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per revision on stderr, between our lines
        where, kwargs = self._where(revision)
        try:
            model = AutoModelForCausalLM.from_pretrained(
                where, dtype=torch.float32, attn_implementation="eager", **kwargs
            )
        except OSError as err:
            raise self._refused(revision, err) from None
        return ModelOf(model)

    def _identity(self, revision: str) -> str:
        """A local checkpoint by its files' names, sizes and times; a hub one by name."""
        local = self._local(revision)
        if not local:
            return revision
        files = sorted(
            (p.relative_to(local).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
            for p in local.rglob("*")
            if p.is_file()
        )
        return hashlib.sha256(json.dumps(files).encode()).hexdigest()[:20]

    def prepare(self, task, cache, device, progress):
        pairs = self.revisions()
        spec = {"path": self.snapshots.path, "revisions": [[r, s, self._identity(r)] for r, s in pairs]}

        def build(work: Path) -> None:
            store = work / "snapshots"
            done = set(SnapshotStore(store).steps.tolist()) if (store / "manifest.json").exists() else set()
            self.check_revisions([(r, s) for r, s in pairs if s not in done])
            writer = None
            for revision, step in pairs:
                if step in done:
                    continue  # imported before an interruption
                module = self._load(revision)
                writer = writer or SnapshotWriter.for_module(store, module, model_info(module))
                writer.write(step, module)
                log.info("imported revision %s (step %d)", revision, step)
                del module

        def open_(directory: Path) -> SnapshotStore:
            return SnapshotStore(directory / "snapshots")

        store, key = cache.get_or_build("snapshots", spec, build, open_, again=self._again)
        try:
            return self._opened(self.watch(store), key, task, cache, device)
        except CorruptSnapshot as err:  # read by the learning curves
            return self.again(err, task, cache, device, progress)

    _again = False

    def again(self, err, task, cache, device, progress):
        """Ours to make again: import the revisions afresh."""
        if self._again:  # imported afresh and still damaged: nothing more to do here
            raise StoreError(str(err)) from None
        log.warning("the imported revisions are damaged (%s): importing them again", err)
        self._again = True
        return self.prepare(task, cache, device, progress)


SOURCES: dict[str, type[Source]] = {
    "train": TrainedHere,
    "recorded": RecordedSource,
    "huggingface": HuggingFaceSource,
}


def make_source(cfg) -> Source:
    choice("snapshots.kind", cfg.snapshots.kind, SOURCES)
    return SOURCES[cfg.snapshots.kind](cfg)


def snapshot_steps(run: SnapshotRun, every: int, last: int | None = None) -> np.ndarray:
    """The stored steps that are multiples of `every` (and at most `last`)."""
    steps = run.steps[run.steps % every == 0]
    if last is not None:
        steps = steps[steps <= last]
    return steps
