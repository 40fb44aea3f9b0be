"""The end of a study: best trial, optimisation history and parameter importances, as
PNG and YAML in the sweep directory and as a W&B run in the study's group."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

log = logging.getLogger(__name__)


def summarise_study(study: optuna.Study, out_dir: Path, config: DictConfig, storage: str) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
    result = {
        "study": study.study_name,
        "storage": storage,
        "trials_complete": len(complete),
        "trials_failed": len(failed),
    }
    if complete:
        best = study.best_trial
        result.update(best_trial=best.number, best_value=best.value, best_params=best.params)
        log.info(
            "study %s (%s): best trial %d: %.4f with %s",
            study.study_name,
            storage,
            best.number,
            best.value,
            best.params,
        )
    figures = {}
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # matplotlib plots
    if complete:
        ax = optuna.visualization.matplotlib.plot_optimization_history(study)
        figures["optimization_history"] = _save(ax, out_dir / "optimization_history.png")
    if len(complete) >= 2 and study.best_trial.params:
        try:
            importances = optuna.importance.get_param_importances(study)
            result["param_importances"] = {k: float(v) for k, v in importances.items()}
            ax = optuna.visualization.matplotlib.plot_param_importances(study)
            figures["param_importances"] = _save(ax, out_dir / "param_importances.png")
        except (RuntimeError, ValueError) as err:  # e.g. a single distinct value
            log.info("no parameter importances: %s", err)
    OmegaConf.save(OmegaConf.create(result), out_dir / "optimization_results.yaml")
    _log_wandb(study, result, figures, config)
    return result


def trials_table(study: optuna.Study) -> pd.DataFrame:
    """One row per trial with numeric values and parameters (NaN where missing), so the
    W&B UI can sort and plot them; times as seconds, state and text as strings."""
    from polca_study.reporting.tracking import numeric_frame

    frame = study.trials_dataframe(attrs=("number", "value", "state", "duration", "params", "user_attrs"))
    if "duration" in frame:
        frame["duration"] = frame["duration"].dt.total_seconds()
    return numeric_frame(frame)


def _save(ax, path: Path) -> Path:
    fig = ax.figure if hasattr(ax, "figure") else ax.flatten()[0].figure
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _log_wandb(study, result: dict, figures: dict, config: DictConfig) -> None:
    """A W&B run in the study's group: the trials table, the figures, the best trial."""
    logger = config.get("logger")
    if logger is None:
        return
    from polca_study.reporting import tracking

    tracker = tracking.start(
        logger,
        {"study": study.study_name, "direction": study.direction.name, "storage": result["storage"]},
        Path(config.hydra.sweep.dir),
        group=tracking.group_name(logger, config.hydra.sweep.dir),
        job_type="study",
        name=f"{study.study_name}-summary",
        tags=["study"],
    )
    try:
        tracker.table("trials", trials_table(study))
        tracker.images({f"study_{k}": p for k, p in figures.items()})
        tracker.summary(result)  # best value and parameters, importances, counts
    finally:
        tracker.finish()
