"""Automatic cluster labels for text, where no ground-truth skills exist (the paper's §text).

Every evaluation token carries the part-of-speech tags of its word and of the 3 words
before it (columns `TAG_COLUMNS`, in reading order). A cluster is labelled position by
position with the smallest set of tags that covers `coverage` (70%) of its tokens, and is
**simply labelled** when no position needs more than `simple_max` (2) tags. For a person
to refine a label, each cluster also gets its most frequent target tokens and the
contexts nearest its medoid.

`label_purity` grades the same rule: the share of a cluster's tokens that its top
`simple_max` tags cover at its least pure position, so a cluster is simply labelled
exactly when its purity reaches `coverage`. Purity is what a search can climb when no
cluster is simply labelled yet, and its permutation null says how much of it chance gives.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from polca_study.tasks.text_data import TAG_COLUMNS


def smallest_covering_set(tags, coverage: float = 0.7) -> list[str]:
    """The fewest tags whose tokens make up at least `coverage` of `tags` (most frequent
    first; ties broken by name, so the answer is deterministic). Taking tags by
    decreasing count is optimal: no smaller set can cover more."""
    counts = pd.Series(np.asarray(tags, dtype=object)).value_counts()
    counts = counts.sort_index().sort_values(ascending=False, kind="stable")
    need = coverage * counts.sum()
    covered = np.cumsum(counts.to_numpy())
    n = int(np.searchsorted(covered, need - 1e-9 * counts.sum()) + 1)
    return counts.index[:n].tolist()


def label_cluster(
    tags: np.ndarray, coverage: float = 0.7, simple_max: int = 2
) -> tuple[list[list[str]], bool]:
    """Covering tag sets for each position of tags (n, positions); simply labelled?"""
    sets = [smallest_covering_set(tags[:, i], coverage) for i in range(tags.shape[1])]
    return sets, all(len(s) <= simple_max for s in sets)


def position_purities(tags: np.ndarray, simple_max: int = 2) -> list[float]:
    """For each position of tags (n, positions), the share of tokens its top
    `simple_max` tags cover."""
    return [
        float(pd.Series(tags[:, i]).value_counts(normalize=True).iloc[:simple_max].sum())
        for i in range(tags.shape[1])
    ]


def label_purity(tags: np.ndarray, simple_max: int = 2) -> float:
    """The least pure position's `position_purities`."""
    return min(position_purities(tags, simple_max))


def format_label(sets: list[list[str]]) -> str:
    """'DET | OTHER/CAP | ADP | CAP': positions w-3 .. w0, alternatives joined by '/'."""
    return " | ".join("/".join(s) for s in sets)


def text_cluster_table(
    assign: np.ndarray, labels: pd.DataFrame, coverage: float = 0.7, simple_max: int = 2, top_tokens: int = 5
) -> pd.DataFrame:
    """One row per cluster: size, label, positions' tag counts, simply labelled, label
    purity overall and per position (purity_w-3 .. purity_w0), the share of its most
    common word tag, and its most frequent target tokens."""
    tags = labels[list(TAG_COLUMNS)].to_numpy(dtype=object)
    tokens = labels["token"].to_numpy(dtype=object)
    rows = []
    for j in range(assign.shape[1]):
        for c in np.unique(assign[:, j][assign[:, j] >= 0]):
            member = assign[:, j] == c
            sets, simple = label_cluster(tags[member], coverage, simple_max)
            purities = position_purities(tags[member], simple_max)
            common = pd.Series(tokens[member]).value_counts().head(top_tokens)
            w0 = pd.Series(tags[member, -1]).value_counts(normalize=True)
            rows.append(
                {
                    "vector": j,
                    "cluster": int(c),
                    "size": int(member.sum()),
                    "label": format_label(sets),
                    "label_sizes": "/".join(str(len(s)) for s in sets),
                    "simply_labelled": simple,
                    "label_purity": min(purities),
                    **{f"purity_{col[4:]}": p for col, p in zip(TAG_COLUMNS, purities, strict=True)},
                    "tag": w0.index[0],
                    "tag_share": float(w0.iloc[0]),
                    "top_tokens": ", ".join(f"{t!r}×{n}" for t, n in common.items()),
                }
            )
    columns = [
        "vector",
        "cluster",
        "size",
        "label",
        "label_sizes",
        "simply_labelled",
        "label_purity",
        *[f"purity_{col[4:]}" for col in TAG_COLUMNS],
        "tag",
        "tag_share",
        "top_tokens",
    ]
    return pd.DataFrame(rows, columns=columns)


def simply_labelled_fraction(table: pd.DataFrame, columns: int) -> float:
    """Share of the method's `columns` (basis vectors) with at least one simply-labelled
    cluster; columns that were dropped or found no cluster count as without."""
    if columns == 0 or not len(table):
        return 0.0
    return table.loc[table.simply_labelled, "vector"].nunique() / columns


