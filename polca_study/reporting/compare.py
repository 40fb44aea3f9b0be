"""Tables comparing the jobs of a multirun (methods, basis ablations, settings).

Runs automatically at the end of every multirun (a Hydra callback), or by hand:

    python -m polca_study.reporting.compare multirun/2026-11-22/10-00-00

Writes into the sweep directory, and logs to W&B in the sweep's group:
- `comparison.md/.csv`: one row per job;
- when the jobs span several seeds (`seed` is a sweep dimension like any other):
  `seeds.md/.csv`, per condition (the jobs' overrides other than the seed) and metric,
  the mean, standard deviation, a 95% bootstrap interval over seeds and the number of
  seeds; and `paired.md/.csv`, POLCA against each other method under the same remaining
  settings, paired by seed: the mean difference, its 95% bootstrap interval, an exact
  sign-flip test and a paired t-test; `summary.md`, the main metrics of both, short.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from polca_study.atomic import write_atomic, write_text_atomic
from polca_study.errors import ConfigError
from polca_study.reporting.jobs import Job, as_jobs, failed_jobs, find_jobs, keep_jobs, label, measured
from polca_study.reporting.paired_stats import (
    MOST_SEEDS,
    bootstrap_interval,
    seeds_for_power,
    sign_flip_p,
    t_test_power,
)
from polca_study.tasks import TASKS

log = logging.getLogger(__name__)

# Every task's runs have these; each task adds its own (tasks.TASKS[...].metrics).
COMMON_COLUMNS = {
    "aggregate_breakthrough_step": "aggregate BT step",
    "hidden_breakthrough_fraction": "hidden BT frac.",
    "coverage": "coverage",
    "clusters": "clusters",
    "unallocated_share": "unallocated share",
}
COMMON_SEED_METRICS = (
    "hidden_breakthrough_fraction",
    "coverage",
    "clusters",
    # beyond the paper: how much of the loss change a method leaves unallocated, and (in
    # polca=exact runs) how far the paper's second-order approximation is from exact
    "unallocated_share",
    "paper_second_order_relative_error",
)
COMMON_PAIRED_METRICS = ("hidden_breakthrough_fraction",)


# A label file's skills (analysis/skills.py), named by the jobs' labels:
# label_<name>_<score> -> its heading's end
SKILL_COLUMNS = {
    "recovery": "recovery",
    "recovery_null_mean": "null mean",
    "recovery_excess": "excess",
    "recovery_p": "p",
    "homogeneity": "top homogeneity",
    "recall": "top recall",
    "breakthrough_step": "BT step",
    "hidden": "hidden",
}
SKILL_SEEDS = ("recovery", "recovery_excess", "homogeneity", "recall", "breakthrough_step", "hidden")
SKILL_SUMMARY = ("recovery", "recovery_excess", "hidden")
SKILL_PAIRED = ("recovery_excess",)


def skill_metrics(names, scores) -> dict[str, str]:
    """Each label's flat metric names (summary.json's `label_<name>_<score>`) and headings."""
    return {f"label_{n}_{k}": f"{n} {SKILL_COLUMNS[k]}" for n in names for k in scores}


def skill_names(jobs: Sequence[Job]) -> list[str]:
    return sorted({name for job in jobs for name in job.metrics.get("labels") or {}})


def _skills_in(columns) -> list[str]:
    """The labels whose scores a table holds."""
    suffix = "_recovery_excess"
    return sorted(
        c.removeprefix("label_").removesuffix(suffix)
        for c in columns
        if c.startswith("label_") and c.endswith(suffix)
    )


def _tasks():
    return [kind.metrics for kind in TASKS.values()]  # read at call time: tasks may be added


def _union(*groups) -> tuple[str, ...]:
    return tuple(dict.fromkeys(m for group in groups for m in group))


def columns() -> dict[str, str]:
    """comparison.md's headings: each task's metrics, then the common ones."""
    return {k: v for t in _tasks() for k, v in t.columns.items()} | COMMON_COLUMNS


def seed_metrics() -> tuple[str, ...]:
    return _union(*(t.seeds for t in _tasks()), COMMON_SEED_METRICS)


def paired_metrics() -> tuple[str, ...]:
    return _union(*(t.paired for t in _tasks()), COMMON_PAIRED_METRICS)


def summary_metrics() -> dict[str, str]:
    """summary.md's columns: each task's main metrics, the hidden breakthroughs, the
    share of the loss change a method leaves unallocated and (exact mode) the paper's
    second-order approximation's relative error."""
    merged = {k: v for t in _tasks() for k, v in t.summary.items()}
    return merged | {
        "hidden_breakthrough_fraction": "hidden BT frac.",
        "unallocated_share": "unallocated",
        "paper_second_order_relative_error": "paper 2nd-order error",
    }


