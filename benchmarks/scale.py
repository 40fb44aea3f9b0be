"""Peak memory and time of each stage as a run's snapshots grow, on the paper's model.

    .venv/bin/python benchmarks/scale.py [--eval-size 250] [--counts 21 101 401]

Runs the arithmetic study on the paper's model (9.5M parameters) with training cut
short, once per snapshot count: 21 (100 steps, a snapshot every 5), 101 (100 steps,
every step), 401 (400 steps, every step), and 3 (100 steps, every 50) as the floor.
The basis (k=1 at step 0) and the decomposition (two intervals) read the same number of
snapshots in every case, so what grows with the count is only what training writes:
a stage whose memory grew with it would hold the snapshots. Each case is its own
process (peak resident memory is per process), with a fresh cache, one after another.
Prints one table: per case, each stage's seconds and the process's peak memory after
it, the store's size on disk, and the peak against the 3-snapshot case.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASES = {3: (100, 50), 21: (100, 5), 101: (100, 1), 401: (400, 1)}  # snapshots: (steps, every)


def run_case(count: int, eval_size: int, tmp: Path, threads: int) -> dict:
    steps, every = CASES[count]
    run_dir = tmp / f"run{count}"
    args = [
        "experiment=paper_arithmetic",
        f"train.steps={steps}",
        f"train.checkpoint_every={every}",
        f"basis.interval={steps}",
        f"polca.interval={steps // 2}",
        f"dataset.eval_size={eval_size}",
        f"dataset.hessian_size={eval_size}",
        "basis.maxiter=200",
        f"cache_dir={tmp / f'cache{count}'}",
        f"num_threads={threads}",
        "logger=disabled",
        "progress=false",
        "figures=false",
        "save_trajectories=false",
        "score.permutations=10",
        "score.arithmetic.probe=false",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run([sys.executable, "-m", "polca_study", *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"case {count} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    store = next((tmp / f"cache{count}" / "train").glob("[!.]*")) / "snapshots"
    summary["store_gb"] = sum(f.stat().st_size for f in store.iterdir()) / 1e9
    summary["snapshots"] = len(list(store.glob("step-*.safetensors")))
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--eval-size", type=int, default=250, help="evaluation and Hessian examples")
    parser.add_argument("--counts", type=int, nargs="+", default=[3, 21, 101, 401], choices=sorted(CASES))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for count in args.counts:
            results[count] = run_case(count, args.eval_size, Path(tmp), args.threads)
            r = results[count]
            print(f"{count} snapshots done: peak {r['peak_memory_mb']:.0f} MB", file=sys.stderr)
    stages = ["train", "basis", "decompose", "cluster+score"]
    floor = results[min(results)]["peak_memory_mb"]
    head = f"{'snapshots':>9} {'store GB':>8} " + " ".join(f"{s + ' s':>15} {'MB':>6}" for s in stages)
    print(head + f" {'peak MB':>8} {'vs ' + str(min(results)):>7}")
    nan = float("nan")
    for r in results.values():
        cells = " ".join(
            f"{r['seconds'].get(s, nan):>15.1f} {r['peak_memory_mb_after'].get(s, nan):>6.0f}" for s in stages
        )
        print(
            f"{r['snapshots']:>9} {r['store_gb']:>8.2f} {cells} {r['peak_memory_mb']:>8.0f} "
            f"{r['peak_memory_mb'] - floor:>+7.0f}"
        )
    print(
        f"\n(each case one process, {args.threads} threads, {args.eval_size} evaluation examples; "
        "MB: the process's peak resident memory after the stage)"
    )


if __name__ == "__main__":
    main()
