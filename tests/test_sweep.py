"""Optuna studies as Hydra multiruns: resumable on SQLite, shared by workers on PostgreSQL."""

import os
import signal
import subprocess
import time

import optuna
import pytest
from optuna.trial import TrialState

from tests.conftest import POLCA, ROOT

pytestmark = pytest.mark.slow


def sweep_args(tmp_path, storage, name, extra=()):
    return [
        "-m",
        "experiment=tiny",
        "+sweep=tiny_clustering",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={name}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "num_threads=1",
        *extra,
    ]


def complete(storage, name):
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return []
    return study.get_trials(states=(TrialState.COMPLETE,))


def test_killed_sqlite_study_resumes_and_completes(tmp_path, env):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    args = sweep_args(tmp_path, storage, "resume", ["logger=offline"])
    proc = subprocess.Popen(
        POLCA + args,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while len(complete(storage, "resume")) < 2 and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: (t.params, t.value) for t in complete(storage, "resume")}
    assert 2 <= len(before) < 6, "the study was not killed mid-way"

    rerun = subprocess.run(POLCA + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    after = complete(storage, "resume")
    assert len(after) == 6
    assert len({t.number for t in after}) == 6
    assert len({tuple(sorted(t.params.items())) for t in after}) == 6  # no replayed samples
    running = optuna.load_study(study_name="resume", storage=storage).get_trials(
        states=(TrialState.RUNNING, TrialState.WAITING)
    )
    assert running == []
    for t in after:  # finished trials kept once, unchanged
        if t.number in before:
            assert (t.params, t.value) == before[t.number]
    assert (tmp_path / "sweep" / "optimization_results.yaml").exists()
    assert (tmp_path / "sweep" / "optimization_history.png").exists()


def test_failed_trials_are_recorded_with_their_reason(tmp_path, env):
    storage = f"sqlite:///{tmp_path / 'studies.db'}"
    # a space of invalid values: every trial's job raises
    args = sweep_args(
        tmp_path, storage, "failing", ["logger=disabled", "cluster.min_cluster_size=int(interval(-9, 1))"]
    )
    proc = subprocess.run(POLCA + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "max_failures=3" in proc.stderr
    study = optuna.load_study(study_name="failing", storage=storage)
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(failed) == 3
    assert all("cluster.min_cluster_size must be >= 2" in t.user_attrs["fail_reason"] for t in failed)


@pytest.mark.skipif(
    not os.environ.get("POLCA_TEST_POSTGRES_URL"),
    reason="needs PostgreSQL: .ci/run starts one and sets POLCA_TEST_POSTGRES_URL",
)
def test_two_workers_share_a_postgres_study(tmp_path, env):
    storage = os.environ["POLCA_TEST_POSTGRES_URL"]
    name = f"workers-{os.getpid()}-{int(time.time())}"
    # warm the cache once so both workers spend their time on trials
    procs = []
    for worker in range(2):
        args = sweep_args(
            tmp_path, storage, name, ["logger=disabled", f"hydra.sweep.dir={tmp_path / f'sweep{worker}'}"]
        )
        procs.append(
            subprocess.Popen(
                POLCA + args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    for p in procs:
        _, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
    study = optuna.load_study(study_name=name, storage=storage)
    trials = study.get_trials()
    assert len(trials) == 6
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(6))
    workers = {t.system_attrs["worker"] for t in trials}
    assert len(workers) == 2  # both workers ran trials
    optuna.delete_study(study_name=name, storage=storage)
