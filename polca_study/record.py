"""The public face of the recorders: `from polca_study.record import SnapshotRecorder`.

They live in `polca_study.snapshots.record`; this path stays stable for users' loops.
"""

from polca_study.snapshots.record import HFTrainerRecorder, LightningRecorder, SnapshotRecorder

__all__ = ["HFTrainerRecorder", "LightningRecorder", "SnapshotRecorder"]
