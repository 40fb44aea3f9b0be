"""Figures like the paper's, written as PNG into the run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

PLACE_COLORS = {"1000s": "tab:purple", "100s": "tab:blue", "10s": "tab:orange", "1s": "tab:green"}


def _pyplot():
    """pyplot on the Agg backend, imported when a figure is drawn: a study without figures
    (figures=false, as every sweep) and the markdown helpers here do not pay its import."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def arithmetic_figures(
    out_dir: Path,
    history: pd.DataFrame,
    curves,
    assign: np.ndarray,
    labels: pd.DataFrame,
    table: pd.DataFrame,
) -> dict[str, Path]:
    """Learning curves by place, the top carry clusters' curves, their skill composition."""
    out_dir.mkdir(exist_ok=True)
    paths = {
        "learning_curves": learning_curves(history, table, out_dir / "learning_curves.png"),
    }
    if len(table):
        paths["top_clusters"] = top_clusters(curves, assign, labels, table, out_dir / "top_clusters.png")
        paths["skill_composition"] = skill_composition(
            assign, labels, table, out_dir / "skill_composition.png"
        )
    return paths


def learning_curves(history: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    """Per-place evaluation accuracy (carry solid, no-carry dashed) and the aggregate loss
    with cluster breakthrough times marked."""
    plt = _pyplot()
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for (place, carry), rows in history.groupby(["place", "carry"], observed=True):
        ax_acc.plot(
            rows.step,
            rows.accuracy,
            color=PLACE_COLORS.get(str(place)),
            ls="-" if carry else "--",
            label=f"{place} {'carry' if carry else 'no carry'}",
        )
    ax_acc.set(xlabel="step", ylabel="accuracy", title="evaluation accuracy by place")
    ax_acc.legend(fontsize=7)
    aggregate_loss(ax_loss, history, table, yscale="log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def aggregate_loss(ax, history: pd.DataFrame, table: pd.DataFrame, yscale: str = "linear") -> None:
    """The token-weighted evaluation loss with the clusters' breakthrough steps marked."""
    agg = history.groupby("step").apply(lambda r: np.average(r.loss, weights=r.tokens), include_groups=False)
    ax.plot(agg.index, agg.values, color="black", label="aggregate loss")
    for t in table.get("breakthrough_step", pd.Series(dtype=float)).dropna():
        ax.axvline(t, color="tab:red", alpha=0.15)
    ax.set(xlabel="step", ylabel="loss", yscale=yscale, title="aggregate loss, cluster breakthroughs (red)")


def plot_cluster_curves(
    curves, assign, rows: pd.DataFrame, path: Path, title, color=lambda r: "tab:blue"
) -> Path:
    """Median and quartiles of each row's cluster curves, one panel a cluster; `title`
    and `color` map a row to its panel's subtitle and colour."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(rows), figsize=(3.4 * len(rows), 3), squeeze=False)
    for ax, r in zip(axes[0], rows.itertuples(), strict=False):
        c = curves.curves[assign[:, r.vector] == r.cluster, :, r.vector]
        q1, med, q3 = np.percentile(c, [25, 50, 75], axis=0)
        ax.plot(curves.steps, med, color=color(r))
        ax.fill_between(curves.steps, q1, q3, color=color(r), alpha=0.3)
        ax.set_title(f"{curves.columns[r.vector]} c{r.cluster} n={r.size}\n{title(r)}", fontsize=7)
        ax.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _top_rows(table: pd.DataFrame, n: int = 6) -> pd.DataFrame:
    pool = table[table.eligible] if table.eligible.any() else table
    return pool.sort_values(["carry_homogeneity", "size"], ascending=False).head(n)


def top_clusters(curves, assign, labels, table, path: Path) -> Path:
    """Median and quartiles of the most carry-homogeneous clusters' curves (paper Fig. 1/4)."""
    return plot_cluster_curves(
        curves,
        assign,
        _top_rows(table),
        path,
        lambda r: f"carry {r.carry_homogeneity:.2f}, {r.place} {r.place_homogeneity:.2f}",
        lambda r: "tab:red" if r.carry_homogeneity >= 0.5 else "tab:gray",
    )


def skill_composition(assign, labels, table, path: Path) -> Path:
    """Skill composition bars for the top clusters (paper Figs. 4-10)."""
    rows = _top_rows(table, 12)
    plt = _pyplot()
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


# --------------------------------------------------------------------------- text


def text_figures(out_dir: Path, history, curves, assign, labels, table) -> dict[str, Path]:
    """Learning curves by the tag of the target's word, the best-labelled clusters' curves."""
    out_dir.mkdir(exist_ok=True)
    paths = {"learning_curves": text_learning_curves(history, table, out_dir / "learning_curves.png")}
    if len(table):
        rows = _labelled_rows(table)
        paths["top_clusters"] = plot_cluster_curves(
            curves,
            assign,
            rows,
            out_dir / "top_clusters.png",
            lambda r: f"purity {r.label_purity:.2f}: {r.label}",
        )
    return paths


def _labelled_rows(table: pd.DataFrame, n: int = 6) -> pd.DataFrame:
    return table.sort_values(["simply_labelled", "label_purity", "size"], ascending=False).head(n)


def text_learning_curves(history: pd.DataFrame, table: pd.DataFrame, path: Path) -> Path:
    """Evaluation loss by the tag of the target's word (by its label, with a label file),
    and the aggregate loss with cluster breakthrough times marked."""
    plt = _pyplot()
    fig, (ax_tag, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for tag, rows in history.groupby("tag"):
        ax_tag.plot(rows.step, rows.loss, label=str(tag))
    # text_data.evaluate groups by a label file's labels when there is one ("none": background)
    by = "label" if "none" in set(history["tag"]) else "word tag"
    ax_tag.set(xlabel="step", ylabel="loss", title=f"evaluation loss by {by}")
    ax_tag.legend(fontsize=6, ncol=2)
    aggregate_loss(ax_loss, history, table)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def contexts_table(table: pd.DataFrame, contexts: pd.DataFrame) -> pd.DataFrame:
    """Contexts nearest each cluster's medoid with the cluster's label (a W&B table)."""
    from polca_study.tasks.text_labels import show_context

    out = contexts.merge(table[["vector", "cluster", "label", "simply_labelled"]], on=["vector", "cluster"])
    out["shown"] = [show_context(c, t) for c, t in zip(out.context, out.token, strict=True)]
    return out[["vector", "cluster", "label", "simply_labelled", "rank", "token", "shown"]]


def skills_markdown(skills: dict[str, dict]) -> list[str]:
    """The label file's skills: each one's best cluster against its permutation null,
    and its breakthrough against the aggregate loss's."""
    if not skills:
        return []
    rows = [
        {
            "label": name,
            "tokens": s["tokens"],
            "recovery (F1)": f"{s['recovery']:.3f}",
            "null mean [95%]": f"{s['recovery_null_mean']:.3f} [{s['recovery_null95']:.3f}]",
            "p": f"{s['recovery_p']:.3f}",
            "top cluster": f"vector {s['top_vector']}, cluster {s['top_cluster']} ({s['top_size']} tokens)",
            "homogeneity": f"{s['homogeneity']:.3f}",
            "recall": f"{s['recall']:.3f}",
            "BT step (aggregate)": f"{s['breakthrough_step']} ({s['aggregate_breakthrough_step']})",
            "hidden": "yes" if s["hidden"] else "no",
        }
        for name, s in skills.items()
    ]
    return ["## Labelled skills (dataset.labels)", "", pd.DataFrame(rows).to_markdown(index=False), ""]


def text_clusters_markdown(metrics: dict, table: pd.DataFrame, contexts: pd.DataFrame) -> str:
    """clusters.md: every cluster's automatic label, top tokens, breakthrough and the
    contexts nearest its medoid (target token in ⟦brackets⟧), simply-labelled first."""
    from polca_study.tasks.text_labels import show_context

    lines = [
        f"# Clusters of {metrics['method']} on text",
        "",
        f"- simply-labelled fraction of basis vectors: {metrics['simply_labelled_fraction']:.3f}"
        + (
            f" (permutation null mean {metrics['simply_labelled_fraction_null_mean']:.3f}, "
            f"95th percentile {metrics['simply_labelled_fraction_null95']:.3f}, "
            f"p = {metrics['simply_labelled_fraction_p']:.3f})"
            if "simply_labelled_fraction_p" in metrics
            else ""
        ),
        f"- label purity (the purest cluster's least pure position, by its top tags; mean over "
        f"basis vectors): {metrics['label_purity']:.3f}"
        + (
            f" (null mean {metrics['label_purity_null_mean']:.3f}, p = {metrics['label_purity_p']:.3f})"
            if "label_purity_p" in metrics
            else ""
        ),
        f"- clusters: {metrics['clusters']}, simply labelled: {metrics['simply_labelled_clusters']}, "
        f"hidden breakthroughs: {metrics['hidden_breakthrough_fraction']:.2f}, "
        f"token coverage: {metrics['coverage']:.2f}",
        "- labels read w-3 | w-2 | w-1 | w0 (w0: the word of the target token); a/b means "
        "either tag, together covering the label share of the cluster's tokens",
        "",
        *skills_markdown(metrics.get("labels") or {}),
    ]
    order = table.sort_values(["simply_labelled", "label_purity"], ascending=False)
    for r in order.to_dict("records"):  # records: columns like purity_w-3 are not identifiers
        step = r.get("breakthrough_step", np.nan)
        when = (
            "" if pd.isna(step) else f", breakthrough at step {int(step)}{' (hidden)' if r['hidden'] else ''}"
        )
        purities = ", ".join(f"{r[f'purity_w{p}']:.2f}" for p in ("-3", "-2", "-1", "0"))
        lines += [
            f"## vector {r['vector']}, cluster {r['cluster']}: `{r['label']}`"
            + (" (simply labelled)" if r["simply_labelled"] else ""),
            "",
            f"{r['size']} tokens; label purity {r['label_purity']:.2f} (w-3..w0: {purities}); "
            f"word tag {r['tag']} for {r['tag_share']:.0%}{when}.",
            f"Top tokens: {r['top_tokens']}",
            "",
        ]
        shown = contexts[(contexts.vector == r["vector"]) & (contexts.cluster == r["cluster"])]
        lines += [f"{c.rank + 1}. `{show_context(c.context, c.token)}`" for c in shown.itertuples()]
        lines.append("")
    return "\n".join(lines)
