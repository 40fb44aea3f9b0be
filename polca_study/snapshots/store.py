"""The snapshot store: parameter snapshots of a training run on disk, one file per step.

A store is a directory:

    manifest.json              format, version, the parameters (name, shape, dtype) in
                               flattening order, the model that owns them, and one
                               entry per snapshot: step, file, SHA-256
    step-00000100.safetensors  one snapshot: every parameter under its own name

Each snapshot file is a plain safetensors file (its metadata repeats the step and the
format), so any safetensors reader can open it without this module. Snapshots are
written atomically (a temporary file renamed into place, then the manifest the same
way): a killed writer leaves the store as it was after its last whole snapshot.

Readers open the manifest only; a snapshot is read when asked for, its SHA-256 checked,
and only one is held at a time unless the caller keeps it. `SnapshotStore` is the seam
between where snapshots come from (our trainer, a recorded run) and the stages that read
them: `steps`, `flat(step)`, `state(step)`, `gather(step, indices)`, `model`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from polca_study.atomic import write_bytes_atomic
from polca_study.errors import ConfigError

FORMAT = "polca-snapshots"
VERSION = 1
MANIFEST = "manifest.json"


class StoreError(ConfigError):
    """A store that cannot be read or analysed as it is; the message names the file
    and, where there is one, the step."""


class CorruptSnapshot(StoreError):
    """A snapshot file missing or unlike its manifest's SHA-256: a store computed here
    is computed again; one recorded elsewhere is refused."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


@dataclass(frozen=True)
class Parameter:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without "torch.", e.g. "float32"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def parameters_of(module: nn.Module, dtype: torch.dtype | None = None) -> list[Parameter]:
    """The trainable parameters of `module` in `flatten_parameters` order."""
    return [
        Parameter(n, tuple(p.shape), _dtype_name(dtype or p.dtype))
        for n, p in module.named_parameters()
        if p.requires_grad
    ]


def snapshot_bytes(parameters: Sequence[Parameter]) -> int:
    """Bytes of one snapshot's tensors (the file adds a small header)."""
    return sum(p.numel * torch.empty(0, dtype=_dtype(p.dtype)).element_size() for p in parameters)


