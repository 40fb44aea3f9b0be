"""One table comparing the jobs of a multirun (methods, basis ablations, settings).

Runs automatically at the end of every multirun (a Hydra callback), or by hand:

    python -m polca_study.compare multirun/2026-11-22/10-00-00

Writes `comparison.md` and `comparison.csv` into the sweep directory and logs the table
to W&B in the sweep's group.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

COLUMNS = {
    "carry_top1_carry_homogeneity": "carry hom. 1",
    "carry_top2_carry_homogeneity": "carry hom. 2",
    "carry_top3_carry_homogeneity": "carry hom. 3",
    "carry_top1_carry_recall": "recall 1",
    "carry_top1_carry_f1": "F1 1",
    "null_top_carry_homogeneity_null95": "hom. null 95%",
    "null_top_carry_homogeneity_pvalue": "hom. p",
    "carry_recovery": "carry_recovery",
    "null_carry_recovery_pvalue": "recovery p",
    "probe_auc": "probe AUC",
    "simply_labelled_fraction": "simply labelled frac.",
    "null_simply_labelled_fraction_mean": "simple null mean",
    "simply_labelled_fraction_p": "simple p",
    "simply_labelled_clusters": "simple clusters",
    "label_purity": "label purity",
    "null_label_purity_mean": "purity null mean",
    "label_purity_p": "purity p",
    "hidden_breakthrough_fraction": "hidden BT frac.",
    "coverage": "coverage",
    "clusters": "clusters",
}


def job_overrides(run_dir: Path) -> dict[str, str]:
    """The job's command-line overrides, from Hydra's record."""
    path = run_dir / ".hydra" / "overrides.yaml"
    items = [str(o) for o in OmegaConf.load(path)] if path.exists() else []
    return dict(o.split("=", 1) for o in items if "=" in o)


def comparison_table(sweep_dir: Path) -> pd.DataFrame:
    """One row per job; jobs are named by the overrides that differ between them."""
    summaries = sorted(Path(sweep_dir).glob("*/summary.json"), key=lambda p: _job_number(p.parent))
    overrides = [job_overrides(p.parent) for p in summaries]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1] or keys
    rows = []
    for summary, over in zip(summaries, overrides, strict=True):
        metrics = json.loads(summary.read_text())
        label = ", ".join(f"{k}={over[k]}" for k in varying if k in over) or summary.parent.name
        row = {"job": label, "method": metrics.get("method")}
        row.update({name: metrics.get(key) for key, name in COLUMNS.items()})
        rows.append(row)
    return pd.DataFrame(rows).dropna(axis=1, how="all")  # arithmetic or text columns only


def _job_number(run_dir: Path) -> tuple[int, str]:
    return (int(run_dir.name), "") if run_dir.name.isdigit() else (1 << 30, run_dir.name)


def write_comparison(sweep_dir: Path, logger_cfg: DictConfig | None = None) -> pd.DataFrame:
    table = comparison_table(sweep_dir)
    if table.empty:
        log.warning("no summaries under %s: nothing to compare", sweep_dir)
        return table
    table.to_csv(sweep_dir / "comparison.csv", index=False)
    (sweep_dir / "comparison.md").write_text(table.to_markdown(index=False, floatfmt=".3f") + "\n")
    log.info("comparison of %d jobs written to %s/comparison.md", len(table), sweep_dir)
    if logger_cfg is not None:
        _log_wandb(table, sweep_dir, logger_cfg)
    return table


def _log_wandb(table: pd.DataFrame, sweep_dir: Path, logger_cfg) -> None:
    from polca_study import tracking

    group = Path(sweep_dir).as_posix().replace("/", "_")
    tracker = tracking.start(logger_cfg, {"sweep_dir": str(sweep_dir)}, Path(sweep_dir),
                             group=group, job_type="comparison",
                             name=f"comparison-{Path(sweep_dir).name}", tags=["comparison"])
    try:
        tracker.table("comparison", table.astype(str))
    finally:
        tracker.finish()


class ComparisonCallback(Callback):
    """Hydra callback: write the comparison table when a multirun ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        try:
            write_comparison(Path(config.hydra.sweep.dir), config.get("logger"))
        except Exception as err:  # a report must never fail the sweep it summarises
            log.warning("comparison table failed: %s", err)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m polca_study.compare <sweep directory>")
    print(write_comparison(Path(sys.argv[1])).to_markdown(index=False, floatfmt=".3f"))
