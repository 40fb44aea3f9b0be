"""Optuna studies as Hydra multiruns: a study is a function of its command.

The sweeper's behaviour is tested on a toy app (tests/sweep_app, a known objective,
tenths of a second per trial); the polca-study tuning itself on the tiny preset."""

import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.polca_optuna_sweeper.samplers import PerTrialSampler, sampler_factory
from hydra_plugins.polca_optuna_sweeper.storage import ASKED, study_lock
from hydra_plugins.polca_optuna_sweeper.sweeper import OptunaSweeper
from tests.conftest import POLCA, ROOT

pytestmark = pytest.mark.slow
APP = [sys.executable, str(ROOT / "tests" / "sweep_app" / "app.py"), "-m"]


def history(storage: str, name: str) -> list[tuple]:
    """(number, params, value) of the complete trials, in trial order."""
    study = optuna.load_study(study_name=name, storage=storage)
    return [(t.number, t.params, t.value) for t in study.get_trials(states=(TrialState.COMPLETE,))]


def sqlite(directory) -> str:
    return f"sqlite:///{directory / 'optuna.db'}"


def app(directory, *overrides, env=None, check=True):
    e = {**(env or os.environ), "SWEEP_APP_DIR": str(directory)}
    proc = subprocess.run(APP + list(overrides), cwd=ROOT, env=e, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def kill_after(command, env, storage, name, complete: int, cwd=ROOT) -> None:
    """Start `command`, SIGKILL its whole process group once `complete` trials are done."""
    proc = subprocess.Popen(
        command,
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        try:
            if len(history(storage, name)) >= complete:
                break
        except (KeyError, sqlalchemy.exc.OperationalError):  # no study (or database) yet
            pass
        time.sleep(0.1)
    assert proc.poll() is None, "the study finished before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The toy study run once, uninterrupted (TPE, 14 trials: past its 10 random ones)."""
    directory = tmp_path_factory.mktemp("reference")
    app(directory)
    return history(sqlite(directory), "toy")


def test_same_command_twice_gives_the_same_study(tmp_path, reference):
    app(tmp_path)
    assert len(reference) == 14
    assert history(sqlite(tmp_path), "toy") == reference
    assert reference[0][1] == {"x": 0.5, "y": 5, "c": "a"}  # the configured values first
    assert len({tuple(p.items()) for _, p, _ in reference}) > 10


def test_killed_then_rerun_gives_the_uninterrupted_study(tmp_path, reference):
    env = {**os.environ, "SWEEP_APP_DIR": str(tmp_path), "SWEEP_APP_SLEEP": "0.3"}
    kill_after(APP, env, sqlite(tmp_path), "toy", complete=5)
    before = history(sqlite(tmp_path), "toy")
    assert 5 <= len(before) < 14
    running = optuna.load_study(study_name="toy", storage=sqlite(tmp_path)).get_trials(
        states=(TrialState.RUNNING,)
    )
    assert len(running) == 1  # the trial the kill interrupted
    app(tmp_path)  # the same command again
    after = optuna.load_study(study_name="toy", storage=sqlite(tmp_path)).trials
    assert [t.state for t in after] == [TrialState.COMPLETE] * 14  # rerun in place, no extra trial
    assert history(sqlite(tmp_path), "toy") == reference


def test_batches_do_not_depend_on_parallel_jobs_or_kills(tmp_path):
    runs = {}
    for jobs in (1, 2):
        directory = tmp_path / f"jobs{jobs}"
        app(directory, "hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}", "hydra.sweeper.batch_size=3")
        runs[jobs] = history(sqlite(directory), "toy")
    assert runs[1] == runs[2]
    assert len(runs[1]) == 14
    killed = tmp_path / "killed"
    env = {**os.environ, "SWEEP_APP_DIR": str(killed), "SWEEP_APP_SLEEP": "0.3"}
    kill_after(APP + ["hydra.sweeper.batch_size=3"], env, sqlite(killed), "toy", complete=4)
    app(killed, "hydra.sweeper.batch_size=3")
    assert history(sqlite(killed), "toy") == runs[1]


@pytest.mark.filterwarnings("ignore:Heartbeat of storage:UserWarning")  # asked as the sweeper asks
@pytest.mark.parametrize(("sampler", "told"), [("tpe", 4), ("tpe", 12), ("random", 12), ("cmaes", 12)])
@pytest.mark.parametrize("held", [1, 2])
def test_a_trial_killed_while_being_asked_gets_the_uninterrupted_parameters(tmp_path, sampler, told, held):
    """A driver killed between storing a trial's first parameters and its last leaves
    the trial with `held` of them; the sweeper recovers it and asks it again, beside a
    trial still running (TPE's constant liar sees it), within TPE's 10 random trials and
    past them (where its 24 candidates often hide a shifted random state: not always),
    and with CMA-ES (x and y sampled together, relatively, and c independently: the held
    relative parameters must not be drawn again)."""
    space = {
        "x": FloatDistribution(0.0, 1.0),
        "y": IntDistribution(0, 20),
        "c": CategoricalDistribution(["a", "b", "c"]),
    }

    def objective(p):
        return (p["x"] - 0.3) ** 2 + 0.01 * (p["y"] - 7) ** 2 + {"a": 0.0, "b": -0.3, "c": 0.2}[p["c"]]

    def run(name: str, cut: bool) -> dict:
        sweeper = OptunaSweeper(
            study_name=name,
            storage=sqlite(tmp_path),
            direction="minimize",
            n_trials=14,
            max_failures=1,
            sampler=OmegaConf.create({"name": sampler, "seed": 3}),
            params={},
            heartbeat_interval=1,
            grace_period=60,
        )
        study = optuna.create_study(study_name=name, storage=sweeper._storage(), direction="minimize")
        study.sampler = PerTrialSampler(sampler_factory(sampler, space, 3), 3, order=space)
        for _ in range(told):
            trial = study.ask(space)
            study.tell(trial, objective(trial.params))
        running = study.ask(space)  # keeps running, its worker alive
        study._storage.record_heartbeat(running._trial_id)
        study._storage.set_trial_system_attr(running._trial_id, ASKED, True)
        if cut:  # the next trial stores `held` parameters, then its driver dies
            trial = study.ask()
            for name_ in list(space)[:held]:
                trial._suggest(name_, space[name_])
            with study_lock(sweeper.storage, name):
                sweeper._recover(study)
            assert study.get_trials(deepcopy=False)[told + 1].state == TrialState.WAITING
        return study.ask(space).params

    assert run("cut", cut=True) == run("whole", cut=False)


def test_a_grid_study_visits_every_point_once(tmp_path):
    # the configured values (x=0.5, y=5, c=a) are a grid point: no baseline trial repeats it
    grid = ["x=choice(0.1, 0.5)", "y=range(4, 7)", "c=choice(a, b)"]
    app(
        tmp_path,
        "hydra.sweeper.sampler.name=grid",
        *grid,
        "hydra.sweeper.n_trials=12",
        "hydra.sweeper.batch_size=2",
    )
    points = [(p["x"], p["y"], p["c"]) for _, p, _ in history(sqlite(tmp_path), "toy")]
    assert sorted(points) == sorted((x, y, c) for x in (0.1, 0.5) for y in range(4, 7) for c in "ab")


def test_a_trial_that_fails_once_runs_again_with_its_parameters(tmp_path, reference):
    marker = tmp_path / "failed-once"
    env = {**os.environ, "SWEEP_APP_FAIL_ONCE": f"4:{marker}"}
    app(tmp_path, env=env)
    assert marker.exists()
    x, y, c = marker.read_text().split()
    trials = optuna.load_study(study_name="toy", storage=sqlite(tmp_path)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 14
    assert trials[4].params == {"x": float(x), "y": int(y), "c": c}
    assert history(sqlite(tmp_path), "toy") == reference


def test_failures_do_not_count_toward_n_trials(tmp_path):
    # a job of c=d raises (KeyError) on every attempt: recorded as failed, not counted
    app(
        tmp_path,
        "hydra.sweeper.n_trials=8",
        "hydra.sweeper.max_failures=20",
        "hydra.sweeper.retries=1",
        "c=choice(a, b, c, d)",
        "hydra.sweeper.sampler.name=random",
    )
    study = optuna.load_study(study_name="toy", storage=sqlite(tmp_path))
    failed = study.get_trials(states=(TrialState.FAIL,))
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 8
    assert len(failed) >= 1  # this seed draws c=d
    assert all(t.params["c"] == "d" for t in failed)
    assert all("after 2 attempts: KeyError" in t.user_attrs["fail_reason"] for t in failed)


def test_another_command_on_the_same_storage_is_refused(tmp_path, reference):
    app(tmp_path)
    proc = app(tmp_path, "offset=1.0", check=False)
    assert proc.returncode == 2
    error = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1
    assert "offset: 0.0 there, 1.0 here" in error[0] and "hydra.sweeper.study_name" in error[0]
    assert history(sqlite(tmp_path), "toy") == reference  # nothing ran

    proc = app(tmp_path, "hydra.sweeper.n_trials=16", check=False)
    assert proc.returncode == 2 and "hydra.sweeper.extend=true" in proc.stderr
    app(tmp_path, "hydra.sweeper.n_trials=16", "hydra.sweeper.extend=true")
    extended = history(sqlite(tmp_path), "toy")
    assert extended[:14] == reference
    app(tmp_path / "fresh", "hydra.sweeper.n_trials=16")  # trial k does not depend on n_trials
    assert history(sqlite(tmp_path / "fresh"), "toy") == extended


def test_submitit_launcher_runs_the_same_study(tmp_path):
    """submitit_local: the code path of submitit_slurm, one process per job."""
    args = ["hydra.sweeper.n_trials=4", "hydra.sweeper.batch_size=2"]
    app(tmp_path / "basic", *args)
    app(tmp_path / "submitit", *args, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5")
    basic = history(sqlite(tmp_path / "basic"), "toy")
    assert len(basic) == 4
    assert history(sqlite(tmp_path / "submitit"), "toy") == basic


@pytest.mark.skipif(
    not os.environ.get("POLCA_TEST_POSTGRES_URL"),
    reason="needs PostgreSQL: .ci/run starts one and sets POLCA_TEST_POSTGRES_URL",
)
def test_two_asynchronous_workers_on_postgres_never_duplicate(tmp_path):
    storage = os.environ["POLCA_TEST_POSTGRES_URL"]
    name = f"workers-{os.getpid()}-{int(time.time())}"
    args = [
        f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.study_name={name}",
        "hydra.sweeper.asynchronous=true",
        "hydra.sweeper.n_trials=8",
    ]
    procs = []
    for worker in range(2):
        env = {**os.environ, "SWEEP_APP_DIR": str(tmp_path / f"w{worker}"), "SWEEP_APP_SLEEP": "0.5"}
        procs.append(subprocess.Popen(APP + args, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True))
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    try:
        trials = optuna.load_study(study_name=name, storage=storage).trials
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        assert len(complete) == 8 and len(trials) == 8
        assert len({tuple(sorted(t.params.items())) for t in trials}) == 8
        assert sum(t.params == {"x": 0.5, "y": 5, "c": "a"} for t in trials) == 1  # one baseline
        for worker in range(2):  # both workers ran trials
            assert any((tmp_path / f"w{worker}").glob("*/.hydra"))
    finally:
        optuna.delete_study(study_name=name, storage=storage)


# ---------------------------------------------------------------- polca-study tuning


def tune_args(directory, extra=()):
    return [
        "-m",
        "+sweep=tune_methods",
        "experiment=tiny",
        "logger=disabled",
        "num_threads=1",
        "method=choice(loss, polca)",
        "hydra.sweeper.n_trials=6",  # random-phase trials; the toy study above covers TPE past them
        "hydra.sweeper.average_over.seed=[1,2]",
        "hydra.sweeper.heartbeat_interval=1",
        "hydra.sweeper.grace_period=2",
        "cluster.min_cluster_size=int(interval(4, 12))",
        "cluster.min_samples=int(interval(2, 6))",
        f"hydra.sweep.dir={directory}",
        *extra,
    ]


def tuning(directory) -> tuple[dict, dict]:
    storage = sqlite(directory)
    studies = {m: history(storage, f"tune_methods-{m}") for m in ("loss", "polca")}
    tuned = {m: (directory / "configs" / "tuned_method" / f"{m}.yaml").read_text() for m in ("loss", "polca")}
    return studies, tuned


def test_tuning_is_reproducible_through_kills_and_parallel_jobs(tmp_path, env):
    """The tuning study of the comparison (2 methods, 6 trials each, 2 tuning seeds):
    uninterrupted, with 1 or 2 side-by-side jobs, and killed part-way then rerun."""
    polca_env = {**env, "POLCA_CACHE_DIR": str(tmp_path / "cache")}

    def tune(directory, *extra):
        proc = subprocess.run(
            POLCA + tune_args(directory, extra), cwd=ROOT, env=polca_env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]

    tune(tmp_path / "two_jobs")  # the sweep's own launcher: joblib, 2 jobs side by side
    reference = tuning(tmp_path / "two_jobs")
    assert all(len(h) == 6 for h in reference[0].values())
    tune(tmp_path / "one_job", "hydra.launcher.n_jobs=1")
    assert tuning(tmp_path / "one_job") == reference

    killed = tmp_path / "killed"
    kill_after(POLCA + tune_args(killed), polca_env, sqlite(killed), "tune_methods-loss", complete=3)
    tune(killed)
    assert tuning(killed) == reference
    for m in ("loss", "polca"):
        best = optuna.load_study(study_name=f"tune_methods-{m}", storage=sqlite(killed)).best_params
        cfg = OmegaConf.create(reference[1][m])
        assert all(OmegaConf.select(cfg, k) == v for k, v in best.items())


def test_tuning_refuses_a_changed_preset_and_exports_nothing(tmp_path, env):
    polca_env = {**env, "POLCA_CACHE_DIR": str(tmp_path / "cache")}
    args = tune_args(tmp_path, ["hydra.sweeper.n_trials=2", "hydra.sweeper.average_over.seed=[1]"])
    proc = subprocess.run(POLCA + args, cwd=ROOT, env=polca_env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    exported = {p: p.read_text() for p in (tmp_path / "configs").rglob("*.yaml")}
    proc = subprocess.run(
        POLCA + args + ["dataset.carry_rate=null"], cwd=ROOT, env=polca_env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "dataset.carry_rate: 0.08 there, None here" in errors[0]
    assert {p: p.read_text() for p in (tmp_path / "configs").rglob("*.yaml")} == exported


def test_failed_polca_trials_are_recorded_with_their_reason(tmp_path, env):
    storage = sqlite(tmp_path)
    args = [
        "-m",
        "experiment=tiny",
        "+sweep=tiny_clustering",
        "logger=disabled",
        "num_threads=1",
        "hydra.sweeper.retries=0",
        f"hydra.sweep.dir={tmp_path}",
        "cluster.min_cluster_size=int(interval(-9, 1))",  # every trial's job raises
    ]
    proc = subprocess.run(POLCA + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode != 0
    assert "max_failures=3" in proc.stderr
    failed = optuna.load_study(study_name="tiny_clustering", storage=storage).get_trials(
        states=(TrialState.FAIL,)
    )
    assert len(failed) == 3
    assert all("cluster.min_cluster_size must be >= 2" in t.user_attrs["fail_reason"] for t in failed)
