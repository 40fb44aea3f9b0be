"""What a user sees in the W&B UI, read back from the offline runs' files: short names,
one group per sweep with its comparison run, declared metrics, a summary that no table
overwrites, numeric tables and native line plots of the cluster trajectories."""

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from polca_study.reporting.tracking import flat_summary, numeric_frame
from tests.test_study import polca, run_state

pytestmark = pytest.mark.slow


def logged_table(run_dir: Path, key: str) -> pd.DataFrame:
    """A table the run logged under `key`, from its file in the run's media."""
    (wandb_dir,) = list((run_dir / "wandb").glob("offline-run-*"))
    (path,) = list((wandb_dir / "files" / "media" / "table").glob(f"{key}_*.table.json"))
    data = json.loads(path.read_text())
    return pd.DataFrame(data["data"], columns=data["columns"])


def test_a_seed_multirun_of_one_method_is_grouped_named_and_compared(tmp_path, tiny_overrides, env):
    sweep = tmp_path / "seeds_sweep"
    polca(["-m", *tiny_overrides, "seed=0,1", f"hydra.sweep.dir={sweep}"], env)
    assert not list(Path(env["HOME"]).rglob("*")), "a run wrote into the user's home"
    # the comparison of a one-method seed multirun: tables, and it says why nothing is paired
    assert (sweep / "seeds.md").exists()
    assert "No paired differences" in (sweep / "summary.md").read_text()

    for seed in (0, 1):
        job = sweep / str(seed)
        state = run_state(job)
        summary = json.loads((job / "summary.json").read_text())
        assert state["run"]["display_name"] == f"polca-carry0.08-s{seed}"
        assert state["run"]["job_type"] == "job"
        assert state["run"]["run_group"] == "seeds_sweep"  # the sweep's own name
        config = state["config"]
        assert (config["preset"], config["task"], config["method_name"], config["data"]) == (
            "tiny",
            "arithmetic",
            "polca",
            "carry0.08",
        )
        assert f"seed={seed}" in config["overrides"]
        # every training series is declared against the training step
        declared = {m.get("name") or m.get("glob_name"): m for m in state["metrics"]}
        assert declared["eval/loss"]["step_metric"] == "trainer/step"
        assert declared["eval/accuracy"]["summary"] == {"max": True}
        assert declared["eval_accuracy/*"]["step_metric"] == "trainer/step"
        # the summary: scalars of summary.json, nested ones flattened, no table on top of them
        s = state["summary"]
        assert s["clusters"] == summary["clusters"] and isinstance(s["clusters"], int)
        assert s["carry_recovery"] == pytest.approx(summary["carry_recovery"])
        assert s["top_carry/1/carry_homogeneity"] == pytest.approx(
            summary["top_carry"][0]["carry_homogeneity"]
        )
        assert s["seconds/decompose"] == pytest.approx(summary["seconds"]["decompose"])
        assert s["cache_hits/train"] == summary["cache_hits"]["train"]
        logged = {k.split(".")[0] for h in state["history"] for k in h}
        assert "tables/clusters" in logged and "clusters" not in logged
        # the numeric cluster table
        clusters = logged_table(job, "tables/clusters")
        assert pd.api.types.is_numeric_dtype(clusters["size"])
        assert pd.api.types.is_numeric_dtype(clusters["carry_homogeneity"])
        # one native line plot per clustered basis vector: a series per cluster (the
        # largest 10) and the aggregate loss change
        assign = np.load(job / "assignments.npy")
        charts = {k for k in config if k.startswith("_wandb.visualize.charts/trajectories_v")}
        clustered = [j for j in range(assign.shape[1]) if (assign[:, j] >= 0).any()]
        assert charts == {f"_wandb.visualize.charts/trajectories_v{j}" for j in clustered}
        for j in clustered:
            series = logged_table(job, f"charts/trajectories_v{j}_table")["lineKey"].unique()
            clusters_j = len(np.unique(assign[:, j][assign[:, j] >= 0]))
            assert len(series) == min(clusters_j, 10) + 1
            assert "aggregate loss change" in series
        panel = config["_wandb.visualize.charts/trajectories_v0"]["panel_config"]
        assert panel["panelDefId"] == "wandb/lineseries/v0"

    # the comparison run: in the same group, with numeric tables
    comparison = run_state(sweep)
    assert comparison["run"]["run_group"] == "seeds_sweep"
    assert comparison["run"]["job_type"] == "comparison"
    table = logged_table(sweep, "tables/comparison")
    assert pd.api.types.is_numeric_dtype(table["carry_recovery"])
    seeds = logged_table(sweep, "tables/seeds")
    assert {"mean", "ci_low", "ci_high", "n"} <= set(seeds.columns)
    assert pd.api.types.is_numeric_dtype(seeds["ci_low"])


def test_flat_summary_and_numeric_frames():
    flat = flat_summary(
        {"a": 1, "b": {"c": 2.5, "d": [0.1, {"e": True}]}, "f": None, "g": "text", "h": np.float32(0.5)}
    )
    assert flat == {"a": 1, "b/c": 2.5, "b/d/1": 0.1, "b/d/2/e": 1, "g": "text", "h": 0.5}
    frame = numeric_frame(pd.DataFrame({"x": [1, None, "2"], "y": ["a", None, "b"], "z": [[1], [2], [3]]}))
    assert frame["x"].dtype == float and np.isnan(frame["x"][1])
    assert frame["y"][0] == "a" and pd.isna(frame["y"][1]) and frame["y"][2] == "b"
    assert frame["z"].tolist() == ["[1]", "[2]", "[3]"]


def test_trials_and_their_runs_lead_to_each_other(tmp_path, env):
    import optuna

    sweep = tmp_path / "study_sweep"
    overrides = [
        "-m",
        "experiment=tiny",
        "+sweep=tiny_clustering",
        "logger=offline",
        "num_threads=1",
        "hydra.sweeper.n_trials=2",
        f"hydra.sweep.dir={sweep}",
    ]
    polca(overrides, env)
    study = optuna.load_study(study_name="tiny_clustering", storage=f"sqlite:///{sweep / 'optuna.db'}")
    for trial in study.trials:
        job = sweep / str(trial.number)
        state = run_state(job)
        assert trial.user_attrs["job_dirs"] == [str(job)]
        assert trial.user_attrs["wandb_runs"] == [f"polca-study/{state['run']['run_id']}"]
        assert state["config"]["optuna_study"] == "tiny_clustering"
        assert state["config"]["optuna_trial"] == trial.number
        assert state["run"]["job_type"] == "trial"
        assert state["run"]["display_name"] == f"polca-carry0.08-s0-t{trial.number}"
        assert state["run"]["run_group"] == "study_sweep"
    # the study's summary run, in the same group, with a numeric trials table
    summaries = [d for d in (sweep / "wandb").glob("offline-run-*")]
    states = [run_state_of(d) for d in summaries]
    (summary,) = [s for s in states if s["run"]["job_type"] == "study"]
    assert summary["run"]["run_group"] == "study_sweep"
    assert summary["summary"]["trials_complete"] == 2
    assert "best_params/cluster.min_cluster_size" in summary["summary"]


def run_state_of(wandb_dir: Path) -> dict:
    """run_state of one offline run directory (a sweep directory holds several)."""
    holder = wandb_dir.parent.parent / f".{wandb_dir.name}"
    (holder / "wandb").mkdir(parents=True)
    (holder / "wandb" / wandb_dir.name).symlink_to(wandb_dir)
    return run_state(holder)