def headline_metrics() -> tuple[str, ...]:
    """Each task's objective and its excess (summary.md's paired part, the W&B views)."""
    return _union(*(t.headline for t in _tasks()))


def comparison_table(where: Path | Sequence[Job]) -> pd.DataFrame:
    """One row per job; jobs are named by the overrides that differ between them."""
    jobs = as_jobs(where)
    keys = sorted({k for j in jobs for k in j.overrides})
    varying = [k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1] or keys
    rows, headings = [], columns() | skill_metrics(skill_names(jobs), SKILL_COLUMNS)
    for job in jobs:
        over, metrics = job.overrides, job.metrics
        label = ", ".join(f"{k}={over[k]}" for k in varying if k in over) or job.run_dir.name
        row = {"job": label, "method": metrics.get("method")}
        row.update({name: metrics.get(key) for key, name in headings.items()})
        rows.append(row)
    return pd.DataFrame(rows).dropna(axis=1, how="all")  # arithmetic or text columns only


# Overrides that choose the method; the rest (data, clustering protocol...) is the
# context within which methods are paired.
METHOD_KEYS = ("method", "polca", "polca.second_order", "basis", "basis.kind")
REFERENCE = {"method": "polca"}  # POLCA with the default (path) second order and basis
# Overrides that change how a job runs, not what it measures: never part of a condition.


def seed_frame(where: Path | Sequence[Job]) -> pd.DataFrame:
    """One row per job: its condition (the overrides that vary between jobs, other than
    the seed, as text), the condition's method and context parts, its seed and metrics."""
    jobs = sorted(as_jobs(where), key=lambda j: str(j.run_dir))
    rows, wanted = [], (*seed_metrics(), *skill_metrics(skill_names(jobs), SKILL_SEEDS))
    keys = {k for j in jobs for k in j.overrides}
    varying = {k for k in keys if len({j.overrides.get(k) for j in jobs}) > 1}
    for job in jobs:
        over, metrics = job.overrides, job.metrics
        rest = measured(over, varying)
        method = {k: v for k, v in rest.items() if k in METHOD_KEYS}
        context = {k: v for k, v in rest.items() if k not in METHOD_KEYS}
        rows.append(
            {
                "condition": label(rest),
                "method": label(method) or "method=polca",
                "context": label(context),
                "seed": metrics.get("seed", over.get("seed")),
                **{m: metrics.get(m) for m in wanted},
            }
        )
    frame = pd.DataFrame(rows)
    if not len(frame):
        return frame
    # in seed order, wherever the jobs ran: a condition's mean and bootstrap interval
    # (its resampled indices) then do not depend on which sweep a seed came from, nor
    # the tables' row order on the order the jobs were found in
    frame = frame.sort_values(["seed", "condition"], kind="stable", ignore_index=True)
    return frame.dropna(axis=1, how="all")


