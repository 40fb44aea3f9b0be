"""Snapshots: parameters at training steps, on disk, and what makes them.

The store (`store`: safetensors files and a manifest with each file's SHA-256), the
recorders a user's loop calls (`record`), our transformer (`model`), our trainer
(`train`), and the `SnapshotRun` every source hands to the study (`run`). Nothing here
knows of a study's stages, its config or W&B.
"""

from polca_study.snapshots.store import SnapshotStore, SnapshotWriter

__all__ = ["SnapshotStore", "SnapshotWriter"]
