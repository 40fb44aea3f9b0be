"""Content-addressed cache for the expensive stages.

The stages it holds, and who asks for them:
    train       our trainer's snapshot store and learning curves (`sources.TrainedHere`)
    snapshots   a Hugging Face suite imported into a store (`sources.HuggingFaceSource`)
    curves      the learning curves of a store made elsewhere (`sources`)
    basis       the basis vectors (`stages.stage_basis`)
    decompose   POLCA along the basis (`stages.stage_decompose`)
    lca         LCA's per-parameter decomposition (`stages`, a decomposition too)
    tokenizer   the text task's BPE tokenizer and token ids (`tasks.text_data`)
    tags        the text task's part-of-speech tags (`tasks.text_data`)

A stage's result lives in `<root>/<stage>/<key>/`, the key a hash of exactly the
config that determines it (plus the keys of the stages it reads). Writes go to a
temporary directory renamed into place, so a killed run leaves nothing half-written;
a SHA-256 of every payload file is checked on every load, and a corrupt entry is
recomputed.

A payload holds no code: arrays and tensors in `arrays.npz` (read without pickle),
DataFrames as `<name>.parquet`, other values in `values.json`; `meta.json` records each
key's kind. A cache directory shared on a cluster can be read without trusting it.
Entries of the earlier pickled format are recomputed.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from polca_study.atomic import write_atomic
from polca_study.errors import ConfigError
from polca_study.paths import unwritable

log = logging.getLogger(__name__)
# Bump when a stage's computation changes, so old entries are not reused. decompose 3:
# a job continues from a stage's stored form (below), so decompositions along a random
# basis differ by 1e-7 from those of version 2, which projected along the computed
# column-major QR factor; an old cache would otherwise keep the old values.
CODE_VERSION = {"train": 2, "basis": 2, "decompose": 3, "lca": 2}
# Stages that `force=[<name>]` recomputes besides the one of that name: LCA's
# per-parameter decomposition (stage "lca") is a decomposition too.
FORCE_ALSO = {"decompose": {"lca"}}


def stage_key(stage: str, spec: dict) -> str:
    blob = json.dumps(
        {"stage": stage, "version": CODE_VERSION.get(stage, 0), "spec": spec}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class StageCache:
    def __init__(
        self, root: str | os.PathLike, force: set[str] | None = None, environment: dict | None = None
    ):
        self.root = Path(root)
        problem = unwritable(self.root)
        if problem and not self.root.is_dir():  # "is a file", or nothing there to read
            raise ConfigError(f"cache_dir={root} cannot hold a cache: {problem}")
        # A read-only cache (a shared copy, a read-only mount) is read as it is: its locks
        # go to a directory of this machine's, and a stage missing from it is refused.
        self.read_only = problem is not None
        # what computed the entries (library versions, threads, device): recorded, not keyed
        self.environment = environment or {}
        self.force = set(force or ())
        for name in list(self.force):
            self.force |= FORCE_ALSO.get(name, set())
        self.hits: dict[str, bool] = {}

    def aside(self) -> StageCache:
        """The same entries, with a record of hits of its own: for a stage a job computes
        for another's sake, which must not stand in the job's record of its own."""
        view = copy.copy(self)
        view.hits = {}
        return view

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> dict[str, Any] | None:
        where = self.path(stage, key)
        meta_file = where / "meta.json"
        if not meta_file.exists():
            return None
        meta = json.loads(meta_file.read_text())
        if "kinds" not in meta:
            log.warning("cache entry %s/%s is in an older (pickled) format; recomputing", stage, key)
            return None
        for name, digest in meta["files"].items():
            if not (where / name).exists() or _sha256(where / name) != digest:
                log.warning("cache entry %s/%s failed its integrity check; recomputing", stage, key)
                return None
        try:
            return _read_payload(where, meta["kinds"])
        except Exception as err:  # a file that passed its hash but cannot be parsed
            log.warning("cache entry %s/%s could not be read (%s); recomputing", stage, key, err)
            return None

    def save(self, stage: str, key: str, spec: dict, result: dict[str, Any], replace: bool = False) -> None:
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            kinds = _write_payload(tmp, result)
            files = {p.name: _sha256(p) for p in sorted(tmp.iterdir())}
            meta = {
                "stage": stage,
                "key": key,
                "spec": spec,
                "kinds": kinds,
                "files": files,
                "environment": self.environment,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            if final.exists() and (replace or self.load(stage, key) is None):
                stale = final.with_name(f".stale-{key}-{os.getpid()}")
                os.replace(final, stale)  # forced, corrupt or old: move the old entry aside
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another job finished the same stage first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _lock_dir(self, stage: str) -> Path:
        if not self.read_only:
            return self.root / stage
        beside = hashlib.sha256(str(self.root.resolve()).encode()).hexdigest()[:16]
        return Path(tempfile.gettempdir()) / "polca-study-locks" / beside / stage

    def _refuse_if_read_only(self, stage: str, key: str) -> None:
        """Before any work: a stage a read-only cache lacks could not be stored."""
        if self.read_only:
            raise ConfigError(
                f"cache_dir={self.root} is read-only and holds no {stage} entry for this run ({key}): "
                "point cache_dir at a writable directory (a copy of this one keeps its entries)"
            )

    @contextmanager
    def lock(self, stage: str, key: str) -> Iterator[None]:
        """Hold the entry's lock: parallel jobs (the joblib launcher, workers sharing a
        cache) that miss the same entry compute it once; the others wait, then read it."""
        where = self._lock_dir(stage)
        where.mkdir(parents=True, exist_ok=True)
        with open(where / f".{key}.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def get_or_compute(
        self, stage: str, spec: dict, compute: Callable[[], Any], result_type: type | None = None
    ):
        """The cached result of `stage` for `spec`, computing and storing it on a miss.
        Returns (result, key). `result_type`: the dataclass `compute` returns (saved field
        by field, rebuilt on load); None for a dict."""
        return self.get_or_compute_together(stage, [spec], lambda missing: [compute()], result_type)[0]

    def get_or_compute_together(
        self,
        stage: str,
        specs: list[dict],
        compute: Callable[[list[int]], list[Any]],
        result_type: type | None = None,
    ) -> list[tuple[Any, str]]:
        """`get_or_compute` for entries that are cheaper computed in one pass. The first
        spec is the caller's own (`hits` records it, `force` recomputes it); the others
        ride along: computed only when the caller's own entry is, and only those missing.
        `compute(missing)` returns the results of the specs at those indices, in order,
        None for one it could not compute (not stored; its own job will say why). The
        missing entries are locked in key order, so jobs that need overlapping groups wait
        for each other instead of computing an entry twice or deadlocking."""
        keys = [stage_key(stage, spec) for spec in specs]
        forced = stage in self.force or "all" in self.force
        load = lambda i: None if forced and i == 0 else self.load(stage, keys[i])  # noqa: E731
        results = [load(0)] + [None] * (len(keys) - 1)
        self.hits[stage] = results[0] is not None
        if results[0] is None:
            results[1:] = [load(i) for i in range(1, len(keys))]
            missing = [i for i, r in enumerate(results) if r is None]
            with ExitStack() as held:
                for key in sorted({keys[i] for i in missing}):
                    held.enter_context(self.lock(stage, key))
                for i in missing:  # another job's, meanwhile
                    results[i] = load(i)
                self.hits[stage] = results[0] is not None
                missing = [i for i, r in enumerate(results) if r is None] if results[0] is None else []
                if missing:
                    self._refuse_if_read_only(stage, keys[missing[0]])
                computed = compute(missing) if missing else []
                for i, value in zip(missing, computed, strict=True):
                    if value is None:
                        continue
                    self.save(stage, keys[i], specs[i], _fields(value), replace=forced and i == 0)
                    # Continue from what was stored, not from what was computed: a result
                    # computed here can differ from its stored form in memory layout (a QR
                    # factor is column-major; a loaded array is C-ordered), and float32
                    # products over another layout sum in another order. Such 1e-7
                    # differences flipped HDBSCAN clusters: a job that computed a stage and
                    # one that read it (after a kill, or beside another job) disagreed.
                    results[i] = self.load(stage, keys[i])
                    if results[i] is None:  # unreadable right after writing: go on as computed
                        results[i] = _fields(value)
        build = lambda r: None if r is None else (result_type(**r) if result_type else r)  # noqa: E731
        return [(build(r), key) for r, key in zip(results, keys, strict=True)]

    def get_or_build(
        self,
        stage: str,
        spec: dict,
        build: Callable[[Path], None],
        open_: Callable[[Path], Any],
        again: bool = False,
    ) -> tuple[Any, str]:
        """A stage whose result is a directory written as it goes (a training run's
        snapshot store). `build(work)` writes into `<stage>/<key>.partial/`, which
        survives a kill, so a rerun resumes from what `build` left there; the finished
        directory is renamed into place and returned opened by `open_`. `again`: build
        it afresh, as `force` does (the caller found the entry damaged)."""
        key = stage_key(stage, spec)
        final = self.path(stage, key)
        forced = again or stage in self.force or "all" in self.force
        with self.lock(stage, key):
            done = (final / "meta.json").exists() and not forced
            self.hits[stage] = done
            if not done:
                self._refuse_if_read_only(stage, key)
                work = final.with_name(f".{key}.partial")
                if forced:
                    shutil.rmtree(work, ignore_errors=True)
                work.mkdir(parents=True, exist_ok=True)
                build(work)
                meta = {
                    "stage": stage,
                    "key": key,
                    "spec": spec,
                    "environment": self.environment,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                }
                write_atomic(
                    work / "meta.json", lambda p: p.write_text(json.dumps(meta, indent=2, default=str))
                )
                if final.exists():
                    stale = final.with_name(f".stale-{key}-{os.getpid()}")
                    os.replace(final, stale)
                    shutil.rmtree(stale, ignore_errors=True)
                os.replace(work, final)
        return open_(final), key


def _fields(result: Any) -> dict[str, Any]:
    """A dataclass's fields (shallow) or a dict as it is."""
    if is_dataclass(result):
        return {f.name: getattr(result, f.name) for f in fields(result)}
    return result


