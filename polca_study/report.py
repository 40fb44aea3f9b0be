"""Figures like the paper's, written as PNG into the run directory."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PLACE_COLORS = {"1000s": "tab:purple", "100s": "tab:blue", "10s": "tab:orange", "1s": "tab:green"}


def figures(run_dir: Path, history: pd.DataFrame, curves, assign: np.ndarray,
            labels: pd.DataFrame, table: pd.DataFrame) -> dict[str, Path]:
    out_dir = Path(run_dir) / "figures"
    out_dir.mkdir(exist_ok=True)
    paths = {
        "learning_curves": learning_curves(history, table, out_dir / "learning_curves.png"),
    }
    if len(table):
        paths["top_clusters"] = top_clusters(curves, assign, labels, table,
                                             out_dir / "top_clusters.png")
        paths["skill_composition"] = skill_composition(assign, labels, table,
                                                       out_dir / "skill_composition.png")
    return paths


def learning_curves(history: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    """Per-place evaluation accuracy (carry solid, no-carry dashed) and the aggregate loss
    with cluster breakthrough times marked."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for (place, carry), rows in history.groupby(["place", "carry"], observed=True):
        ax_acc.plot(rows.step, rows.accuracy, color=PLACE_COLORS.get(str(place)),
                    ls="-" if carry else "--", label=f"{place} {'carry' if carry else 'no carry'}")
    ax_acc.set(xlabel="step", ylabel="accuracy", title="evaluation accuracy by place")
    ax_acc.legend(fontsize=7)
    agg = history.groupby("step").apply(lambda r: np.average(r.loss, weights=r.tokens),
                                        include_groups=False)
    ax_loss.plot(agg.index, agg.values, color="black", label="aggregate loss")
    if "breakthrough_step" in table and len(table):
        for t in table.breakthrough_step.dropna():
            ax_loss.axvline(t, color="tab:red", alpha=0.15)
    ax_loss.set(xlabel="step", ylabel="loss", yscale="log",
                title="aggregate loss, cluster breakthroughs (red)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _top_rows(table: pd.DataFrame, n: int = 6) -> pd.DataFrame:
    pool = table[table.eligible] if table.eligible.any() else table
    return pool.sort_values(["carry_homogeneity", "size"], ascending=False).head(n)


def top_clusters(curves, assign, labels, table, path: Path) -> Path:
    """Median and quartiles of the most carry-homogeneous clusters' curves (paper Fig. 1/4)."""
    rows = _top_rows(table)
    fig, axes = plt.subplots(1, len(rows), figsize=(3.2 * len(rows), 3), squeeze=False)
    for ax, r in zip(axes[0], rows.itertuples(), strict=False):
        member = assign[:, r.vector] == r.cluster
        c = curves.curves[member, :, r.vector]
        q1, med, q3 = np.percentile(c, [25, 50, 75], axis=0)
        color = "tab:red" if r.carry_homogeneity >= 0.5 else "tab:gray"
        ax.plot(curves.steps, med, color=color)
        ax.fill_between(curves.steps, q1, q3, color=color, alpha=0.3)
        ax.set_title(f"{curves.columns[r.vector]} c{r.cluster}: n={r.size}\n"
                     f"carry {r.carry_homogeneity:.2f}, {r.place} {r.place_homogeneity:.2f}",
                     fontsize=8)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def skill_composition(assign, labels, table, path: Path) -> Path:
    """Skill composition bars for the top clusters (paper Figs. 4-10)."""
    rows = _top_rows(table, 12)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    names = [f"v{r.vector}c{r.cluster}" for r in rows.itertuples()]
    for ax, skill in zip(axes, ("carry", "place", "value"), strict=True):
        shares = []
        for r in rows.itertuples():
            member = assign[:, r.vector] == r.cluster
            shares.append(labels.loc[member, skill].astype(str).value_counts(normalize=True))
        frame = pd.DataFrame(shares, index=names).fillna(0.0)
        frame.plot.bar(stacked=True, ax=ax, legend=True, width=0.8)
        ax.set(title=f"composition by {skill}", ylim=(0, 1))
        ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
