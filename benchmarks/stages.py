"""Wall time and peak memory of each stage of the default study, cold and warm.

    .venv/bin/python benchmarks/stages.py [--warm 5] [overrides ...]

Runs the default study once computing every stage (a cold trial; `force=[all]`), then
`--warm` clustering-only trials (different cluster.min_cluster_size, with the settings
of the named studies in `sweeps/`) that find training, basis and decomposition cached. Prints each stage's
seconds and the process's peak memory after it, the median warm and cold trial times
and their ratio. Runs in-process, like trials under Hydra's basic launcher.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from hydra import compose, initialize_config_dir

from polca_study.study.config import CONF_DIR, register
from polca_study.study.pipeline import run


def main() -> None:
    register()
    parser = argparse.ArgumentParser()
    parser.add_argument("--warm", type=int, default=5)
    parser.add_argument("--cache-dir", default=None, help="default: a temporary directory")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(CONF_DIR, version_base="1.3"):
        cache = args.cache_dir or f"{tmp}/cache"
        base = [f"cache_dir={cache}", "force=[all]", "progress=false", *args.overrides]

        def trial(extra: list[str], name: str) -> tuple[float, dict]:
            cfg = compose("config", overrides=base + extra)
            start = time.perf_counter()
            metrics = run(cfg, f"{tmp}/{name}")
            return time.perf_counter() - start, metrics

        cold_s, cold = trial(["logger=disabled"], "cold")
        base.remove("force=[all]")
        print(f"{'stage':<15}{'seconds':>9}{'peak MB':>9}")
        for stage, seconds in cold["seconds"].items():
            peak = cold["peak_memory_mb_after"].get(stage, float("nan"))
            print(f"{stage:<15}{seconds:>9.1f}{peak:>9.0f}")
        warm = []
        for i in range(args.warm):
            # as a sweep's trial: an offline W&B run, no figures or trajectory file
            seconds, m = trial(
                [
                    f"cluster.min_cluster_size={40 + 10 * i}",
                    "figures=false",
                    "save_trajectories=false",
                    "score.permutations=20",
                    "score.arithmetic.probe=false",
                    "logger=offline",
                ],
                f"warm{i}",
            )
            assert all(m["cache_hits"].values()), m["cache_hits"]
            warm.append(seconds)
        median = statistics.median(warm)
        print(
            f"\ncold trial {cold_s:.1f} s (1 run); warm clustering-only trial median "
            f"{median:.2f} s over {len(warm)} (min {min(warm):.2f}, max {max(warm):.2f}); "
            f"cold/warm {cold_s / median:.0f}x"
        )
        print(
            f"default study: carry_recovery {cold['carry_recovery']:.3f}, peak memory "
            f"{cold['peak_memory_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()
