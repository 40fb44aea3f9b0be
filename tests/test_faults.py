"""Faults a user meets outside the settings: each is one line that names the setting,
file or step and what to do, with exit code 2, before any work where that is possible;
none gives a different result with exit 0. A multirun names its bad job and still
writes the others' comparison."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from polca_study.snapshots.store import SnapshotStore, SnapshotWriter
from tests.conftest import POLCA

pytestmark = pytest.mark.slow
TINY = ["experiment=tiny", "logger=disabled", "progress=false", "figures=false", "num_threads=1"]


def polca(*args, cwd, env=None, timeout=600):
    return subprocess.run([*POLCA, *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=timeout)


def refused(proc) -> str:
    """The one line a refused command prints."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("polca-study: error: ")
    return lines[0].removeprefix("polca-study: error: ")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The tiny study once: its cache (with the training run's store) and its summary."""
    root = tmp_path_factory.mktemp("faults")
    proc = polca(*TINY, f"cache_dir={root / 'cache'}", f"hydra.run.dir={root / 'run'}", cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (store,) = (root / "cache" / "train").glob("*/snapshots")
    return {"root": root, "cache": root / "cache", "store": store, "summary": summary(root / "run")}


@pytest.fixture
def recorded(trained, tmp_path):
    """A copy of the training run's store, to damage, read as a recorded store."""
    store = tmp_path / "store"
    shutil.copytree(trained["store"], store)
    return store


def run_recorded(store: Path, tmp_path: Path, *more):
    args = (*TINY, "snapshots=recorded", f"snapshots.path={store}", f"cache_dir={tmp_path / 'cache'}")
    return polca(*args, f"hydra.run.dir={tmp_path / 'run'}", *more, cwd=tmp_path)


def edit_manifest(store: Path, edit) -> None:
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest["snapshots"])
    path.write_text(json.dumps(manifest))


def test_a_step_listed_twice_is_refused(recorded, tmp_path):
    edit_manifest(recorded, lambda s: s.insert(5, dict(s[4])))  # step 40 twice
    line = refused(run_recorded(recorded, tmp_path))
    assert line == f"{recorded / 'manifest.json'} lists step 40 twice: a store holds one snapshot per step"
    assert not (tmp_path / "cache").exists()  # before any work


def test_a_snapshot_an_interval_needs_is_refused(recorded, tmp_path):
    edit_manifest(recorded, lambda s: s.pop(4))  # step 40: polca.interval=20 needs it
    (recorded / "step-00000040.safetensors").unlink()
    line = refused(run_recorded(recorded, tmp_path))
    assert line.startswith(f"polca.interval=20 needs a snapshot at step 40, which {recorded} lacks")


def test_identical_parameters_at_two_steps_are_refused_unless_accepted(trained, recorded, tmp_path):
    store = SnapshotStore(recorded)
    SnapshotWriter(recorded, store.parameters).write(40, store.flat(30))
    line = refused(run_recorded(recorded, tmp_path))
    assert line.startswith(f"{recorded}: steps 30 and 40 hold identical parameters")
    assert "snapshots.allow_duplicates=true" in line
    accepted = run_recorded(recorded, tmp_path, "snapshots.allow_duplicates=true")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    assert "steps 30 and 40 hold identical parameters; analysed as it is" in accepted.stdout + accepted.stderr
    # analysed as it is: a different result from the undamaged store's
    assert summary(tmp_path / "run")["carry_recovery"] != trained["summary"]["carry_recovery"]


def test_a_deleted_snapshot_of_a_recorded_store_is_named(recorded, tmp_path):
    (recorded / "step-00000060.safetensors").unlink()
    line = refused(run_recorded(recorded, tmp_path))
    assert line.startswith(f"{recorded / 'step-00000060.safetensors'} is missing: the snapshot at step 60")
    assert line.endswith("a recorded store cannot be recomputed here: record it again")


def test_an_invalid_manifest_is_named(recorded, tmp_path):
    (recorded / "manifest.json").write_text('{"format": "polca-snapshots", ')
    line = refused(run_recorded(recorded, tmp_path))
    assert line.startswith(f"{recorded / 'manifest.json'} is not valid JSON: ")


def test_a_missing_store_directory_is_named(tmp_path):
    line = refused(run_recorded(tmp_path / "nowhere", tmp_path))
    assert line == f"snapshots.path={tmp_path / 'nowhere'} is not a directory: name a recorded snapshot store"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("device=gpu", "device must be one of auto, cpu, cuda, cuda:N, got 'gpu'"),
        ("seed=-1", "seed must be an integer in [0, 2**32), got -1"),
    ],
)
def test_bad_device_and_seed_are_refused_before_any_work(tmp_path, override, expected):
    assert refused(polca(*TINY, override, f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)) == expected
    assert not (tmp_path / "cache").exists()