def aggregate_seeds(frame: pd.DataFrame) -> pd.DataFrame:
    """Per condition and metric: n seeds, mean, standard deviation, 95% bootstrap interval."""
    rows = []
    metrics = [m for m in (*seed_metrics(), *skill_metrics(_skills_in(frame), SKILL_SEEDS)) if m in frame]
    for condition, jobs in frame.groupby("condition", sort=False):
        for m in metrics:
            v = jobs[m].dropna().to_numpy(dtype=float)
            if not len(v):
                continue
            lo, hi = bootstrap_interval(v)
            rows.append(
                {
                    "condition": condition,
                    "metric": m,
                    "n": len(v),
                    "mean": float(v.mean()),
                    "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
                    "ci_low": lo,
                    "ci_high": hi,
                }
            )
    return pd.DataFrame(rows)


def paired_markdown(paired: pd.DataFrame) -> str:
    """paired.md: the CSV's table, with the seeds for 80% power in words where no
    feasible number reaches it (nan in the CSV)."""
    seeds = paired["seeds_for_80_power"].map(lambda n: f"> {MOST_SEEDS:,}" if np.isnan(n) else f"{n:,.0f}")
    return paired.assign(seeds_for_80_power=seeds).to_markdown(index=False, floatfmt=".3f") + "\n"


def paired_differences(frame: pd.DataFrame, reference: dict = REFERENCE) -> pd.DataFrame:
    """POLCA minus each other method, within each context, paired by seed."""
    ref_label = label(reference)
    rows = []
    metrics = [m for m in (*paired_metrics(), *skill_metrics(_skills_in(frame), SKILL_PAIRED)) if m in frame]
    from scipy import stats  # seconds to import: the multirun callback loads this module at every start

    for context, jobs in frame.groupby("context", sort=False):
        ref = jobs[jobs["method"] == ref_label].set_index("seed")
        if ref.empty:
            continue
        for method, other in jobs[jobs["method"] != ref_label].groupby("method", sort=False):
            other = other.set_index("seed")
            seeds = ref.index.intersection(other.index)
            for m in metrics:
                d = (ref.loc[seeds, m] - other.loc[seeds, m]).dropna().to_numpy(dtype=float)
                if len(d) < 2:
                    continue
                lo, hi = bootstrap_interval(d)
                t = stats.ttest_1samp(d, 0.0).pvalue if d.std() > 0 else float("nan")
                effect = d.mean() / d.std(ddof=1) if d.std() > 0 else float("nan")
                rows.append(
                    {
                        "context": context,
                        "baseline": method,
                        "metric": m,
                        "n": len(d),
                        "polca_minus_baseline": float(d.mean()),
                        "ci_low": lo,
                        "ci_high": hi,
                        "sign_flip_p": sign_flip_p(d),
                        "t_test_p": float(t),
                        # the paired t-test's power at the observed effect, and the seeds
                        # that effect would need for 80% (a plan for more seeds, not a test)
                        "observed_power": t_test_power(effect, len(d)),
                        "seeds_for_80_power": seeds_for_power(effect),
                    }
                )
    return pd.DataFrame(rows)


def seeds_markdown(agg: pd.DataFrame, metrics: tuple[str, ...] | None = None) -> str:
    """Conditions as rows, metrics as columns: mean ± sd [95% interval] (n)."""
    metrics = metrics or (*seed_metrics(), *skill_metrics(_skills_in(agg["metric"]), SKILL_SEEDS))
    cell = agg.apply(
        lambda r: f"{r['mean']:.3f} ± {r['std']:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}] ({r.n})", axis=1
    )
    wide = agg.assign(cell=cell).pivot(index="condition", columns="metric", values="cell")
    wide = wide[[m for m in metrics if m in wide]]
    return wide.reset_index().to_markdown(index=False) + "\n"


NO_PAIRS = f"No paired differences: pairing needs {label(REFERENCE)} and another method on the same seeds."


