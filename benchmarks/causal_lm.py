"""What POLCA costs per token on a Pythia-70m-sized model, to estimate a real study.

    .venv/bin/python benchmarks/causal_lm.py [--seq 64] [--batch 4] [--directions 4]

Builds GPT-NeoX with Pythia-70m's configuration from `transformers` (random weights,
nothing downloaded), takes `--batch` sequences of `--seq` tokens, and times, each
`--repeats` times (median): a forward pass of the per-token losses; a Hessian-vector
product of their sum (one gradient graph reused, as Lanczos does); and a decomposition
over two intervals (`polca.decompose_trajectory`, as the study runs it: `path` reuses
each checkpoint's terms for the next interval) along `--directions` directions for
each second-order mode, divided by the two intervals. Prints milliseconds per token
per direction for each, and the ratio to a forward pass, from which the README's
estimate for a Pythia study is made.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import transformers

from polca_study.polca import causal_lm_loss, decompose_trajectory, flatten_parameters, hessian_vector_product

PYTHIA_70M = dict(
    vocab_size=50304,
    hidden_size=512,
    num_hidden_layers=6,
    num_attention_heads=8,
    intermediate_size=2048,
    max_position_embeddings=2048,
    rotary_pct=0.25,
    use_parallel_residual=True,
    attn_implementation="eager",
)


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**PYTHIA_70M)).eval()
    ids = torch.randint(0, 50000, (args.batch, args.seq))
    loss = causal_lm_loss(model, ids)
    theta = flatten_parameters(model)
    d = theta.numel()
    checkpoints = [theta, theta + 1e-4 * torch.randn(d), theta + 2e-4 * torch.randn(d)]
    vectors = torch.linalg.qr(torch.randn(d, args.directions))[0]
    tokens = args.batch * (args.seq - 1)
    with torch.no_grad():
        forward = timed(lambda: loss(theta), args.repeats)
    print(
        f"Pythia-70m-sized GPT-NeoX ({d / 1e6:.1f}M parameters), {args.batch}x{args.seq} tokens, "
        f"{args.directions} directions, {args.threads} threads, median of {args.repeats}"
    )
    print(f"forward pass: {1000 * forward / tokens:.3f} ms per token")
    hvp = hessian_vector_product(lambda th: loss(th).sum(), theta)
    v = vectors[:, 0].contiguous()
    per = timed(lambda: hvp(v), args.repeats)
    print(
        f"Hessian-vector product (the basis's Lanczos step): {1000 * per / tokens:.3f} ms per token, "
        f"{per / forward:.1f} forward passes"
    )
    print("| decompose | route | ms per token per direction | forward passes per direction |")
    print("|---|---|---|---|")
    for mode in ("none", "path", "paper", "exact"):

        def run(mode=mode):
            decompose_trajectory(
                loss, checkpoints, vectors, second_order=mode, route="forward", progress=False
            )

        per = timed(run, args.repeats) / 2 / args.directions  # per interval and direction
        print(f"| {mode} | forward | {1000 * per / tokens:.3f} | {per / forward:.1f} |")


if __name__ == "__main__":
    main()
