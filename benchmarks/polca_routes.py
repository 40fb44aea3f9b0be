"""Cost of POLCA on the default arithmetic model and evaluation set, side by side.

    .venv/bin/python benchmarks/polca_routes.py [--threads 2] [--repeats 3]
    .venv/bin/python benchmarks/polca_routes.py --model paper --eval-size 250 --only routes

Prints, measured in one run: seconds per evaluation interval for m = 1, 10, 50 in each
route and second-order mode, as ratios to a plain forward pass over the same tokens;
the naive baseline (a Python loop of autograd.grad per token, dotted with the basis);
three bases of 20 vectors (the comparison's Hessian, random and shuffled) decomposed one
after another against in one pass (`decompose_trajectories`, `polca.alongside`); in
that pass, embeddings' projections dense over the ids used against gathered, and each
linear layer's projections as one product over all bases' columns against one per basis;
Hessian-vector products and time of `build_basis` (Lanczos) against power iteration
with deflation (PyHessian's method) at residual <= 1e-3; peak memory of each case.
Medians over repeats; the machine is shared, so read ratios, not seconds.
"""

from __future__ import annotations

import argparse
import glob
import statistics
import time

import torch

from polca_study.core import per_sample
from polca_study.polca import (
    ModuleLoss,
    build_basis,
    decompose_trajectories,
    decompose_trajectory,
    flatten_parameters,
    hessian_vector_product,
)
from polca_study.snapshots.model import ModelConfig, Transformer
from polca_study.snapshots.store import SnapshotStore
from polca_study.tasks.arithmetic_data import ArithmeticData, token_loss


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM, the peak resident set


def peak_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, repeats: int) -> tuple[float, float]:
    times = []
    reset_peak()
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_mb()


def checkpoints(d: int, synthetic: bool) -> list[torch.Tensor]:
    """Snapshots 20-23 of the default study's trained model from its cached store; for
    the paper model (cost does not depend on the values) its initialisation and three
    random small steps from it."""
    if synthetic:
        g = torch.Generator().manual_seed(0)
        theta = torch.randn(d, generator=g) * 0.02
        return [theta + 1e-3 * i * torch.randn(d, generator=g) for i in range(4)]
    for path in sorted(glob.glob(".cache/polca_study/train/*/snapshots")):
        store = SnapshotStore(path)
        if store.numel == d and len(store) > 40:
            return [store.flat(int(store.steps[i])) for i in (20, 21, 22, 23)]
    raise SystemExit("run the default study first (make run) so its trained model is cached")


def power_iteration(hvp, d: int, k: int, residual: float, seed: int = 0, cap: int = 100):
    """PyHessian's top-k eigenpairs: power iteration, deflating found vectors each step.
    Returns (products, converged): at most `cap` products per eigenpair."""
    g = torch.Generator().manual_seed(seed)
    found, count, converged = [], 0, True
    for _ in range(k):
        v = torch.randn(d, generator=g)
        for _ in range(cap):
            for u in found:
                v = v - (u @ v) * u
            v = v / v.norm()
            w = hvp(v)
            count += 1
            lam = v @ w
            if (w - lam * v).norm() / lam.abs() <= residual:
                break
            v = w
        else:
            converged = False
        found.append(v)
    return count, converged


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--naive-tokens", type=int, default=200, help="0 skips the naive loop")
    parser.add_argument("--only", choices=["routes", "sets", "projections", "basis"], default=None)
    parser.add_argument("--model", choices=["small", "paper"], default="small")
    parser.add_argument("--eval-size", type=int, default=1250, help="evaluation examples (4 tokens each)")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 10, 50], help="basis sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    data = ArithmeticData(eval_size=args.eval_size, hessian_size=args.eval_size, carry_rate=0.08)
    sizes = {"small": {}, "paper": {"n_layers": 3, "d_model": 512, "n_heads": 4, "d_mlp": 2048}}
    model = Transformer(ModelConfig(n_ctx=11, d_vocab=12, **sizes[args.model])).eval()
    d = flatten_parameters(model).numel()
    thetas = checkpoints(d, synthetic=args.model == "paper")
    loss = ModuleLoss(model, data.eval_split().batch(), token_loss)
    n = loss(thetas[0]).numel()
    with torch.no_grad():
        forward, _ = timed(lambda: loss(thetas[0]), 5)
    print(
        f"model: {d:,} parameters; {n:,} evaluation tokens; forward pass {forward * 1e3:.0f} ms "
        f"({args.threads} threads)\n"
    )

    if args.only in (None, "routes"):
        routes(args, loss, thetas, d, n, forward)
    if args.only in (None, "sets"):
        sets(args, loss, thetas, d)
    if args.only in (None, "projections"):
        projections(args, loss, thetas, d)
    if args.only in (None, "basis"):
        basis_cost(model, data, thetas, d)