def summary_markdown(frame: pd.DataFrame, agg: pd.DataFrame, paired: pd.DataFrame) -> str:
    """A short read of the two tables: per context, each method's mean [95% interval] of
    the main metrics, then POLCA minus each baseline on the objective and its excess."""
    skills = _skills_in(frame)
    out, summary = [], summary_metrics() | skill_metrics(skills, SKILL_SUMMARY)
    headline = (*headline_metrics(), *skill_metrics(skills, SKILL_PAIRED))
    for context in sorted(frame["context"].unique()):
        rows = []
        for condition in frame.loc[frame["context"] == context, "condition"].unique():
            sub = agg[agg["condition"] == condition].set_index("metric")
            method = frame.loc[frame["condition"] == condition, "method"].iloc[0]
            row = {"method": method, "seeds": int(sub["n"].max())}
            for m, name in summary.items():
                if m in sub.index:
                    r = sub.loc[m]
                    row[name] = f"{r['mean']:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]"
            rows.append(row)
        table = pd.DataFrame(rows)
        table = table[["method", "seeds", *[n for n in summary.values() if n in table]]]
        out += [f"### {context or 'all jobs'}", "", table.to_markdown(index=False), ""]
        if paired.empty:
            out += [NO_PAIRS, ""]
            continue
        p = paired[(paired["context"] == context) & paired["metric"].isin(headline)]
        if len(p):
            p = p.assign(
                diff=[
                    f"{r.polca_minus_baseline:+.3f} [{r.ci_low:+.3f}, {r.ci_high:+.3f}], "
                    f"p = {r.sign_flip_p:.3f}"
                    for r in p.itertuples()
                ]
            )
            wide = p.pivot(index=["baseline", "n"], columns="metric", values="diff").reset_index()
            out += [
                "POLCA minus each baseline, paired by seed (sign-flip p):",
                "",
                wide.to_markdown(index=False),
                "",
            ]
        out += published_markdown(frame[frame["context"] == context], agg)
    return "\n".join(out)


def published_markdown(frame: pd.DataFrame, agg: pd.DataFrame) -> list[str]:
    """Our means over seeds beside a task's published values, method by method: the
    gap at a glance (the published values are one seed each, without intervals)."""
    out = []
    for task in (t for t in _tasks() if t.published):
        source, values = task.published
        # in the order of the fullest row (the paper's own column order)
        fullest = max(values.values(), key=len)
        metrics = list(dict.fromkeys([*fullest, *(m for row in values.values() for m in row)]))
        if not set(agg["metric"]) & set(task.columns):  # another task's jobs
            continue
        rows = []
        for condition, method in frame[["condition", "method"]].drop_duplicates().itertuples(index=False):
            name = method.removeprefix("method=")
            if name not in values:  # the method as published ("method=polca, polca=exact" is not)
                continue
            ours = agg[agg["condition"] == condition].set_index("metric")["mean"]
            row = {"method": method}
            for m in metrics:
                mine = f"{ours[m]:.3f}" if m in ours else "-"
                theirs = f"{values[name][m]:.3f}" if m in values[name] else "-"
                row[m] = f"{mine} / {theirs}"
            rows.append(row)
        if rows:
            heading = f"Ours (mean over seeds) / {source}, beside each other:"
            out += [heading, "", pd.DataFrame(rows).to_markdown(index=False), ""]
    return out


def _write_csv(path: Path, frame: pd.DataFrame) -> None:
    write_atomic(path, lambda tmp: frame.to_csv(tmp, index=False))


def failed_markdown(failed: list[dict]) -> str:
    lines = ["", "## Jobs that did not run", ""]
    for f in failed:
        lines.append(f"- job {f['job']} ({' '.join(f['overrides'])}): {f['error']}")
    return "\n".join(lines) + "\n"


