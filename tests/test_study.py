"""End-to-end runs of the CLI on the tiny preset: outputs, W&B, caching, resume."""

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import POLCA, ROOT, require_corpus

pytestmark = pytest.mark.slow


def polca(args, env, timeout=600):
    proc = subprocess.run(POLCA + args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def wandb_records(run_dir: Path) -> list[dict]:
    """The offline run read back from its .wandb log."""
    (wandb_dir,) = list((run_dir / "wandb").glob("offline-run-*"))
    out = subprocess.run(
        [str(Path(POLCA[0]).parent / "wandb"), "leet", "inspect", "--json", str(wandb_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def run_state(run_dir: Path) -> dict:
    """The run record, config, summary, declared metrics and logged keys of an offline run."""
    records = wandb_records(run_dir)
    run = next(r["run"] for r in records if r["type"] == "run")
    config, summary, history = {}, {}, []
    for r in records:
        if r["type"] == "config":
            config.update(r["config"]["update"])
        elif r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
        elif r["type"] == "history":
            history.append(r["history"]["item"])
    config.update(run["config"]["update"])
    metrics = [r["metric"] for r in records if r["type"] == "metric"]
    return {"run": run, "config": config, "summary": summary, "history": history, "metrics": metrics}


def test_tiny_study_writes_outputs_and_an_offline_wandb_run(tmp_path, tiny_overrides, env):
    run_dir = tmp_path / "run"
    polca(tiny_overrides + ["figures=true", "polca=exact", f"hydra.run.dir={run_dir}"], env)
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in (
        "carry_recovery",
        "top_carry",
        "coverage",
        "ami_carry",
        "top_carry_homogeneity_null95",
        "carry_recovery_excess",
        "carry_recovery_null_mean",
        "filter_carry_rate_max",
        "aggregate_breakthrough_step",
        "hidden_breakthrough_fraction",
        "paper_second_order_rmse",
    ):
        assert key in summary
    table = pd.read_csv(run_dir / "clusters.csv")  # the reported scores are the table's
    eligible = table[table.eligible]
    assert summary["carry_recovery"] == pytest.approx(
        max(eligible.recovery.max(), 0.0) if len(eligible) else 0.0
    )
    assert summary["hidden_breakthrough_fraction"] == pytest.approx(table.hidden.mean())
    frame = pd.read_parquet(run_dir / "trajectories.parquet")
    assert {"token", "place", "carry", "value", "step", "loss", "loss_change", "polca_0"} <= set(frame)
    assert len(frame) == 60 * 4 * 5  # tokens x evaluation intervals
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "figures" / "top_clusters.png").stat().st_size > 1000
    state = run_state(run_dir)
    logged = {k.split(".")[0] for h in state["history"] for k in h}
    for key in (
        "eval/loss",
        "train/loss",
        "eval_accuracy/10s_carry",
        "figures/learning_curves",
        "tables/clusters",
    ):
        assert key in logged, key
    assert state["summary"]["carry_recovery"] == pytest.approx(summary["carry_recovery"])
    artifacts = [json.dumps(r) for r in wandb_records(run_dir) if r["type"] == "artifact"]
    assert any("trajectories-polca" in a for a in artifacts)


def test_multirun_over_clustering_reuses_cached_stages(tmp_path, tiny_overrides, env):
    sweep = tmp_path / "sweep"
    polca(["-m", "cluster.min_cluster_size=5,8", f"hydra.sweep.dir={sweep}"] + tiny_overrides, env)
    first = json.loads((sweep / "0" / "summary.json").read_text())
    second = json.loads((sweep / "1" / "summary.json").read_text())
    assert first["cache_hits"] == {"train": False, "basis": False, "decompose": False}
    assert second["cache_hits"] == {"train": True, "basis": True, "decompose": True}
    assert second["seconds"]["train"] < first["seconds"]["train"]
    cache = tmp_path / "cache"
    table = pd.read_csv(sweep / "comparison.csv")  # written by the multirun callback
    assert list(table.job) == ["cluster.min_cluster_size=5", "cluster.min_cluster_size=8"]
    assert table["carry_recovery"].tolist() == [first["carry_recovery"], second["carry_recovery"]]
    assert "| job" in (sweep / "comparison.md").read_text()
    assert len(list((cache / "train").glob("[!.]*"))) == 1
    assert len(list((cache / "decompose").glob("[!.]*"))) == 1


def test_bases_decomposed_alongside_are_the_ones_computed_alone(tmp_path, tiny_overrides, env):
    """`polca.alongside` (the comparison's setting) decomposes along the random and
    shuffled bases in the loss job's pass; their own jobs then read what they would have
    computed alone in a fresh cache: the same entries (keys and payload digests), the
    same clusters."""
    shared = tiny_overrides + ["polca.alongside=[hessian,random,shuffled]"]
    polca(shared + ["method=loss", f"hydra.run.dir={tmp_path}/loss"], env)
    cache, alone = tmp_path / "cache", tmp_path / "alone"
    assert len(list((cache / "decompose").glob("[!.]*"))) == 3
    assert len(list((cache / "basis").glob("[!.]*"))) == 3
    fresh = [o for o in tiny_overrides if not o.startswith("cache_dir=")] + [f"cache_dir={alone}"]
    for method in ("random_basis", "shuffled_basis"):
        polca(shared + [f"method={method}", f"hydra.run.dir={tmp_path}/{method}"], env)
        polca(fresh + [f"method={method}", f"hydra.run.dir={tmp_path}/{method}-alone"], env)
        read = json.loads((tmp_path / method / "summary.json").read_text())
        computed = json.loads((tmp_path / f"{method}-alone" / "summary.json").read_text())
        assert read["cache_hits"]["decompose"] is True and computed["cache_hits"]["decompose"] is False
        assert read["carry_recovery"] == computed["carry_recovery"]
        assert np.array_equal(
            np.load(tmp_path / method / "assignments.npy"),
            np.load(tmp_path / f"{method}-alone" / "assignments.npy"),
        )
    for entry in (alone / "decompose").glob("[!.]*"):
        ours = json.loads((cache / "decompose" / entry.name / "meta.json").read_text())
        assert ours["files"] == json.loads((entry / "meta.json").read_text())["files"]
    assert len(list((alone / "decompose").glob("[!.]*"))) == 2


def test_a_basis_alongside_that_fails_costs_only_its_own_entry(tmp_path, tiny_overrides, monkeypatch, caplog):
    """Another kind's basis failing inside the pass is logged and left to its own job:
    this job finishes with its decomposition and reports its own basis's cache hit (not
    the one it computed aside); a job whose own decomposition is cached tries no other."""
    from hydra import compose, initialize_config_dir

    from polca_study.study import bases
    from polca_study.study.config import CONF_DIR
    from polca_study.study.pipeline import run

    def unconverged(ctx, steps):
        raise RuntimeError("Lanczos did not converge")

    monkeypatch.setitem(bases.KINDS, "shuffled", unconverged)
    base = [o.replace("logger=offline", "logger=disabled") for o in tiny_overrides] + ["method=random_basis"]
    aside = ["polca.alongside=[hessian,random,shuffled]"]
    decompositions = lambda: sorted(p.name for p in (tmp_path / "cache" / "decompose").glob("[!.]*"))  # noqa: E731
    with initialize_config_dir(CONF_DIR, version_base="1.3"):
        run(compose("config", overrides=base), tmp_path / "alone")
        (own,) = decompositions()
        caplog.clear()
        # its own basis read, its own decomposition forced: the Hessian basis computed aside
        forced = run(compose("config", overrides=base + aside + ["force=[decompose]"]), tmp_path / "aside")
        assert forced["cache_hits"]["basis"] is True and forced["cache_hits"]["decompose"] is False
        assert "no decomposition along" in caplog.text and "Lanczos did not converge" in caplog.text
        assert own in decompositions() and len(decompositions()) == 2  # its own and the Hessian's
        caplog.clear()
        again = run(compose("config", overrides=base + aside), tmp_path / "again")
        assert all(again["cache_hits"].values()) and "no decomposition along" not in caplog.text
    assert again["carry_recovery"] == forced["carry_recovery"]


def test_killed_run_resumes_without_recomputing_finished_stages(tmp_path, tiny_overrides, env):
    cache = tmp_path / "cache"
    args = tiny_overrides + [
        "polca.interval=10",
        "dataset.eval_size=400",
        "basis.interval=20",
        f"hydra.run.dir={tmp_path}/run",
    ]
    proc = subprocess.Popen(
        POLCA + args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while not list((cache / "basis").glob("[!.]*")) and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list((cache / "basis").glob("[!.]*")), "the run never finished its basis stage"
    assert not list((cache / "decompose").glob("[!.]*")), "the run finished before it was killed"
    train_entry = next((cache / "train").glob("[!.]*")) / "meta.json"
    stamp = train_entry.stat().st_mtime_ns
    polca(args, env)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["cache_hits"] == {"train": True, "basis": True, "decompose": False}
    assert train_entry.stat().st_mtime_ns == stamp


def test_corrupt_cache_entry_is_recomputed(tmp_path, tiny_overrides, env):
    polca(tiny_overrides + [f"hydra.run.dir={tmp_path}/a"], env)
    payload = next((tmp_path / "cache" / "basis").glob("[!.]*")) / "arrays.npz"
    payload.write_bytes(payload.read_bytes()[:-10] + b"corrupted!")
    polca(tiny_overrides + [f"hydra.run.dir={tmp_path}/b"], env)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert summary["cache_hits"]["train"] is True and summary["cache_hits"]["basis"] is False


def test_tiny_text_study_labels_clusters_with_nearest_contexts(tmp_path, env):
    require_corpus()
    args = [
        "experiment=tiny_text",
        "logger=offline",
        f"cache_dir={tmp_path / 'cache'}",
        "progress=false",
        "num_threads=1",
        "cluster.min_cluster_size=4",
        "cluster.min_samples=2",
    ]
    run_dir = tmp_path / "run"
    polca(args + [f"hydra.run.dir={run_dir}"], env)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["dataset"] == "text" and summary["objective"] == "label_purity_excess"
    assert summary["clusters"] > 0
    clusters = pd.read_csv(run_dir / "clusters.csv")
    simple_vectors = clusters.loc[clusters.simply_labelled, "vector"].nunique()
    assert summary["simply_labelled_fraction"] == pytest.approx(simple_vectors / summary["vectors"])
    assert summary["label_purity_excess"] == pytest.approx(
        summary["label_purity"] - summary["label_purity_null_mean"]
    )
    for key in (
        "simply_labelled_fraction_null_mean",
        "simply_labelled_fraction_p",
        "ami_tag_w0",
        "label_purity",
        "label_purity_null_mean",
        "label_purity_p",
        "label_purity_excess",
        "hidden_breakthrough_fraction",
        "coverage",
    ):
        assert key in summary
    table = pd.read_csv(run_dir / "clusters.csv")
    assert len(table) == summary["clusters"]
    assert table.label.str.count(r" \| ").eq(3).all()  # four word positions per label
    contexts = pd.read_csv(run_dir / "contexts.csv", keep_default_na=False)
    per_cluster = contexts.groupby(["vector", "cluster"]).size()
    assert len(per_cluster) == len(table)
    assert (
        per_cluster == np.minimum(table.set_index(["vector", "cluster"])["size"], 10).loc[per_cluster.index]
    ).all()
    markdown = (run_dir / "clusters.md").read_text()
    assert markdown.count("## vector") == len(table) and "⟦" in markdown
    frame = pd.read_parquet(run_dir / "trajectories.parquet")
    assert {"token", "token_text", "tag_w0", "tag_w-3", "step", "polca_0"} <= set(frame)
    state = run_state(run_dir)
    logged = {k.split(".")[0] for h in state["history"] for k in h}
    assert {"eval/loss", "eval_loss/OTHER", "tables/cluster_contexts"} <= logged
    assert state["summary"]["simply_labelled_fraction"] == pytest.approx(summary["simply_labelled_fraction"])
    # a second run reuses the tokenizer, tags and every expensive stage
    polca(args + [f"hydra.run.dir={tmp_path / 'again'}", "cluster.min_cluster_size=5"], env)
    again = json.loads((tmp_path / "again" / "summary.json").read_text())
    assert again["cache_hits"] == {k: True for k in ("tokenizer", "tags", "train", "basis", "decompose")}