def routes(args, loss, thetas, d: int, n: int, forward: float) -> None:
    print(
        "seconds per interval (4 checkpoints, 3 intervals, the first point's terms included)"
        " and ratio to a forward pass"
    )
    print(f"{'m':>3} {'mode':>6} {'route':>8} {'s/interval':>11} {'x forward':>10} {'peak MB':>8}")
    steps = len(thetas) - 1
    for m in args.m:
        vectors, _ = torch.linalg.qr(torch.randn(d, m))
        cases = [
            ("none", "forward"),
            ("none", "reverse"),
            ("path", "reverse"),
            ("paper", "reverse"),
            ("exact", "forward"),
        ]
        for mode, route in cases:

            def run(mode=mode, route=route, vectors=vectors):
                decompose_trajectory(loss, thetas, vectors, mode, route=route, progress=False)

            seconds, peak = timed(run, 1 if m >= 50 else args.repeats)
            per = seconds / steps
            print(f"{m:>3} {mode:>6} {route:>8} {per:>11.2f} {per / forward:>10.1f} {peak:>8.0f}")
        print(f"    route=auto chooses {loss.choose_route(m)!r} at m={m}")

    if not args.naive_tokens:  # 0: skip (on the paper model each token costs a whole pass)
        return
    # naive: one autograd.grad per token, dotted with the basis (extrapolated from a subset)
    vectors, _ = torch.linalg.qr(torch.randn(d, 10))
    theta = thetas[0].clone().requires_grad_(True)

    def naive():
        for i in range(args.naive_tokens):
            (g,) = torch.autograd.grad(loss(theta)[i], theta)
            g @ vectors

    seconds, _ = timed(naive, 1)
    naive_interval = seconds * n / args.naive_tokens
    fast, _ = timed(lambda: loss.directional(thetas[0], vectors, route="reverse"), args.repeats)
    print(
        f"\nnaive per-token loop, m=10: {naive_interval:.0f} s per interval (from "
        f"{args.naive_tokens} tokens), {naive_interval / fast:.0f}x the reverse route"
    )


def sets(args, loss, thetas, d: int, m: int = 20, count: int = 3) -> None:
    """The comparison's bases in path mode: one decomposition each, or one pass for all."""
    bases = [torch.linalg.qr(torch.randn(d, m))[0] for _ in range(count)]
    steps = len(thetas) - 1

    def apart():
        for vectors in bases:
            decompose_trajectory(loss, thetas, vectors, "path", route="reverse", progress=False)

    def together():
        decompose_trajectories(loss, thetas, bases, "path", route="reverse", progress=False)

    (apart_s, apart_mb), (together_s, together_mb) = timed(apart, args.repeats), timed(together, args.repeats)
    print(
        f"\n{count} bases of m={m}, path mode: one after another {apart_s / steps:.2f} s/interval "
        f"({apart_mb:.0f} MB peak), in one pass {together_s / steps:.2f} s/interval "
        f"({together_mb:.0f} MB); apart/together {apart_s / together_s:.2f}x"
    )


def projections(args, loss, thetas, d: int, m: int = 20, count: int = 3) -> None:
    """Where the one pass's time goes, two ways to cut it: an embedding's gradients dense
    over the ids used against its basis rows gathered per position (the rule before), in
    the whole pass; and each linear layer's projections as one matrix product over every
    basis's columns against one product per basis, on the layers' shapes, with whether
    the joined product gives each column the same bits (the cache needs them)."""
    bases = [torch.linalg.qr(torch.randn(d, m))[0] for _ in range(count)]
    steps = len(thetas) - 1

    def together(dense_ids: int):
        def run():
            per_sample.DENSE_IDS_PER_POSITION = dense_ids
            decompose_trajectories(loss, thetas, bases, "path", route="reverse", progress=False)

        return run

    (gathered, gathered_mb), (dense, dense_mb) = (
        timed(together(0), args.repeats),
        timed(together(2), args.repeats),
    )
    per_sample.DENSE_IDS_PER_POSITION = 2
    print(
        f"\n{count} bases of m={m} in one pass, embeddings gathered {gathered / steps:.2f} s/interval "
        f"({gathered_mb:.0f} MB), dense over the ids used {dense / steps:.2f} s/interval "
        f"({dense_mb:.0f} MB); gathered/dense {gathered / dense:.2f}x"
    )
    S = min(loss.chunk_sequences, loss.positions()[0])
    layers = [mod for mod in loss.module.modules() if isinstance(mod, torch.nn.Linear)]
    apart_s = joined_s = 0.0
    same = True
    for mod in layers:
        grads = torch.randn(S, mod.weight.numel())
        slices = [torch.randn(mod.weight.numel(), m) for _ in range(count)]
        apart = timed(lambda g=grads, b=slices: [g @ x for x in b], max(args.repeats, 5))[0]
        joined = timed(lambda g=grads, b=slices: g @ torch.cat(b, dim=1), max(args.repeats, 5))[0]
        apart_s, joined_s = apart_s + apart, joined_s + joined
        parts = (grads @ torch.cat(slices, dim=1)).split(m, dim=1)
        same = same and all(torch.equal(grads @ x, y) for x, y in zip(slices, parts, strict=True))
    print(
        f"linear projections of one position ({len(layers)} layers, {S} sequences): one product per "
        f"basis {apart_s * 1e3:.1f} ms, one over all {count * m} columns {joined_s * 1e3:.1f} ms; "
        f"per basis/joined {apart_s / joined_s:.2f}x; same bits per column: {same}"
    )


def basis_cost(model, data, thetas, d: int) -> None:
    """Lanczos vs power iteration with deflation at residual <= 1e-3."""
    hessian = ModuleLoss(model, data.hessian_split().batch(), token_loss)
    total = lambda th: hessian(th).sum()  # noqa: E731
    print("\nbasis at one checkpoint, residual <= 1e-3: Hessian-vector products and seconds")
    for k in (1, 5):
        start = time.perf_counter()
        basis = build_basis(total, [thetas[-1]], k, tol=1e-3)
        lanczos_s = time.perf_counter() - start
        hvp = hessian_vector_product(total, thetas[-1])
        start = time.perf_counter()
        power, converged = power_iteration(hvp, d, k, residual=1e-3)
        power_s = time.perf_counter() - start
        note = "" if converged else " (some pairs hit the 100-product cap: a lower bound)"
        print(
            f"k={k}: Lanczos {basis.hvps} HVPs {lanczos_s:.1f} s (max residual "
            f"{basis.residuals.max():.1e}); power iteration {power} HVPs {power_s:.1f} s{note}; "
            f"Lanczos/power {basis.hvps / power:.2f}"
        )


if __name__ == "__main__":
    main()
