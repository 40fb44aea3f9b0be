"""A saved W&B view for every comparison: a workspace and a report built with `wandb-workspaces`.

A comparison sweep (e.g. `+sweep=compare_methods`) logs one W&B run per job in one group,
plus the comparison run's tables. Finding the comparison in the W&B UI then takes a dozen
clicks: filter to the group, group by method and data, add a bar chart per metric with
error bars, a parallel coordinates plot of the tuning, the trajectory charts. This module
writes those views down once, with the library's own classes (never hand-written JSON):

- a **workspace** (`polca-study: <group>`) whose runs are the group's, grouped by
  `method.name` and the task's data regime (arithmetic: `dataset.carry_rate`), with
  sections "Headline metrics", "Tuning", "Cluster trajectories" and "Tables";
- a **report** (`polca-study comparison: <group>`) in the order of docs/comparison.md.

`write_spec` serialises both to `<sweep dir>/wandb_views.json` without a network or a
login (building and serialising the objects is the offline check that they are valid);
`publish` saves them to W&B, which needs a login. From the shell:

    polca-study-wandb multirun/compare_methods --study-group tune_methods [--publish]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from omegaconf import OmegaConf

from polca_study.tasks import TASKS
from polca_study.tasks.task import TaskMetrics

DEFAULT_PROJECT = "polca-study"
# Workspace and Report need an entity string, and the Report's default asks the W&B API
# (a login) for it; offline, a placeholder stands in until `--publish` resolves the real one.
OFFLINE_ENTITY = "offline"
SPEC_NAME = "wandb_views.json"
PUBLISH_NEEDS_LOGIN = "--publish needs a W&B login (WANDB_API_KEY)"

COMMON_VIEWS = ("hidden_breakthrough_fraction",)  # every task's runs have it
# The tuning study's search space (docs/comparison.md) and the objective it maximised.
CLUSTER_SETTINGS = (
    "cluster.min_cluster_size",
    "cluster.min_samples",
    "cluster.selection_method",
    "cluster.normalize",
    "cluster.grouping",
)
# The task whose views a sweep gets when its jobs do not say (the default study's).
DEFAULT_TASK = "arithmetic"
STEP = "trainer/step"  # tracking.STEP, the step axis of the training-time series
LEARNING_CURVES = ("eval/loss", "eval/accuracy")
TRAJECTORY_CHARTS = ("charts/trajectories_v0", "charts/trajectories_v1")
TABLES = ("tables/comparison", "tables/seeds", "tables/paired")
PAIRED_TABLE = "tables/paired"
# `wandb.plot.line_series` logs its data as the table `<key>_table` and draws it with this
# Vega spec and these fields (wandb/plot/line_series.py); the panel must name the same.
LINE_SERIES_SPEC = "wandb/lineseries/v0"
LINE_SERIES_FIELDS = {"step": "step", "lineKey": "lineKey", "lineVal": "lineVal"}
# W&B shows 10 runs (or groups) per panel by default: too few for 6 methods x 2 data
# regimes plus the paper-protocol rows of a comparison sweep.
MAX_RUNS = 100

SECTION_HEADLINE = "Headline metrics"
SECTION_TUNING = "Tuning"
SECTION_TRAJECTORIES = "Cluster trajectories"
SECTION_TABLES = "Tables"

REPORT_H1 = "The method comparison"
REPORT_INTRO = (
    "Does clustering POLCA trajectories find the task's skills better than clustering the loss, "
    "its change, Fisher information or LCA? Every method is tuned alike (the same search space, "
    "sampler and budget, objective {objective}) on tuning seeds and measured on held-out seeds, "
    "in each training-data regime ({regime}). Bars are the mean over seeds of each method and "
    "data regime, with one standard deviation."
)
H2_RESULTS = "Held-out results"
H2_PAIRED = "POLCA against each baseline, paired by seed"
H2_TUNING = "Tuning"
H2_TRAJECTORIES = "Cluster trajectories"


# --------------------------------------------------------------------------- panels
# Every call builds new panel objects: a workspace and a report must not share one (each
# panel carries its own id).


def headline_metrics(task: TaskMetrics) -> tuple[str, ...]:
    """The headline bar charts: the task's own metrics, then the hidden breakthroughs."""
    return (*task.views, *COMMON_VIEWS)


