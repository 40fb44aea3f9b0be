"""Content-addressed cache for the expensive stages (train, basis, decompose).

A stage's result lives in `<root>/<stage>/<key>/`, the key a hash of exactly the
config that determines it (plus the keys of the stages it reads). Writes go to a
temporary directory renamed into place, so a killed run leaves nothing half-written;
a SHA-256 of the payload is checked on every load, and a corrupt entry is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# Bump when a stage's computation changes, so old entries are not reused.
CODE_VERSION = {"train": 1, "basis": 1, "decompose": 1, "trajectories": 1}
# Stages that `force=[<name>]` recomputes besides the one of that name: LCA's
# per-parameter decomposition ("trajectories") is a decomposition too.
FORCE_ALSO = {"decompose": {"trajectories"}}


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write a file through a temporary file renamed into place: readers never see half
    of it, and a killed writer leaves the old file (or none)."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


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
    def __init__(self, root: str | os.PathLike, force: set[str] | None = None):
        self.root = Path(root)
        self.force = set(force or ())
        for name in list(self.force):
            self.force |= FORCE_ALSO.get(name, set())
        self.hits: dict[str, bool] = {}

    def path(self, stage: str, key: str) -> Path:
        return self.root / stage / key

    def load(self, stage: str, key: str) -> dict[str, Any] | None:
        where = self.path(stage, key)
        meta_file = where / "meta.json"
        if not meta_file.exists():
            return None
        meta = json.loads(meta_file.read_text())
        payload = where / "payload.pt"
        if not payload.exists() or _sha256(payload) != meta["sha256"]:
            log.warning("cache entry %s/%s failed its integrity check; recomputing", stage, key)
            return None
        try:
            with open(payload, "rb") as f:
                return pickle.load(f)
        except Exception as err:  # an entry from an older format, or an unpicklable class
            log.warning("cache entry %s/%s could not be read (%s); recomputing", stage, key, err)
            return None

    def save(self, stage: str, key: str, spec: dict, result: dict[str, Any], replace: bool = False) -> None:
        final = self.path(stage, key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=final.parent))
        try:
            with open(tmp / "payload.pt", "wb") as f:
                pickle.dump(result, f, protocol=5)  # 10x faster to load than torch.load
            meta = {
                "stage": stage,
                "key": key,
                "spec": spec,
                "sha256": _sha256(tmp / "payload.pt"),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
            (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
            if final.exists() and (replace or self.load(stage, key) is None):
                stale = final.with_name(f".stale-{key}-{os.getpid()}")
                os.replace(final, stale)  # forced or corrupt: move the old entry aside
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, final)
            except OSError:  # another job finished the same stage first: keep theirs
                shutil.rmtree(tmp, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def get_or_compute(
        self, stage: str, spec: dict, compute: Callable[[], dict[str, Any]]
    ) -> tuple[dict[str, Any], str]:
        """The cached result of `stage` for `spec`, computing and storing it on a miss."""
        key = stage_key(stage, spec)
        forced = stage in self.force or "all" in self.force
        result = None if forced else self.load(stage, key)
        self.hits[stage] = result is not None
        if result is None:
            result = compute()
            self.save(stage, key, spec, result, replace=forced)
        return result, key