def canonical_safetensors(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted. safetensors writes
    the metadata in an order that varies between processes, so identical tensors gave
    files with different SHA-256, and the fingerprints built on them missed the cache."""
    n = int.from_bytes(blob[:8], "little")
    header = json.dumps(json.loads(blob[8 : 8 + n]), sort_keys=True, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    return len(header).to_bytes(8, "little") + header + blob[8 + n :]


class SnapshotWriter:
    """Writes snapshots into a store, creating it or continuing an existing one.

    `model` describes what the parameters belong to (for example the model's class and
    config), so the store can be read without the code that wrote it.
    """

    def __init__(
        self, directory: str | os.PathLike, parameters: Sequence[Parameter], model: dict | None = None
    ):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.parameters = list(parameters)
        manifest_file = self.directory / MANIFEST
        if manifest_file.exists():
            manifest = read_manifest(self.directory)
            if [_as_parameter(p) for p in manifest["parameters"]] != self.parameters:
                raise StoreError(
                    f"the store in {self.directory} holds other parameters than the ones being written"
                )
            self.snapshots = manifest["snapshots"]
            self.model = manifest.get("model") if model is None else model
        else:
            self.snapshots, self.model = [], model
            self._write_manifest()

    @classmethod
    def for_module(
        cls, directory: str | os.PathLike, module: nn.Module, model: dict | None = None, dtype=torch.float32
    ) -> SnapshotWriter:
        return cls(directory, parameters_of(module, dtype), model)

    @property
    def steps(self) -> list[int]:
        return [s["step"] for s in self.snapshots]

    def write(self, step: int, parameters: Mapping[str, Tensor] | Tensor | nn.Module) -> None:
        """Store the parameters at `step` (a module, a name → tensor mapping or a flat
        vector in flattening order), replacing an earlier snapshot of the same step."""
        tensors = self._tensors(parameters)
        name = f"step-{int(step):08d}.safetensors"
        blob = canonical_safetensors(
            save_safetensors(tensors, metadata={"format": FORMAT, "step": str(int(step))})
        )
        write_bytes_atomic(self.directory / name, blob)
        entry = {"step": int(step), "file": name, "sha256": hashlib.sha256(blob).hexdigest()}
        self.snapshots = [s for s in self.snapshots if s["step"] != int(step)] + [entry]
        self.snapshots.sort(key=lambda s: s["step"])
        self._write_manifest()

    def keep_until(self, step: int) -> None:
        """Forget snapshots after `step` (a resumed run rewrites them)."""
        later = [s for s in self.snapshots if s["step"] > step]
        if later:
            self.snapshots = [s for s in self.snapshots if s["step"] <= step]
            self._write_manifest()
            for s in later:
                (self.directory / s["file"]).unlink(missing_ok=True)

    def _tensors(self, parameters) -> dict[str, Tensor]:
        if isinstance(parameters, nn.Module):
            parameters = dict(parameters.named_parameters())
        if isinstance(parameters, Tensor):
            sizes = [p.numel for p in self.parameters]
            if parameters.ndim != 1 or parameters.numel() != sum(sizes):
                raise ValueError(
                    f"a flat snapshot must have {sum(sizes)} entries, got {tuple(parameters.shape)}"
                )
            parameters = dict(zip([p.name for p in self.parameters], parameters.split(sizes), strict=True))
        out = {}
        for p in self.parameters:
            if p.name not in parameters:
                raise ValueError(f"the snapshot lacks parameter {p.name!r}")
            t = parameters[p.name].detach()
            out[p.name] = t.reshape(p.shape).to("cpu", _dtype(p.dtype)).contiguous()
        return out

    def _write_manifest(self) -> None:
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "parameters": [
                {"name": p.name, "shape": list(p.shape), "dtype": p.dtype} for p in self.parameters
            ],
            "model": self.model,
            "snapshots": self.snapshots,
        }
        write_bytes_atomic(self.directory / MANIFEST, json.dumps(manifest, indent=1).encode())


class SnapshotStore:
    """Lazy reader of a store: opening it reads the manifest, nothing else."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        manifest = read_manifest(self.directory)
        self.parameters = [_as_parameter(p) for p in manifest["parameters"]]
        self.model: dict | None = manifest.get("model")
        self._entries = {s["step"]: s for s in manifest["snapshots"]}
        self.steps = np.array(sorted(self._entries), dtype=np.int64)
        self.reads = 0  # snapshot files read so far (tests check stages that must not read any)
        # called once, before the first snapshot is read (a source's checks of the files)
        self.before_first_read: Callable[[], object] | None = None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parameters]

    @property
    def numel(self) -> int:
        return sum(p.numel for p in self.parameters)

    def __len__(self) -> int:
        return len(self.steps)

    def __contains__(self, step: int) -> bool:
        return int(step) in self._entries

    def state(self, step: int) -> dict[str, Tensor]:
        """Every parameter at `step`, by name."""
        step = int(step)
        if self.before_first_read is not None:
            check, self.before_first_read = self.before_first_read, None
            check()
        entry = self.entry(step)
        path = self.directory / entry["file"]
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            raise StoreError(
                f"{path} is missing: the snapshot at step {int(step)} that {MANIFEST} lists"
            ) from None
        self.reads += 1
        if hashlib.sha256(blob).hexdigest() != entry["sha256"]:
            raise CorruptSnapshot(f"{path} (step {step}) does not match its SHA-256 in {MANIFEST}", step)
        return load_safetensors(blob)

    def flat(self, step: int, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """The parameters at `step` as one vector in flattening order (d,)."""
        state = self.state(step)
        flat = torch.cat([state[p.name].reshape(-1) for p in self.parameters])
        return flat.to(device=device, dtype=dtype or flat.dtype)

    def sequence(self, steps: Sequence[int], dtype=None, device=None) -> LazySnapshots:
        missing = [int(s) for s in steps if int(s) not in self._entries]
        if missing:
            raise StoreError(
                f"the store in {self.directory} has no snapshot at steps {missing[:5]}; "
                f"it holds steps {self.steps[:3].tolist()}...{self.steps[-3:].tolist()}"
            )
        return LazySnapshots(self, [int(s) for s in steps], dtype, device)

    @property
    def manifest_path(self) -> Path:
        return self.directory / MANIFEST

    def entry(self, step: int) -> dict:
        """The manifest's entry of `step`: its file and SHA-256."""
        if int(step) not in self._entries:
            raise KeyError(f"no snapshot at step {step} in {self.directory}")
        return self._entries[int(step)]


class LazySnapshots(Sequence):
    """Flat snapshots at given steps, each read from disk when indexed: iterating holds
    one at a time (the stages keep at most the current and the next)."""

    def __init__(self, store: SnapshotStore, steps: list[int], dtype=None, device=None):
        self.store, self.steps, self.dtype, self.device = store, steps, dtype, device

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return LazySnapshots(self.store, self.steps[i], self.dtype, self.device)
        return self.store.flat(self.steps[i], self.dtype, self.device)

    def __iter__(self) -> Iterator[Tensor]:
        for step in self.steps:
            yield self.store.flat(step, self.dtype, self.device)


def read_manifest(directory: Path) -> dict:
    """The store's manifest, refused in one line naming the file when it is not one this
    reader takes: not JSON, another format, an entry without its step, file or SHA-256,
    a step listed twice or out of order."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise StoreError(f"{directory} is not a snapshot store: it has no {MANIFEST}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise StoreError(f"{path} is not valid JSON: {err}") from None
    if (
        not isinstance(manifest, dict)
        or manifest.get("format") != FORMAT
        or manifest.get("version") != VERSION
    ):
        found = (
            (manifest.get("format"), manifest.get("version")) if isinstance(manifest, dict) else (None, None)
        )
        raise StoreError(
            f"{path}: format {found[0]!r} version {found[1]!r}; "
            f"this reader takes {FORMAT!r} version {VERSION}"
        )
    for key in ("parameters", "snapshots"):
        if not isinstance(manifest.get(key), list):
            raise StoreError(f"{path} has no list of {key}")
    _check_entries(path, manifest["snapshots"])
    return manifest


def _check_entries(path: Path, snapshots: list) -> None:
    previous = None
    for i, s in enumerate(snapshots):
        if not isinstance(s, dict) or not {"step", "file", "sha256"} <= set(s):
            raise StoreError(f"{path}: snapshot entry {i} needs a step, a file and a sha256, got {s!r}")
        step = s["step"]
        if previous is not None and step == previous:
            raise StoreError(f"{path} lists step {step} twice: a store holds one snapshot per step")
        if previous is not None and step < previous:
            raise StoreError(f"{path} lists step {step} after step {previous}: its steps must increase")
        previous = step


def _as_parameter(p: dict) -> Parameter:
    return Parameter(p["name"], tuple(p["shape"]), p["dtype"])


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a snapshot store")
    return dtype
