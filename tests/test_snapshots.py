"""The snapshot store, resumable training, and stages that leave the snapshots alone."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from polca_study.snapshots.store import Parameter, SnapshotStore, SnapshotWriter, StoreError
from tests.conftest import POLCA, ROOT


def test_store_round_trips_names_shapes_dtypes_and_steps(tmp_path):
    params = [
        Parameter("embed.weight", (5, 3), "float32"),
        Parameter("blocks.0.ln.bias", (3,), "float64"),
        Parameter("head.weight", (2, 3), "bfloat16"),
    ]
    writer = SnapshotWriter(tmp_path / "store", params, model={"class": "Toy", "config": {"d": 3}})
    g = torch.Generator().manual_seed(0)
    written = {}
    for step in (0, 25, 50):
        state = {p.name: torch.randn(p.shape, generator=g).to(getattr(torch, p.dtype)) for p in params}
        writer.write(step, state)
        written[step] = state
    store = SnapshotStore(tmp_path / "store")
    assert store.steps.tolist() == [0, 25, 50] and len(store) == 3
    assert store.parameters == params and store.model == {"class": "Toy", "config": {"d": 3}}
    for step, state in written.items():
        got = store.state(step)
        for p in params:
            assert got[p.name].dtype == getattr(torch, p.dtype) and tuple(got[p.name].shape) == p.shape
            assert torch.equal(got[p.name], state[p.name])
        flat = torch.cat([state[p.name].double().reshape(-1) for p in params])
        assert torch.equal(store.flat(step, torch.float64), flat)
    # a plain safetensors reader sees the names, shapes and the step without our code
    with safe_open(str(tmp_path / "store" / "step-00000025.safetensors"), "pt") as f:
        assert set(f.keys()) == {p.name for p in params}
        assert f.metadata()["step"] == "25"
        assert f.get_slice("embed.weight").get_shape() == [5, 3]
    # a reopened writer continues the store; a rewritten step replaces the old one
    again = SnapshotWriter(tmp_path / "store", params)
    again.write(75, written[0])
    again.keep_until(50)
    assert SnapshotStore(tmp_path / "store").steps.tolist() == [0, 25, 50]
    assert not (tmp_path / "store" / "step-00000075.safetensors").exists()
    with pytest.raises(ValueError, match="other parameters"):
        SnapshotWriter(tmp_path / "store", params[:2])


def test_store_reads_lazily_and_checks_integrity(tmp_path):
    params = [Parameter("w", (4,), "float32")]
    writer = SnapshotWriter(tmp_path, params)
    for step in range(3):
        writer.write(step, torch.full((4,), float(step)))
    store = SnapshotStore(tmp_path)
    assert store.reads == 0  # opening reads the manifest only
    seq = store.sequence([2, 0])
    assert [t.tolist() for t in seq] == [[2.0] * 4, [0.0] * 4] and store.reads == 2
    with pytest.raises(ValueError, match="no snapshot at steps \\[7\\]"):
        store.sequence([0, 7])
    blob = bytearray((tmp_path / "step-00000001.safetensors").read_bytes())
    blob[-1] ^= 1
    (tmp_path / "step-00000001.safetensors").write_bytes(bytes(blob))
    with pytest.raises(StoreError, match="does not match its SHA-256"):
        store.flat(1)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["version"] = 99
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 99"):
        SnapshotStore(tmp_path)


TRAIN = """
import os, signal, sys
import torch
from polca_study.tasks.arithmetic_data import ArithmeticData, evaluate, token_loss
from polca_study.snapshots.model import ModelConfig, Transformer
from polca_study.snapshots.train import train
from polca_study.snapshots.train_config import TrainConfig

directory, kill_at = sys.argv[1], int(sys.argv[2])
torch.set_num_threads(1)
data = ArithmeticData(40, 40, 0.08, 0)
split = data.eval_split()
torch.manual_seed(0)
model = Transformer(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, n_ctx=16, d_vocab=14))

