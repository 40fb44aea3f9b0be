"""Analysis: from decompositions to scored clusters, whatever the task.

`methods` turns a decomposition (or the loss) into the per-token trajectory each method
clusters, `cluster` runs HDBSCAN on it, `score` measures clusters against labels
(recovery, homogeneity, breakthroughs, the permutation null). Arrays in, arrays and
DataFrames out: no config groups, files or W&B.
"""
