"""Each method's tuned clustering settings, from the studies of `+sweep=tune_methods`.

The tuning study runs one Optuna study per method (`<study>-<method>`, the same space,
sampler, seed and number of trials), each trial scored on the tuning seeds. When it
ends, `ExportTuned` writes every method's best settings as
`<sweep dir>/configs/tuned_method/<name>.yaml`. Every `conf/method/<name>.yaml` ends its
defaults list with `optional /tuned_method: <name>`, so with that directory on Hydra's
search path

    polca-study hydra.searchpath=[file://$PWD/multirun/studies/tune_methods/configs] method=loss

clusters the loss with the settings of your tuning run. The package ships the settings
of the tuning run quoted in docs/comparison.md, in each method file's `cluster` block.
By hand:

    python -m polca_study.app.tuning <sweep dir> [study name]
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import optuna
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from polca_study.analysis.methods import METHODS
from polca_study.atomic import write_atomic
from polca_study.study.config import CONF_DIR

log = logging.getLogger(__name__)


def best_settings(storage: str, study_name: str, names: list[str]) -> dict[str, dict]:
    """{method: {"value", "trial", "trials", "params"}} of each study `<study_name>-<method>`
    among `names` (the studies a tuning command ran; others in the storage are not its)."""
    out = {}
    for name in names:
        method = name.removeprefix(f"{study_name}-")
        if not name.startswith(f"{study_name}-") or method not in METHODS:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            continue
        best = study.best_trial
        out[method] = {
            "value": float(best.value),
            "trial": best.number,
            "trials": len(done),
            "params": dict(best.params),
        }
    return out


def tuned_yaml(method: str, params: dict, note: str) -> str:
    """The `tuned_method/<method>.yaml` of `params` (dotted keys): the method's settings
    from its package file with the tuned keys replaced."""
    cfg = OmegaConf.load(Path(CONF_DIR) / "method" / f"{method}.yaml")
    cfg.pop("defaults", None)
    for key, value in params.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return f"# @package _global_\n# {note}\n" + OmegaConf.to_yaml(cfg)


def export_tuned(sweep_dir: Path, study_name: str) -> dict[str, dict]:
    """Write configs/tuned_method/<name>.yaml and configs/summary.md into `sweep_dir`, from
    the studies its command ran (listed by the sweeper in `studies.json`)."""
    record = json.loads((Path(sweep_dir) / "studies.json").read_text())
    best = best_settings(record["storage"], study_name, record["studies"])
    out = Path(sweep_dir).resolve() / "configs" / "tuned_method"
    out.mkdir(parents=True, exist_ok=True)
    lines = [
        "| method | best objective (mean over tuning seeds) | trial | trials | settings |",
        "|---|---|---|---|---|",
    ]
    for method, b in sorted(best.items()):
        note = (
            f"Tuned by study {study_name}-{method}: best of {b['trials']} trials, "
            f"objective {b['value']:.4f} (trial {b['trial']})."
        )
        text = tuned_yaml(method, b["params"], note)
        write_atomic(out / f"{method}.yaml", lambda p, t=text: p.write_text(t))
        settings = ", ".join(f"{k.removeprefix('cluster.')}={v}" for k, v in sorted(b["params"].items()))
        lines.append(f"| {method} | {b['value']:.4f} | {b['trial']} | {b['trials']} | {settings} |")
    summary = "\n".join(lines) + "\n"
    write_atomic(out.parent / "summary.md", lambda p: p.write_text(summary))
    log.info(
        "tuned settings of %d methods in %s; use them with: polca-study hydra.searchpath=[file://%s] ...",
        len(best),
        out,
        out.parent,
    )
    return best


class ExportTuned(Callback):
    """Hydra callback of the tuning study: export every method's best settings."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if (Path(config.hydra.sweep.dir) / "studies.json").exists():  # not when the sweep was refused
            export_tuned(Path(config.hydra.sweep.dir), config.hydra.sweeper.study_name)


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        raise SystemExit("usage: python -m polca_study.app.tuning <sweep dir> [study name]")
    print(export_tuned(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "tune_methods"))