def write_comparison(
    sweep_dir: Path, logger_cfg: DictConfig | None = None, sources: Sequence[Path] = ()
) -> pd.DataFrame:
    """The tables of the jobs under `sources` (default: `sweep_dir` itself), written
    into `sweep_dir`: several sweeps' seeds join one set of tables."""
    sources = list(sources) or [sweep_dir]
    jobs = find_jobs(*sources)
    table = comparison_table(jobs)
    if table.empty:
        log.warning("no summaries under %s: nothing to compare", ", ".join(map(str, sources)))
        return table
    Path(sweep_dir).mkdir(parents=True, exist_ok=True)
    failed = failed_jobs(*sources)
    _write_csv(sweep_dir / "comparison.csv", table)
    write_text_atomic(
        sweep_dir / "comparison.md",
        table.to_markdown(index=False, floatfmt=".3f") + "\n" + (failed_markdown(failed) if failed else ""),
    )
    log.info("comparison of %d jobs written to %s/comparison.md", len(table), sweep_dir)
    tables = {"comparison": table}
    frame = seed_frame(jobs)
    if len(frame) and frame["seed"].nunique() > 1:
        agg, paired = aggregate_seeds(frame), paired_differences(frame)
        _write_csv(sweep_dir / "seeds.csv", agg)
        write_text_atomic(sweep_dir / "seeds.md", seeds_markdown(agg))
        _write_csv(sweep_dir / "paired.csv", paired)
        write_text_atomic(
            sweep_dir / "paired.md",
            paired_markdown(paired) if len(paired) else NO_PAIRS + "\n",
        )
        write_text_atomic(sweep_dir / "summary.md", summary_markdown(frame, agg, paired))
        tables.update(seeds=agg, paired=paired)
        log.info(
            "%d seeds: per-condition means and intervals in seeds.md, POLCA against each "
            "baseline in paired.md",
            frame["seed"].nunique(),
        )
    if logger_cfg is not None:
        _log_wandb(tables, sweep_dir, logger_cfg)
    return table


def _log_wandb(tables: dict[str, pd.DataFrame], sweep_dir: Path, logger_cfg) -> None:
    from polca_study.reporting import tracking

    config = {"sweep_dir": str(sweep_dir), "jobs": len(tables["comparison"])}
    with tracking.sweep_run(logger_cfg, sweep_dir, config, job_type="comparison", tags=["comparison"]) as run:
        for key, table in tables.items():
            run.table(key, table)  # numeric columns, intervals as ci_low/ci_high


class ComparisonCallback(Callback):
    """Hydra callback: write the comparison table when a multirun ends. Jobs that could
    not run are named in it and, once it is written, make the multirun exit with 1."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            write_comparison(sweep_dir, config.get("logger"))
        except Exception as err:  # a report must never fail the sweep it summarises
            log.warning("comparison table failed: %s", err)
        failed = failed_jobs(sweep_dir)
        if failed:
            print(
                f"polca-study: {len(failed)} of the multirun's jobs did not run (see above); "
                f"the others' comparison is in {sweep_dir}",
                file=sys.stderr,
            )
            sys.exit(1)


def main(argv: list[str] | None = None) -> None:
    """`python -m polca_study.reporting.compare OUT [SWEEP ...] [--keep ARCHIVE]`: the
    tables of the jobs under OUT, or of the jobs of every SWEEP joined, written into OUT.
    With --keep, the SWEEPs' job records are first appended to ARCHIVE (a directory kept
    with the results) and the tables are those of every job ARCHIVE holds."""
    parser = argparse.ArgumentParser(prog="python -m polca_study.reporting.compare")
    parser.add_argument("out", type=Path, help="where the tables are written")
    parser.add_argument("sweeps", type=Path, nargs="*", help="sweep directories to join (default: OUT)")
    parser.add_argument("--keep", type=Path, help="append the sweeps' job records here and compare them all")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        sources = args.sweeps
        if args.keep:
            added = keep_jobs(find_jobs(*sources), args.keep) if sources else 0
            log.info("%d jobs appended to %s", added, args.keep)
            sources = [args.keep]
        table = write_comparison(args.out, sources=sources)
    except ConfigError as err:
        raise SystemExit(f"polca-study: error: {err}") from None
    print(table.to_markdown(index=False, floatfmt=".3f"))


if __name__ == "__main__":
    main()
