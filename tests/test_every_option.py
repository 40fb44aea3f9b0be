"""One tiny end-to-end run for each method, basis option and second-order mode."""

import json

import pandas as pd
import pytest

from tests.test_study import polca

pytestmark = pytest.mark.slow

CASES = {
    "loss": (["method=loss"], {"method": "loss", "vectors": 1}),
    "loss_change": (["method=loss_change"], {"method": "loss_change", "vectors": 1}),
    "fisher": (["method=fisher"], {"method": "fisher", "vectors": 2}),
    "lca": (["method=lca"], {"method": "lca", "vectors": 50}),
    "polca_first_order": (["method=polca_first_order"], {"method": "polca_first_order", "vectors": 2}),
    "random_basis": (["method=random_basis"], {"method": "random_basis", "basis": "random", "basis_hvps": 0}),
    "shuffled_basis": (["method=shuffled_basis"], {"method": "shuffled_basis", "basis": "shuffled"}),
    "polca=none": (["polca=none"], {"second_order": "none"}),
    "polca=exact": (["polca=exact"], {"second_order": "exact"}),
    "polca=paper": (["polca=paper"], {"second_order": "paper"}),
    "polca=path": (["polca=path"], {"second_order": "path"}),
}


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_run(case, shared_cache, tmp_path, env):
    overrides, expected = CASES[case]
    run_dir = tmp_path / "run"
    polca(
        [
            "experiment=tiny",
            "logger=disabled",
            "progress=false",
            "figures=false",
            "num_threads=1",
            f"cache_dir={shared_cache}",
            f"hydra.run.dir={run_dir}",
            *overrides,
        ],
        env,
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    for key, value in expected.items():
        assert summary[key] == value, key
    # the reported objective is what the cluster table says
    table = pd.read_csv(run_dir / "clusters.csv")
    eligible = table[table.eligible]
    assert summary["clusters"] == len(table)
    assert summary["carry_recovery"] == pytest.approx(
        max(eligible.recovery.max(), 0.0) if len(eligible) else 0.0
    )
    assert summary["carry_recovery_excess"] == pytest.approx(
        summary["carry_recovery"] - summary["carry_recovery_null_mean"]
    )
    if case == "polca=exact":  # exact mode also measures the paper's approximation against it
        assert 0 < summary["paper_second_order_relative_error"] < float("inf")
        assert 0 < summary["paper_second_order_rmse"] < float("inf")