def headline_panels(task: TaskMetrics) -> list[wr.BarPlot]:
    """One bar chart per headline metric: its mean over seeds per condition, with error
    bars of one standard deviation. The conditions are the runs table's groups (method x
    carry rate): the panels leave `groupby` unset so they use that grouping."""
    return [
        wr.BarPlot(
            title=f"{metric} (mean ± sd over seeds)",
            metrics=[metric],
            groupby_aggfunc="mean",
            groupby_rangefunc="stddev",
            title_x=metric,
        )
        for metric in headline_metrics(task)
    ]


def group_by(task: TaskMetrics) -> tuple[str, ...]:
    """A condition of the comparison: the method and the task's training-data regime."""
    return ("method.name", *task.regime)


def tuning_panel(task: TaskMetrics) -> wr.ParallelCoordinatesPlot:
    """The cluster settings of each run against the tuning objective (a summary metric)."""
    columns = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(key)) for key in CLUSTER_SETTINGS]
    columns.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(task.objective)))
    return wr.ParallelCoordinatesPlot(title=f"cluster settings against {task.objective}", columns=columns)


def trajectory_chart(key: str) -> wr.CustomChart:
    """The custom chart a run logged with `wandb.plot.line_series` under `key`."""
    return wr.CustomChart(
        # the query wandb.plot itself writes (wandb/plot/custom_chart.py): the run's id,
        # name and colour, and the chart's table
        query={
            "id": None,
            "name": None,
            "_defaultColorIndex": None,
            "summaryTable": {"tableKey": f"{key}_table"},
        },
        chart_name=LINE_SERIES_SPEC,
        chart_fields=dict(LINE_SERIES_FIELDS),
        chart_strings={"title": f"{key}: cluster mean trajectories", "xname": "step"},
    )


def trajectory_panels() -> list[wr.CustomChart | wr.LinePlot]:
    """The trajectory charts, then the learning curves (mean and sd over a condition's seeds)."""
    curves = [
        wr.LinePlot(
            title=f"{key} over training",
            x=STEP,
            y=[key],
            groupby_aggfunc="mean",
            groupby_rangefunc="stddev",
        )
        for key in LEARNING_CURVES
    ]
    return [*(trajectory_chart(key) for key in TRAJECTORY_CHARTS), *curves]


def table_panel(table: str) -> wr.WeavePanelSummaryTable:
    return wr.WeavePanelSummaryTable(table_name=table, layout=wr.Layout(w=24, h=12))


def describe(panel: Any) -> str:
    """`<type> <title>` of a panel, for the spec's panel list and the CLI's output."""
    title = getattr(panel, "title", None) or getattr(panel, "table_name", None)
    if title is None and isinstance(panel, wr.CustomChart):
        title = panel.query["summaryTable"]["tableKey"].removesuffix("_table")
    return f"{type(panel).__name__} {title}"


# --------------------------------------------------------------------------- views


def group_filter(groups: list[str]) -> ws.And:
    """Runs of these W&B groups (the run attribute `group`, set by `wandb.init(group=...)`)."""
    group = ws.Metric("Group")
    return ws.And(group == groups[0] if len(groups) == 1 else group.isin(list(groups)))


def build_workspace(entity: str, project: str, group: str, task: TaskMetrics) -> ws.Workspace:
    sections = [
        ws.Section(name=SECTION_HEADLINE, panels=headline_panels(task), is_open=True),
        ws.Section(name=SECTION_TUNING, panels=[tuning_panel(task)], is_open=True),
        ws.Section(name=SECTION_TRAJECTORIES, panels=trajectory_panels(), is_open=True),
        ws.Section(name=SECTION_TABLES, panels=[table_panel(t) for t in TABLES], is_open=True),
    ]
    return ws.Workspace(
        entity=entity,
        project=project,
        name=f"polca-study: {group}",
        sections=sections,
        settings=ws.WorkspaceSettings(max_runs=MAX_RUNS),
        runset_settings=ws.RunsetSettings(
            filters=group_filter([group]), groupby=[ws.Config(key) for key in group_by(task)]
        ),
    )


