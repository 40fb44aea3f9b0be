"""The basis's peak memory and time per Hessian-vector product, whole sample against
chunks (`basis.chunk_size`), on the paper's model and the CPU preset's.

    .venv/bin/python benchmarks/basis_memory.py [--products 3] [--chunks 0 250 125]
        [--routes double-backward forward-over-reverse]

For each model (paper: 3 layers, d 512, 9.5M parameters; small: the CPU preset's) and
chunk size (0: the whole 1,250-example Hessian sample in one graph, as by default),
one process builds the Hessian-vector product at a random parameter vector and applies
it `--products` times; it reports the process's peak resident memory and the median
time per product. Processes run one after another. Prints one table with the time and
memory against the unchunked case of the same model (by double backward, the basis's
route, when it is measured). `forward-over-reverse` forms each chunk's product as
`torch.func.jvp` of `torch.func.grad`, keeping no graph between products.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time


def measure(model: str, chunk: int, route: str, products: int, threads: int) -> dict:
    import torch
    from torch.func import grad, jvp

    from polca_study.polca import ModuleLoss, flatten_parameters, hessian_vector_product
    from polca_study.snapshots.model import ModelConfig, Transformer
    from polca_study.tasks.arithmetic_data import ArithmeticData, token_loss

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sizes = {"small": {}, "paper": {"n_layers": 3, "d_model": 512, "n_heads": 4, "d_mlp": 2048}}
    net = Transformer(ModelConfig(n_ctx=11, d_vocab=12, **sizes[model])).eval()
    data = ArithmeticData(eval_size=1250, hessian_size=1250, carry_rate=0.08)
    batch = data.hessian_split().batch()
    n = len(batch["inputs"])
    size = chunk or n
    losses = [
        ModuleLoss(net, {k: v[i : i + size] for k, v in batch.items()}, token_loss) for i in range(0, n, size)
    ]
    theta = flatten_parameters(net)
    sums = [lambda t, f=f: f(t).sum() for f in losses]
    if route == "double-backward":
        hvp = hessian_vector_product(sums, theta)
    else:

        def hvp(v):
            return sum(jvp(grad(f), (theta,), (v,))[1] for f in sums)

    v = torch.randn(theta.numel())
    times = []
    for _ in range(products):
        start = time.perf_counter()
        hvp(v)
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = statistics.median(times)
    return {"model": model, "chunk": chunk, "route": route, "seconds": seconds, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--products", type=int, default=3)
    parser.add_argument("--chunks", type=int, nargs="+", default=[0, 250, 125])
    parser.add_argument("--models", nargs="+", default=["small", "paper"])
    parser.add_argument("--threads", type=int, default=2)
    routes = ["double-backward", "forward-over-reverse"]
    parser.add_argument("--routes", nargs="+", default=routes[:1], choices=routes)
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # model chunk route: this process
    args = parser.parse_args()
    if args.one:
        model, chunk, route = args.one
        print(json.dumps(measure(model, int(chunk), route, args.products, args.threads)))
        return
    rows = []
    for model, route, chunk in itertools.product(args.models, args.routes, args.chunks):
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                model,
                str(chunk),
                route,
                "--products",
                str(args.products),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], flush=True)
    print(f"\n1,250-example Hessian sample, median of {args.products} products, {args.threads} threads")
    print("| model | route | chunk | s per product | x unchunked | peak memory (MB) | x unchunked |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        whole = [b for b in rows if b["model"] == r["model"] and b["chunk"] == 0]
        base = next((b for b in whole if b["route"] == "double-backward"), None) or whole[0]
        time_ratio, memory_ratio = r["seconds"] / base["seconds"], r["peak_mb"] / base["peak_mb"]
        print(
            f"| {r['model']} | {r['route']} | {r['chunk'] or 'whole'} | {r['seconds']:.2f} | "
            f"{time_ratio:.2f} | {r['peak_mb']:.0f} | {memory_ratio:.2f} |"
        )


if __name__ == "__main__":
    main()