def best_label_purity(table: pd.DataFrame, columns: int) -> float:
    """Mean over the method's `columns` of its purest cluster's `label_purity` (0 for a
    column without clusters)."""
    if columns == 0 or not len(table):
        return 0.0
    return float(table.groupby("vector")["label_purity"].max().sum() / columns)


def _label_counts(cluster: np.ndarray, tags: np.ndarray, n_tags: int) -> tuple[np.ndarray, np.ndarray]:
    """Tag counts per cluster and position, sorted descending, cumulated: (K, P, tags),
    and cluster sizes (K, 1, 1); cluster (n,) ids 0..K-1, tags (n, P) integer codes."""
    K, P = cluster.max() + 1, tags.shape[1]
    counts = np.zeros((K, P, n_tags))
    np.add.at(counts, (cluster[:, None], np.arange(P)[None, :], tags), 1.0)
    return -np.sort(-counts, axis=2).cumsum(axis=2), counts[:, :1, :].sum(axis=2, keepdims=True)


def _needed(ordered: np.ndarray, size: np.ndarray, coverage: float) -> np.ndarray:
    """Tags needed per position for every cluster (K, P), from `_label_counts`."""
    return (ordered < coverage * size - 1e-9 * size).sum(axis=2) + 1


def _labels_needed(cluster: np.ndarray, tags: np.ndarray, n_tags: int, coverage: float) -> np.ndarray:
    """Tags needed per position for every cluster (K, P): the vectorised form of
    `smallest_covering_set`'s count."""
    return _needed(*_label_counts(cluster, tags, n_tags), coverage)


def simply_labelled_null(
    assign: np.ndarray,
    labels: pd.DataFrame,
    draws: int,
    coverage: float = 0.7,
    simple_max: int = 2,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Permutation null of `simply_labelled_fraction` and `best_label_purity`: within each
    column, the clustered tokens' tags are shuffled among them (cluster sizes kept),
    `draws` times. Frequent tags and small clusters alone can make clusters look simple;
    the null says how much by chance. Values are per draw, over the columns of `assign`."""
    if draws == 0 or not (assign >= 0).any():
        return {}
    codes, uniques = pd.factorize(pd.Series(labels[list(TAG_COLUMNS)].to_numpy().reshape(-1)))
    tags = codes.reshape(len(labels), len(TAG_COLUMNS))
    rng = np.random.default_rng(seed)
    simple, purity = np.zeros(draws), np.zeros(draws)
    for j in range(assign.shape[1]):
        sel = np.flatnonzero(assign[:, j] >= 0)
        if not len(sel):
            continue
        _, cluster = np.unique(assign[sel, j], return_inverse=True)
        for d in range(draws):
            ordered, size = _label_counts(cluster, tags[rng.permutation(sel)], len(uniques))
            simple[d] += (_needed(ordered, size, coverage) <= simple_max).all(axis=1).any()
            top = ordered[:, :, min(simple_max, ordered.shape[2]) - 1] / size[:, :, 0]
            purity[d] += top.min(axis=1).max()
    return {"simply_labelled_fraction": simple / assign.shape[1], "label_purity": purity / assign.shape[1]}


def nearest_to_medoid(x: np.ndarray, k: int = 10, max_points: int = 2000, seed: int = 0) -> np.ndarray:
    """Indices of the `k` rows of x (a cluster's features, Euclidean) nearest its medoid,
    the medoid first. The medoid is the member with the least total distance to the
    others (over a random subset of `max_points` when the cluster is larger)."""
    n = len(x)
    rng = np.random.default_rng(seed)
    pool = np.arange(n) if n <= max_points else rng.choice(n, max_points, replace=False)
    sq = (x[pool] ** 2).sum(1)
    dist = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x[pool] @ x[pool].T, 0))
    medoid = pool[np.argmin(dist.sum(1))]
    to_medoid = np.linalg.norm(x - x[medoid], axis=1)
    return np.argsort(to_medoid, kind="stable")[:k]


def cluster_contexts(
    assign: np.ndarray, features_of, labels: pd.DataFrame, table: pd.DataFrame, k: int = 10
) -> pd.DataFrame:
    """The k contexts nearest each cluster's medoid: one row per (cluster, rank) with
    the context text and the target token. `features_of(j)` gives column j's features
    (n, F), the space HDBSCAN clustered in."""
    rows = []
    for j in table.vector.unique():
        x = features_of(int(j))
        for c in table.loc[table.vector == j, "cluster"]:
            member = np.flatnonzero(assign[:, j] == c)
            for rank, i in enumerate(member[nearest_to_medoid(x[member], k)]):
                rows.append(
                    {
                        "vector": int(j),
                        "cluster": int(c),
                        "rank": rank,
                        "token_index": int(i),
                        "context": labels.at[i, "context"],
                        "token": labels.at[i, "token"],
                    }
                )
    return pd.DataFrame(rows, columns=["vector", "cluster", "rank", "token_index", "context", "token"])


def show_context(context: str, token: str) -> str:
    """One line: the context with the target token marked ⟦like this⟧, newlines as ⏎."""
    return (f"…{context}⟦{token}⟧").replace("\n", "⏎").replace("`", "'")