def runset(project: str, groups: list[str], task: TaskMetrics, grouped: bool = True) -> wr.Runset:
    """A report's run set: the runs of `groups`, grouped by condition if `grouped`. Its
    entity stays empty here: with an entity and a project the library looks the project up
    on W&B when serialising, so `publish` fills it in."""
    return wr.Runset(
        project=project,
        name=", ".join(groups),
        filters=group_filter(groups),
        groupby=[f"config.{key}" for key in group_by(task)] if grouped else [],
    )


def build_report(
    entity: str,
    project: str,
    group: str,
    sweep_dir: Path,
    task: TaskMetrics,
    study_groups: list[str] | None = None,
) -> wr.Report:
    """The report, in the order of docs/comparison.md: what was compared, the held-out
    results, POLCA against each baseline, the tuning (in the tuning study's group), and
    the cluster trajectories."""
    tuning_groups = list(study_groups) if study_groups else [group]

    def grid(panels: list, groups: list[str] | None = None, grouped: bool = True) -> wr.PanelGrid:
        return wr.PanelGrid(runsets=[runset(project, groups or [group], task, grouped)], panels=panels)

    blocks = [
        wr.H1(text=REPORT_H1),
        wr.P(text=REPORT_INTRO.format(objective=task.objective, regime=", ".join(task.regime))),
        wr.H2(text=H2_RESULTS),
        grid(headline_panels(task)),
        wr.H2(text=H2_PAIRED),
        grid([table_panel(PAIRED_TABLE)]),
        wr.H2(text=H2_TUNING),
        # one line per trial: grouped, the plot would draw a condition's mean settings
        grid([tuning_panel(task)], tuning_groups, grouped=False),
        wr.H2(text=H2_TRAJECTORIES),
        grid(trajectory_panels()),
    ]
    return wr.Report(
        entity=entity,
        project=project,
        title=f"polca-study comparison: {group}",
        description=f"The runs of the W&B group {group} (sweep directory {Path(sweep_dir).as_posix()}).",
        blocks=blocks,
    )


def comparison_views(
    entity: str | None,
    project: str,
    group: str,
    sweep_dir: Path,
    study_groups: list[str] | None = None,
    task: str | None = None,
) -> tuple[ws.Workspace, wr.Report]:
    """The workspace and the report of one comparison group (see the module docstring).
    The report names `sweep_dir` (where `write_spec` puts both); `study_groups` are the
    tuning study's groups, whose trials the report's tuning plot shows (default: `group`).
    Without `entity` (or $WANDB_ENTITY) both name a placeholder entity: fine offline.
    `task` (default: the one the sweep's jobs ran) sets the objective and the regimes."""
    entity = entity or os.environ.get("WANDB_ENTITY") or OFFLINE_ENTITY
    metrics = TASKS[task or sweep_task(sweep_dir)].metrics
    skills = sweep_labels(sweep_dir)  # a label file's skills: each one's excess over its null
    if skills:
        metrics = replace(metrics, views=(*metrics.views, *(f"label_{n}_recovery_excess" for n in skills)))
    report = build_report(entity, project, group, sweep_dir, metrics, study_groups)
    return build_workspace(entity, project, group, metrics), report


def sweep_task(sweep_dir: Path) -> str:
    """The task of a sweep's jobs (the `dataset.name` of the first job Hydra recorded)."""
    for config in sorted(Path(sweep_dir).glob("*/.hydra/config.yaml")):
        name = OmegaConf.select(OmegaConf.load(config), "dataset.name", default=None)
        if name in TASKS:
            return name
    return DEFAULT_TASK