def test_a_gpu_this_machine_lacks_is_refused(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    line = refused(polca(*TINY, "device=cuda", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path))
    assert line == "device=cuda, but torch finds no CUDA device here: use device=cpu or device=auto"


def test_a_bad_seed_in_a_multirun_is_named_before_any_job(tmp_path):
    proc = polca("-m", *TINY, "seed=-1,0", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    assert refused(proc) == "seed must be an integer in [0, 2**32), got -1 (job seed=-1)"
    assert not (tmp_path / "multirun").exists()


def test_a_cache_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    line = refused(polca(*TINY, f"cache_dir={tmp_path / 'file' / 'cache'}", cwd=tmp_path))
    cache, file = tmp_path / "file" / "cache", tmp_path / "file"
    assert line == f"cache_dir={cache} cannot hold a cache: {file} is a file, not a directory"


def test_a_run_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    line = refused(polca(*TINY, f"hydra.run.dir={tmp_path / 'file' / 'run'}", cwd=tmp_path))
    assert line == (
        f"hydra.run.dir={tmp_path / 'file' / 'run'} cannot be created: {tmp_path / 'file'} is a file, "
        "not a directory; set hydra.run.dir to a writable directory"
    )


@pytest.fixture
def read_only(tmp_path):
    """A directory on a read-only file system, filled first by `fill(dir)`: a tmpfs
    mounted here (root), remounted read-only."""
    mounts = []

    def make(fill=lambda where: None) -> Path:
        where = tmp_path / f"ro{len(mounts)}"
        where.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(where)]).returncode:
            pytest.skip("mounting a read-only file system needs root")
        mounts.append(where)
        fill(where)
        subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


def test_an_unwritable_run_dir_is_refused(tmp_path, read_only):
    where = read_only()
    line = refused(polca(*TINY, f"hydra.run.dir={where / 'run'}", cwd=tmp_path))
    assert line == (
        f"hydra.run.dir={where / 'run'} cannot be created: {where} is not writable; "
        "set hydra.run.dir to a writable directory"
    )


def test_a_read_only_cache_is_read_and_a_stage_it_lacks_is_refused(trained, tmp_path, read_only):
    full = read_only(lambda where: shutil.copytree(trained["cache"], where / "cache"))
    proc = polca(*TINY, f"cache_dir={full / 'cache'}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(tmp_path / "run")["carry_recovery"] == trained["summary"]["carry_recovery"]
    assert all(summary(tmp_path / "run")["cache_hits"].values())
    empty = read_only()
    line = refused(polca(*TINY, f"cache_dir={empty}", cwd=tmp_path))
    assert line.startswith(f"cache_dir={empty} is read-only and holds no train entry for this run (")
    assert line.endswith("point cache_dir at a writable directory (a copy of this one keeps its entries)")


def test_a_corrupt_snapshot_in_the_cached_training_run_is_trained_again(trained, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(trained["cache"], cache)
    for stage in ("basis", "decompose"):  # so that the run reads the snapshots again
        shutil.rmtree(cache / stage)
    (snapshot,) = cache.glob("train/*/snapshots/step-00000040.safetensors")
    blob = bytearray(snapshot.read_bytes())
    blob[-1] ^= 0xFF
    snapshot.write_bytes(bytes(blob))
    proc = polca(*TINY, f"cache_dir={cache}", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert log.count("the cached training run is damaged") == 1
    assert f"{snapshot} (step 40) does not match its SHA-256" in log
    assert summary(tmp_path / "run")["carry_recovery"] == trained["summary"]["carry_recovery"]


def test_a_missing_corpus_is_one_line_naming_the_offline_way_in(tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "POLCA_DATA_DIR"}
    env["PATH"] = str(Path(sys.executable).parent)  # no apt-get on the path
    args = ("experiment=tiny_text", "logger=disabled", f"dataset.data_dir={tmp_path / 'data'}")
    line = refused(polca(*args, f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path, env=env))
    assert line.startswith(
        f"the offline corpus is not in {tmp_path / 'data' / 'austen'} and could not be fetched"
    )
    assert "`--deb FILE`" in line and "polca-study-data fetch" in line


def test_a_multirun_names_its_bad_job_and_compares_the_others(trained, recorded, tmp_path):
    missing = tmp_path / "nowhere"
    args = ("-m", *TINY, "snapshots=recorded", f"snapshots.path={recorded},{missing}")
    proc = polca(
        *args, f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("polca-study: error: ")]
    assert len(errors) == 1 and errors[0].startswith("polca-study: error: job 1 (")
    assert f"snapshots.path={missing} " in errors[0].split("): ")[0]
    assert errors[0].endswith(f"snapshots.path={missing} is not a directory: name a recorded snapshot store")
    comparison = (tmp_path / "sweep" / "comparison.md").read_text()
    assert "## Jobs that did not run" in comparison and f"snapshots.path={missing}" in comparison
    assert (tmp_path / "sweep" / "0" / "summary.json").exists()
