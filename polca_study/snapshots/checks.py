"""Checks of a snapshot store before any analysis reads it, whatever wrote it.

A study of a damaged store still runs and gives a different result: a manifest that
lists a step twice loses a snapshot from the trajectories, a missing snapshot merges two
intervals into one, two steps holding the same parameters (a recorder writing one
snapshot twice; public suites have served the final weights under early step names)
show a breakthrough that never happened. So every store is checked once, before the
first stage that reads it, and refused with the file and the step named:

- the manifest is valid JSON of this format, its steps unique and increasing (checked
  by the reader, `store.read_manifest`, as it opens the store);
- every snapshot file is there and matches its SHA-256 in the manifest;
- no two steps hold identical parameters, unless the caller accepts them;
- every step an interval needs is there (a store on a regular grid of steps).

Each file is read and hashed once here; the stages check each read again.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from polca_study.snapshots.store import CorruptSnapshot, SnapshotStore, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckedStore:
    """What the checks read: each step's SHA-256 of its parameters alone (a snapshot
    file also holds its step, so files of equal parameters differ)."""

    steps: tuple[int, ...]
    parameters_sha256: Mapping[int, str]


def check_store(store: SnapshotStore, allow_duplicates: bool = False) -> CheckedStore:
    """Every file present and as the manifest says; no two steps with equal parameters
    unless `allow_duplicates`. Raises CorruptSnapshot or StoreError."""
    digests = {}
    for step in store.steps.tolist():
        entry = store.entry(step)
        path = store.directory / entry["file"]
        if not path.is_file():
            raise CorruptSnapshot(
                f"{path} is missing: the snapshot at step {step} that {store.manifest_path} lists", step
            )
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise CorruptSnapshot(
                f"{path} (step {step}) does not match its SHA-256 in {store.manifest_path}: "
                "the file was changed or damaged after it was written",
                step,
            )
        digests[step] = hashlib.sha256(_data(blob)).hexdigest()
    _duplicates(store, digests, allow_duplicates)
    return CheckedStore(tuple(digests), digests)


def _data(blob: bytes) -> bytes:
    """A safetensors file's tensor data, without its header (which names the step)."""
    n = int.from_bytes(blob[:8], "little")
    return blob[8 + n :]


def _duplicates(store: SnapshotStore, digests: Mapping[int, str], allowed: bool) -> None:
    """Refuse two steps of identical parameters; allowed, say so (the result is not the
    undamaged store's)."""
    first: dict[str, int] = {}
    for step, digest in digests.items():
        if digest in first:
            what = f"{store.directory}: steps {first[digest]} and {step} hold identical parameters"
            if allowed:
                log.warning("%s; analysed as it is (snapshots.allow_duplicates=true)", what)
                continue
            raise StoreError(
                f"{what} (a snapshot written twice, or a revision serving another's weights); "
                "set snapshots.allow_duplicates=true to analyse the store as it is"
            )
        first[digest] = step


def check_intervals(steps: Sequence[int], intervals: Mapping[str, int], where: str) -> None:
    """On a regular grid of steps, every multiple of each interval between the first
    such multiple and the last step is a snapshot: a missing one would silently merge
    two intervals into one. `intervals`: setting -> interval (basis.interval: 100)."""
    held = np.asarray(sorted(steps), dtype=np.int64)
    for setting, interval in intervals.items():
        on = held[held % interval == 0]
        if len(on) == 0:
            raise StoreError(
                f"{setting}={interval}: {where} holds no snapshot at a multiple of it "
                f"(steps {_steps(held)}); set {setting} to a multiple of the store's spacing"
            )
        needed = np.arange(on[0], held[-1] + 1, interval)
        missing = np.setdiff1d(needed, held)
        if len(missing):
            raise StoreError(
                f"{setting}={interval} needs a snapshot at step {int(missing[0])}, which {where} "
                f"lacks (it holds steps {_steps(held)}); set {setting} to a multiple of the "
                "store's spacing, or record that step"
            )


def _steps(held: np.ndarray) -> str:
    shown = held.tolist()
    return ", ".join(map(str, shown)) if len(shown) <= 6 else f"{shown[0]}, {shown[1]}, ..., {shown[-1]}"
