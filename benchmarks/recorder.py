"""The recorder's overhead on a training loop, side by side in one run.

    .venv/bin/python benchmarks/recorder.py [--steps 200] [--repeats 3]

Trains the GPT-NeoX of `examples/train_neox.py` (built from a config, random tokens)
for `--steps` steps with no recorder and with `SnapshotRecorder` at every=1, 10 and 50,
interleaving the settings `--repeats` times so the machine's noise hits them alike.
Prints per setting the median seconds per step, the ratio to no recorder, and the
store's size; the recorder's cost is a file write of the parameters per snapshot.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
import transformers

from polca_study.snapshots.record import SnapshotRecorder


def model(vocab: int) -> torch.nn.Module:
    config = transformers.GPTNeoXConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(config)


def run(steps: int, every: int | None, where: Path) -> tuple[float, int]:
    net = model(1024)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    recorder = SnapshotRecorder(where, every=every) if every else None
    start = time.perf_counter()
    for step in range(steps):
        if recorder:
            recorder.step(net, step)
        ids = torch.randint(0, 1024, (32, 33), generator=g)
        loss = torch.nn.functional.cross_entropy(
            net(input_ids=ids[:, :-1]).logits.transpose(1, 2), ids[:, 1:]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = (time.perf_counter() - start) / steps
    size = sum(p.stat().st_size for p in where.glob("*")) if where.exists() else 0
    return seconds, size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = [None, 50, 10, 1]
    times: dict = {s: [] for s in settings}
    sizes: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for s in settings:
                seconds, size = run(args.steps, s, Path(tmp) / f"r{r}-{s}")
                times[s].append(seconds)
                sizes[s] = size
    base = statistics.median(times[None])
    params = sum(p.numel() for p in model(1024).parameters())
    print(f"GPT-NeoX, {params:,} parameters, batch 32x32 tokens, {args.steps} steps, {args.repeats} repeats")
    print("| recorder | ms per step (median) | ratio | store MB |")
    print("|---|---|---|---|")
    for s in settings:
        med = statistics.median(times[s])
        label = "none" if s is None else f"every={s}"
        print(f"| {label} | {1000 * med:.1f} | {med / base:.3f} | {sizes[s] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
