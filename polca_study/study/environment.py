"""The computing environment a job runs in, pinned and recorded.

Numbers depend on it in their last bits: 1 or 2 BLAS threads change HDBSCAN's pairwise
distances, and a joblib worker sets its own BLAS thread count unless the job does. So
every job sets torch's, BLAS's and OpenMP's thread counts explicitly, and every cache
entry and summary records them with the versions of the libraries that compute.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata

import torch
from threadpoolctl import threadpool_limits

LIBRARIES = ("torch", "numpy", "scipy", "scikit-learn", "hdbscan", "optuna", "polca-study")


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def pinned_threads(num_threads: int | None) -> Iterator[int]:
    """Run with `num_threads` threads in torch, BLAS and OpenMP (None: the cores this
    process may use), whatever the launcher set; yields the count."""
    threads = int(num_threads or available_cores())
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with threadpool_limits(limits=threads):
            yield threads
    finally:
        torch.set_num_threads(before)


def describe(threads: int, device: torch.device) -> dict:
    """Library versions, thread count and device: what a cached result was computed with."""
    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "threads": threads, "device": str(device)}
