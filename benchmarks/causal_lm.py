"""What POLCA costs per token on 70M-parameter causal LMs, to estimate a real study.

    .venv/bin/python benchmarks/causal_lm.py [--arch all] [--seq 64] [--batch 4] [--directions 4]

Builds, from `transformers` configs (random weights, nothing downloaded), GPT-NeoX with
Pythia-70m's configuration, a GPT-2 of the same width and depth (Conv1D layers, tied
embeddings) and a Llama of the same width and depth with grouped-query attention
(RMSNorm, SwiGLU, 2 key-value heads for 8 query heads). For each it takes `--batch`
sequences of `--seq` tokens and times, `--repeats` times (median):
- a forward pass of the per-token losses;
- a Hessian-vector product of their sum (one gradient graph reused, as Lanczos does);
- a decomposition over two intervals along `--directions` directions for each
  second-order mode (`polca.decompose_trajectory` as the study runs it, with the
  first-order route `route=auto` chooses, logged with its reason), per interval and
  direction.
Costs are printed in forward passes of the same tokens, from which the README's
estimate for a Pythia study is made.
"""

from __future__ import annotations

import argparse
import logging
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


GPT2_70M = dict(
    vocab_size=50257, n_embd=512, n_layer=6, n_head=8, n_positions=2048, attn_implementation="eager"
)
LLAMA_70M = dict(
    vocab_size=50304,
    hidden_size=512,
    intermediate_size=1408,
    num_hidden_layers=6,
    num_attention_heads=8,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    attn_implementation="eager",
)
ARCHS = {
    "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**PYTHIA_70M)),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(**GPT2_70M)),
    "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA_70M)),
}


def timed(fn, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return statistics.median(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=[*ARCHS, "all"], default="all")
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--directions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = []
    for arch in ARCHS if args.arch == "all" else [args.arch]:
        rows.append(measure(arch, args))
    print(
        f"\n{args.batch}x{args.seq} tokens, {args.directions} directions, {args.threads} threads, "
        f"median of {args.repeats}; costs in forward passes of the same tokens"
    )
    print("| model | parameters | route (auto) | forward ms/token | HVP | none | path | paper | exact |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        modes = " | ".join(f"{r[m]:.1f}" for m in ("none", "path", "paper", "exact"))
        print(
            f"| {r['arch']} | {r['d'] / 1e6:.1f}M | {r['route']} | {r['forward_ms']:.3f} | "
            f"{r['hvp']:.1f} | {modes} |"
        )


def measure(arch: str, args) -> dict:
    torch.manual_seed(0)
    model = ARCHS[arch]().eval()
    ids = torch.randint(0, 50000, (args.batch, args.seq))
    loss = causal_lm_loss(model, ids)
    theta = flatten_parameters(model)
    d = theta.numel()
    checkpoints = [theta, theta + 1e-4 * torch.randn(d), theta + 2e-4 * torch.randn(d)]
    vectors = torch.linalg.qr(torch.randn(d, args.directions))[0]
    tokens = args.batch * (args.seq - 1)
    with torch.no_grad():
        forward = timed(lambda: loss(theta), args.repeats)
    hvp = hessian_vector_product(lambda th: loss(th).sum(), theta)
    v = vectors[:, 0].contiguous()
    row = {
        "arch": arch,
        "d": d,
        "route": loss.choose_route(args.directions),
        "forward_ms": 1000 * forward / tokens,
        "hvp": timed(lambda: hvp(v), args.repeats) / forward,
    }
    for mode in ("none", "path", "paper", "exact"):

        def run(mode=mode):
            decompose_trajectory(loss, checkpoints, vectors, second_order=mode, route="auto", progress=False)

        row[mode] = timed(run, args.repeats) / 2 / args.directions / forward  # per interval, direction
        print(f"{arch} {mode}: {row[mode]:.1f} forward passes per direction and interval", flush=True)
    return row


if __name__ == "__main__":
    main()