def sweep_labels(sweep_dir: Path) -> list[str]:
    """The labels of a label file (`dataset.labels`) the sweep's jobs were scored on."""
    names: set[str] = set()
    for summary in Path(sweep_dir).glob("*/summary.json"):
        names.update(json.loads(summary.read_text()).get("labels") or {})
    return sorted(names)


def panel_list(workspace: ws.Workspace) -> list[str]:
    return [f"{section.name}: {describe(p)}" for section in workspace.sections for p in section.panels]


def spec(obj: ws.Workspace | wr.Report) -> dict:
    """What `save()` sends to W&B (the library dumps the same model, by alias, without
    None), as plain JSON values."""
    return obj._to_model().model_dump(mode="json", by_alias=True, exclude_none=True)


def write_spec(sweep_dir: Path, workspace: ws.Workspace, report: wr.Report) -> Path:
    """`<sweep_dir>/wandb_views.json`, replaced atomically (a reader never sees half a file)."""
    sweep_dir = Path(sweep_dir)
    data = {"workspace": spec(workspace), "report": spec(report), "panels": panel_list(workspace)}
    target = sweep_dir / SPEC_NAME
    # in the same directory, so that os.replace is a rename on one file system; named by
    # process so that two writers never share one
    tmp = sweep_dir / f".{SPEC_NAME}.{os.getpid()}.tmp"
    try:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def publish(workspace: ws.Workspace, report: wr.Report) -> list[str]:
    """Save both to W&B (needs a login); returns their URLs."""
    if OFFLINE_ENTITY in (workspace.entity, report.entity):
        raise ValueError(f"cannot publish to the placeholder entity {OFFLINE_ENTITY!r}: give --entity")
    for block in report.blocks:
        for rs in getattr(block, "runsets", []):
            # a run set with an entity and a project is resolved to that project on save
            rs.entity = rs.entity or report.entity
            rs.project = rs.project or report.project
    workspace.save()
    report.save()
    return [workspace.url, report.url]


# --------------------------------------------------------------------------- CLI


def default_entity() -> str:
    """The logged-in user's default entity (asks W&B)."""
    import wandb

    return wandb.Api().default_entity


def main(argv: list[str] | None = None) -> None:
    """`polca-study-wandb <sweep dir> [--group G] [--project P] [--entity E]
    [--study-group G ...] [--publish]`."""
    parser = argparse.ArgumentParser(
        prog="polca-study-wandb",
        description="A W&B workspace and report for a comparison sweep, written to <sweep dir>/"
        f"{SPEC_NAME} and, with --publish, saved to W&B.",
    )
    parser.add_argument("sweep_dir", type=Path, help="the comparison's sweep directory")
    parser.add_argument("--group", help="the W&B group of its runs (default: the directory's name)")
    parser.add_argument("--project", default=DEFAULT_PROJECT, help=f"default: {DEFAULT_PROJECT}")
    parser.add_argument("--entity", help="default: $WANDB_ENTITY, else your default entity")
    parser.add_argument(
        "--study-group",
        dest="study_groups",
        action="append",
        metavar="G",
        help="the tuning study's group, for the report's tuning plot (repeatable)",
    )
    parser.add_argument("--publish", action="store_true", help="save both to W&B (needs a login)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        parser.error(f"{args.sweep_dir} is not a directory")
    # fail before any work, and before anything asks W&B for a login
    if args.publish and not os.environ.get("WANDB_API_KEY"):
        raise SystemExit(PUBLISH_NEEDS_LOGIN)
    entity = args.entity or os.environ.get("WANDB_ENTITY")
    if args.publish and not entity:
        entity = default_entity()
    group = args.group or args.sweep_dir.resolve().name
    workspace, report = comparison_views(entity, args.project, group, args.sweep_dir, args.study_groups)
    path = write_spec(args.sweep_dir, workspace, report)
    print(path)
    for line in panel_list(workspace):
        print(f"  {line}")
    if args.publish:
        for url in publish(workspace, report):
            print(url)


if __name__ == "__main__":
    sys.exit(main())
