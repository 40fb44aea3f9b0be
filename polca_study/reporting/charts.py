"""A study's native W&B charts, the interactive counterparts of `tasks/figures.py`'s PNGs:
cluster mean trajectories per column with the aggregate loss change, learning curves
grouped by the task's skills, the skill composition of the largest clusters, and the
clusters' breakthrough times. Logged under `charts/` (and their data under `tables/`)."""

from __future__ import annotations

import numpy as np
import pandas as pd

MAX_COLUMNS = 8  # trajectory charts per run (LCA has 50 columns)
MAX_CLUSTERS = 10  # series per chart, the largest clusters


def log_study_charts(tracker, skill, group, history, traj, curves, assign: np.ndarray, labels, table) -> None:
    """`skill(labels) -> Series`: the category of each evaluation token; `group(row)`:
    a learning-curve row's group (the task's)."""
    if not tracker.active:
        return
    trajectories(tracker, traj, curves, assign)
    learning_curves(tracker, history, group)
    if len(table):
        composition(tracker, skill(labels), assign, table)
        breakthroughs(tracker, table)


def trajectories(tracker, traj, curves, assign: np.ndarray) -> None:
    """Per column: the mean curve of each of its largest clusters, and the aggregate
    loss change since the first evaluation point (the curve the clusters hide in)."""
    mean_loss = traj.losses.mean(axis=0)
    aggregate = (traj.steps.tolist(), (mean_loss - mean_loss[0]).tolist())
    shown = 0
    for j in range(curves.curves.shape[2]):
        ids, sizes = np.unique(assign[:, j][assign[:, j] >= 0], return_counts=True)
        if not len(ids) or shown == MAX_COLUMNS:
            continue
        largest = ids[np.argsort(-sizes, kind="stable")][:MAX_CLUSTERS]
        xs, ys, names = [], [], []
        for c in largest:
            members = assign[:, j] == c
            xs.append(curves.steps.tolist())
            ys.append(curves.curves[members, :, j].mean(axis=0).tolist())
            names.append(f"cluster {c} (n={int(members.sum())})")
        xs.append(aggregate[0])
        ys.append(aggregate[1])
        names.append("aggregate loss change")
        tracker.line_series(
            f"trajectories_v{j}", xs, ys, names, f"{curves.columns[j]}: cluster mean trajectories"
        )
        shown += 1


def learning_curves(tracker, history: pd.DataFrame, group) -> None:
    """Accuracy and loss per group (`group(row)`) over training, one chart each."""
    groups = history.apply(group, axis=1)
    for value in ("accuracy", "loss"):
        xs, ys, names = [], [], []
        for name, rows in history.assign(group=groups).groupby("group", sort=True):
            rows = rows.sort_values("step")
            xs.append(rows["step"].tolist())
            ys.append(rows[value].tolist())
            names.append(name)
        tracker.line_series(f"learning_curves_{value}", xs, ys, names, f"evaluation {value} by group")


def composition(tracker, skills: pd.Series, assign: np.ndarray, table: pd.DataFrame) -> None:
    """The share of each skill in the largest clusters (a table), and a bar of each
    cluster's dominant skill share."""
    rows = []
    for r in table.sort_values("size", ascending=False).head(2 * MAX_CLUSTERS).itertuples():
        members = skills[assign[:, r.vector] == r.cluster]
        for category, share in members.value_counts(normalize=True).items():
            rows.append({"cluster": f"v{r.vector} c{r.cluster}", "skill": category, "share": float(share)})
    long = pd.DataFrame(rows)
    if long.empty:
        return
    tracker.table("composition", long)
    top = long.sort_values("share", ascending=False).drop_duplicates("cluster")
    top = top.assign(label=top["cluster"] + ": " + top["skill"])
    tracker.bar("composition", top, "label", "share", "largest clusters: share of their main skill")


def breakthroughs(tracker, table: pd.DataFrame) -> None:
    """Each cluster's breakthrough step against its size (hidden ones: later than the
    aggregate loss's own by the margin)."""
    if "breakthrough_step" not in table:
        return
    frame = table[["vector", "cluster", "size", "breakthrough_step", "hidden"]].dropna()
    tracker.scatter("breakthroughs", frame, "breakthrough_step", "size", "cluster breakthroughs")