def on_eval(step, record):
    if step == kill_at:  # kill -9 between two saves of the training state
        os.kill(os.getpid(), signal.SIGKILL)

cfg = TrainConfig(steps=60, batch_size=16, warmup_steps=10, checkpoint_every=5, resume_every=2)
train(model, data.train_batches(16, 0), cfg, token_loss, lambda m: evaluate(m, split), directory,
      device=torch.device("cpu"), progress=False, on_eval=on_eval)
"""


def _train(directory, kill_at=-1):
    return subprocess.run(
        [sys.executable, "-c", TRAIN, str(directory), str(kill_at)], cwd=ROOT, capture_output=True, text=True
    )


def test_killed_training_resumes_to_bit_identical_snapshots(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _train(whole).returncode == 0
    first = _train(killed, kill_at=35)
    assert first.returncode == -9, first.stderr[-2000:]
    state = json.loads((killed / "resume" / "latest.json").read_text())
    assert state["directory"] == "step-00000030"  # saved every 2 snapshots: 30 was the last
    assert SnapshotStore(killed / "snapshots").steps.max() == 35
    assert not (killed / "history.parquet").exists()
    second = _train(killed)
    assert second.returncode == 0, second.stderr[-2000:]
    a, b = SnapshotStore(whole / "snapshots"), SnapshotStore(killed / "snapshots")
    assert a.steps.tolist() == b.steps.tolist() == list(range(0, 61, 5))
    for step in a.steps:
        sa, sb = a.state(step), b.state(step)
        assert all(torch.equal(sa[n], sb[n]) for n in a.names), f"step {step} differs"
    import pandas as pd

    pd.testing.assert_frame_equal(
        pd.read_parquet(whole / "history.parquet"), pd.read_parquet(killed / "history.parquet")
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(whole / "train_loss.parquet"), pd.read_parquet(killed / "train_loss.parquet")
    )
    assert not (killed / "resume").exists()  # a finished run keeps no training state


@pytest.mark.slow
def test_clustering_only_rerun_never_reads_the_snapshots(tmp_path, tiny_overrides, env):
    """Clustering-only trials run with every snapshot file gone (LCA's included)."""
    run = lambda extra: subprocess.run(  # noqa: E731
        POLCA + tiny_overrides + extra, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    first = run(["method=lca", f"hydra.run.dir={tmp_path}/a"])
    assert first.returncode == 0, first.stderr[-3000:]
    files = list((tmp_path / "cache" / "train").glob("*/snapshots/step-*.safetensors"))
    assert len(files) == 11  # tiny: 100 steps, a snapshot every 10
    for f in files:
        os.remove(f)
    for method in ("lca", "polca", "loss"):
        again = run([f"method={method}", "cluster.min_cluster_size=7", f"hydra.run.dir={tmp_path}/{method}"])
        assert again.returncode == 0, again.stderr[-3000:]
        summary = json.loads((tmp_path / method / "summary.json").read_text())
        hits = summary["cache_hits"]
        assert all(hits.values()) and {"train", "basis", "decompose"} <= set(hits), hits


def test_training_that_cannot_fit_on_disk_fails_before_it_starts(tmp_path, monkeypatch):
    import shutil

    from polca_study.study import sources as source
    from polca_study.study.config import ConfigError, validate
    from polca_study.tasks import make_task
    from tests.conftest import compose_config

    cfg = validate(compose_config(["experiment=tiny", f"cache_dir={tmp_path}"]))
    task = make_task(cfg.dataset)
    model = source.make_source(cfg).model(task)
    free = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(source.shutil, "disk_usage", lambda p: free._replace(free=1000))
    with pytest.raises(ConfigError, match="train.checkpoint_every \\(now 10\\)"):
        source.check_disk(tmp_path, model, cfg.train)
    monkeypatch.undo()
    source.check_disk(tmp_path, model, cfg.train)  # this one fits
