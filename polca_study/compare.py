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
    "hidden_breakthrough_fraction": "hidden BT frac.",
    "coverage": "coverage",
    "clusters": "clusters",
}


def job_label(run_dir: Path) -> str:
    """The job's overrides (from Hydra's record), or its directory name."""
    overrides = run_dir / ".hydra" / "overrides.yaml"
    if overrides.exists():
        items = OmegaConf.load(overrides)
        swept = [str(o) for o in items
                 if not str(o).startswith(("cache_dir", "hydra", "+sweep", "logger", "progress"))]
        if swept:
            return ", ".join(swept)
    return run_dir.name


def comparison_table(sweep_dir: Path) -> pd.DataFrame:
    rows = []
    for summary in sorted(Path(sweep_dir).glob("*/summary.json")):
        metrics = json.loads(summary.read_text())
        row = {"job": job_label(summary.parent), "method": metrics.get("method")}
        row.update({label: metrics.get(key) for key, label in COLUMNS.items()})
        rows.append(row)
    return pd.DataFrame(rows)


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
    from polca_study.tracking import resolve_mode

    mode = resolve_mode(logger_cfg.mode)
    if mode == "disabled":
        return
    import wandb

    run = wandb.init(project=logger_cfg.project, entity=logger_cfg.entity,
                     group=logger_cfg.group or Path(sweep_dir).as_posix().replace("/", "_"),
                     job_type="comparison", name=f"comparison-{Path(sweep_dir).name}",
                     dir=str(sweep_dir), mode=mode, reinit="finish_previous",
                     settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
    try:
        run.log({"comparison": wandb.Table(dataframe=table.astype(str))})
    finally:
        run.finish()


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