def _write_payload(where: Path, result: dict[str, Any]) -> dict[str, str]:
    """Write a stage result (a dict) without pickle; returns each key's kind."""
    kinds, arrays, values = {}, {}, {}
    for name, value in result.items():
        if isinstance(value, torch.Tensor):
            kinds[name], arrays[name] = "tensor", value.detach().cpu().numpy()
        elif isinstance(value, np.ndarray):
            # object arrays (strings) would need pickle; unicode arrays do not
            kinds[name], arrays[name] = "array", value.astype(str) if value.dtype == object else value
        elif isinstance(value, pd.DataFrame):
            kinds[name] = "frame"
            value.to_parquet(where / f"{name}.parquet")
        else:
            kinds[name], values[name] = "value", value
    with open(where / "arrays.npz", "wb") as f:  # a file object: np.savez would add ".npz"
        np.savez(f, **arrays)
    (where / "values.json").write_text(json.dumps(values, default=_plain))
    return kinds


def _read_payload(where: Path, kinds: dict[str, str]) -> dict[str, Any]:
    values = json.loads((where / "values.json").read_text())
    with np.load(where / "arrays.npz", allow_pickle=False) as arrays:
        readers = {
            "tensor": lambda k: torch.from_numpy(arrays[k].copy()),
            "array": lambda k: arrays[k],
            "frame": lambda k: pd.read_parquet(where / f"{k}.parquet"),
            "value": lambda k: values[k],
        }
        return {name: readers[kind](name) for name, kind in kinds.items()}


def _plain(x):
    """numpy scalars in values.json as Python numbers."""
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(f"a cache value of type {type(x).__name__} cannot be stored without pickle")
