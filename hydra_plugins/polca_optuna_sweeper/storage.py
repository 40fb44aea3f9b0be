"""Storage: the Optuna RDB storage a study lives in, the study-wide lock that workers
sharing it ask under, the heartbeats of running trials, the trials whose worker is gone
(found by a stale heartbeat or a missing ask mark, and recovered), and studies.json, which
names the storage of a command's studies."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from polca_study.atomic import write_atomic

log = logging.getLogger(__name__)
# trial system attributes
ASKED = "asked"  # set with the trial's first heartbeat, under the study lock
BATCH = "batch"  # [batch index, batch size] of the batch the trial was asked in


def sqlite_path(storage: str) -> Path | None:
    return Path(storage.removeprefix("sqlite:///")) if storage.startswith("sqlite:///") else None


@contextlib.contextmanager
def study_lock(storage: str, study_name: str) -> Iterator[None]:
    """Serialise creating, recovering and asking across the workers of one study. A
    killed holder releases it (the file is closed, the database session ends)."""
    path = sqlite_path(storage)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    if storage.startswith("postgresql"):
        import sqlalchemy

        key = int.from_bytes(hashlib.sha256(study_name.encode()).digest()[:8], "big", signed=True)
        engine = sqlalchemy.create_engine(storage, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
        return
    raise ValueError(
        f"hydra.sweeper.storage={storage!r}: use sqlite:///<file> or postgresql+<driver>://... "
        "(the study lock needs one of them)"
    )


def rdb_storage(
    storage: str, heartbeat_interval: int, grace_period: int, asynchronous: bool, retries: int
) -> optuna.storages.RDBStorage:
    """The study's storage with Optuna's heartbeat: a running trial whose heartbeat is older
    than `grace_period` seconds lost its worker."""
    with warnings.catch_warnings():  # the heartbeat is "experimental" in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        callback = None
        if asynchronous:  # a lost trial is failed and queued again under a new number
            callback = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=retries)
        return optuna.storages.RDBStorage(
            storage,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=callback,
        )


def mark_asked(study: optuna.Study, trial: optuna.trial.Trial, batch: list[int] | None) -> None:
    """Record an asked trial's first heartbeat and its ask mark (and its batch, if any)."""
    storage = study._storage
    storage.record_heartbeat(trial._trial_id)
    storage.set_trial_system_attr(trial._trial_id, ASKED, True)
    if batch is not None:
        storage.set_trial_system_attr(trial._trial_id, BATCH, batch)


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trials: list, interval: int) -> Iterator[None]:
    """Record the batch's heartbeats while its jobs run."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            for t in trials:
                study._storage.record_heartbeat(t._trial_id)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def recover(study: optuna.Study, asynchronous: bool) -> None:
    """Trials whose worker is gone: a stale heartbeat, or none at all (killed while
    being asked; we hold the lock it was asked under). Synchronous studies run them
    again in place; asynchronous ones fail them and Optuna's callback queues a copy."""
    storage = study._storage
    stale = set(storage._get_stale_trial_ids(study._study_id))
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if ASKED in t.system_attrs and t._trial_id not in stale:
            continue
        if asynchronous and ASKED in t.system_attrs:
            continue  # fail_stale_trials below
        storage.set_trial_state_values(t._trial_id, state=TrialState.WAITING)
        log.info("trial %d lost its worker; it runs again with its parameters", t.number)
    if asynchronous:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)


def record_studies(sweep_dir: Path, storage: str, names: list[str]) -> None:
    """studies.json in the sweep directory: which storage holds this command's studies."""
    sweep_dir.mkdir(parents=True, exist_ok=True)
    record = json.dumps({"storage": storage, "studies": names}, indent=2)
    write_atomic(sweep_dir / "studies.json", lambda p: p.write_text(record))
