"""The whole comparison protocol on the tiny preset: per-method tuning with the same
budget on two tuning seeds, then every method with its tuned settings on two held-out
seeds, ending in the per-seed and paired tables."""

import json

import optuna
import pandas as pd
import pytest
from omegaconf import OmegaConf

from polca_study.analysis.methods import METHODS
from tests.conftest import POLCA, ROOT
from tests.test_study import polca, run_state

# the methods the tuning study tunes: the basis ablations use POLCA's settings
TUNED = [name for name, method in METHODS.items() if method.basis is None]

pytestmark = pytest.mark.slow

TINY = [
    "experiment=tiny",
    "num_threads=1",
    "cluster.min_cluster_size=int(interval(4, 10))",
    "cluster.min_samples=int(interval(2, 5))",
]


def test_tiny_protocol_tunes_every_method_alike_then_compares_on_held_out_seeds(tmp_path, env):
    env = {**env, "POLCA_CACHE_DIR": str(tmp_path / "cache")}
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    tune_dir = tmp_path / "tune"
    polca(
        [
            "-m",
            "+sweep=tune_methods",
            *TINY,
            "logger=disabled",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.average_over.seed=[1,2]",
            f"hydra.sweeper.storage={storage}",
            f"hydra.sweep.dir={tune_dir}",
        ],
        env,
        timeout=900,
    )
    studies = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    assert set(studies) == {f"tune_methods-{m}" for m in TUNED}
    spaces = []
    for name in studies:
        trials = optuna.load_study(study_name=name, storage=storage).trials
        assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
        assert all(len(t.user_attrs["replica_values"]) == 2 for t in trials)  # both tuning seeds
        spaces.append({k: repr(d) for k, d in trials[0].distributions.items()})
    assert all(s == spaces[0] for s in spaces)  # the same search space for every method
    assert "cluster.feature" not in spaces[0]
    tuned = tune_dir / "configs"
    for m in TUNED:
        cfg = OmegaConf.load(tuned / "tuned_method" / f"{m}.yaml")
        best = optuna.load_study(study_name=f"tune_methods-{m}", storage=storage).best_params
        assert cfg.method.name == m
        assert all(OmegaConf.select(cfg, k) == v for k, v in best.items())

    # held out: seeds 3 and 4, every method and ablation, tuned and paper protocols, on
    # uniform data; POLCA's exact and paper modes in both data regimes (a regime is one
    # setting: the tables' contexts differ with it, not the machinery)
    compare_dir = tmp_path / "compare"
    polca(
        [
            "-m",
            f"hydra.searchpath=[file://{tuned}]",
            "+sweep=compare_methods",
            "experiment=tiny",
            "num_threads=1",
            "logger=offline",
            "seed=3,4",
            "dataset.carry_rate=null",
            "method=loss,loss_change,fisher,lca,polca_first_order,polca,random_basis,shuffled_basis",
            "cluster=tuned,paper",
            f"hydra.sweep.dir={compare_dir}",
        ],
        env,
        timeout=900,
    )
    polca(
        [
            "-m",
            f"hydra.searchpath=[file://{tuned}]",
            "+sweep=compare_methods",
            "experiment=tiny",
            "num_threads=1",
            "logger=disabled",
            "seed=3,4",
            "dataset.carry_rate=0.08,null",  # both data regimes
            "method=polca",
            "polca=exact,paper",
            "cluster=tuned",
            f"hydra.sweep.dir={compare_dir}",
        ],
        env,
        timeout=900,
    )
    jobs = sorted(compare_dir.rglob("summary.json"))
    assert len(jobs) == 2 * (8 * 2 + 2 * 2)  # seeds x (methods x protocols + modes x regimes)
    # the tuned settings were used (but the sizes, which experiment=tiny sets for its scale)
    job = next(p.parent for p in jobs if "cluster=tuned" in str(p) and "method=loss," in str(p))
    used = OmegaConf.load(job / "config.yaml").cluster
    want = OmegaConf.load(tuned / "tuned_method" / "loss.yaml").cluster
    for key in ("selection_method", "normalize", "grouping"):
        assert used[key] == want[key]
    seeds = pd.read_csv(compare_dir / "seeds.csv")
    recovery = seeds[seeds.metric == "carry_recovery"]
    assert len(recovery) == 8 * 2 + 2 * 2 and (recovery.n == 2).all()
    assert (recovery.ci_low <= recovery["mean"]).all() and (recovery["mean"] <= recovery.ci_high).all()
    paired = pd.read_csv(compare_dir / "paired.csv")
    baselines = set(paired[paired.metric == "carry_recovery"].baseline)
    assert {"method=loss", "method=lca", "method=random_basis", "method=polca, polca=exact"} <= baselines
    random = paired[(paired.metric == "carry_recovery") & (paired.baseline == "method=random_basis")]
    assert {"cluster=tuned, dataset.carry_rate=null", "cluster=paper, dataset.carry_rate=null"} <= set(
        random.context
    )
    # the 8% data is a context of its own, without the reference (POLCA in path mode)
    assert not paired.context.str.contains("carry_rate=0.08").any()
    summary = json.loads(jobs[0].read_text())
    assert {
        "carry_recovery_excess",
        "carry_recovery_null_mean",
        "filter_carry_rate_max",
        "aggregate_breakthrough_step",
    } <= set(summary)
    # each job is a W&B run in the comparison's group, with its seed and method
    state = run_state(job)
    assert state["run"]["run_group"] == "compare_methods"
    assert (state["config"]["seed"], state["config"]["method_name"]) == (3, "loss")


def test_tuned_settings_on_the_search_path_replace_the_packaged_ones(tmp_path):
    """A tuning run's configs/tuned_method/<name>.yaml, once its directory is on Hydra's
    search path, overrides the method's packaged settings; cluster=paper still wins."""
    import subprocess

    (tmp_path / "tuned_method").mkdir()
    (tmp_path / "tuned_method" / "loss.yaml").write_text(
        "# @package _global_\nmethod:\n  name: loss\ncluster:\n  min_cluster_size: 77\n"
    )

    def composed(*overrides):
        out = subprocess.run(
            POLCA + [f"hydra.searchpath=[file://{tmp_path}]", *overrides, "--cfg", "job"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        return OmegaConf.create(out.stdout)

    assert composed("method=loss").cluster.min_cluster_size == 77
    assert composed("method=loss", "cluster=paper").cluster.min_cluster_size == 150
    assert composed("method=polca").cluster.min_cluster_size == 27  # no tuned file: the package's
