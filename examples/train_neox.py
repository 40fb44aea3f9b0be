"""Your own training loop, recorded: a small GPT-NeoX (built from a config, nothing
downloaded) trained on the offline corpus in a plain PyTorch loop, with
`SnapshotRecorder` writing a snapshot every `--every` steps and the model also saved as
Hugging Face checkpoints (checkpoint-N/), as `Trainer` would.

    python examples/train_neox.py --out runs/neox           # about 2 minutes on 2 CPU cores
    polca-study experiment=cpu_text snapshots=recorded snapshots.path=runs/neox/recorded \
        snapshots.tokenizer=runs/neox/hf
    polca-study experiment=cpu_text snapshots=huggingface snapshots.path=runs/neox/hf \
        polca.interval=250

The tokenizer is a byte-level BPE trained on the corpus's training split and saved with
the checkpoints; the study then tokenizes its evaluation text with it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import transformers

from polca_study.snapshots.record import SnapshotRecorder
from polca_study.tasks.text import TextConfig
from polca_study.tasks.text_data import EOT, TextData


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/neox"))
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--every", type=int, default=50, help="record a snapshot every N steps")
    parser.add_argument("--save-every", type=int, default=250, help="save a checkpoint-N/ every N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    # a tokenizer trained on the corpus, saved the way a Hugging Face model ships its own
    base = TextData(TextConfig(data_dir=args.data_dir, vocab_size=1024, n_ctx=32, tagger="rules"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=base.tokenizer, eos_token=EOT)
    tokenizer.save_pretrained(args.out / "hf")
    data = TextData(
        TextConfig(data_dir=args.data_dir, n_ctx=32, tagger="rules", tokenizer=str(args.out / "hf"))
    )

    config = transformers.GPTNeoXConfig(
        vocab_size=data.d_vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
        attn_implementation="eager",
    )
    torch.manual_seed(args.seed)
    model = transformers.GPTNeoXForCausalLM(config)
    print(f"GPT-NeoX with {sum(p.numel() for p in model.parameters()):,} parameters")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    batches = data.train_batches(64, args.seed)
    start = time.perf_counter()
    with SnapshotRecorder(args.out / "recorded", every=args.every) as recorder:
        for step in range(args.steps + 1):
            recorder.step(model, step)  # before the update: the parameters at `step`
            if step % args.save_every == 0:
                model.save_pretrained(args.out / "hf" / f"checkpoint-{step}")
            if step == args.steps:
                break
            inputs, targets = next(batches)
            loss = torch.nn.functional.cross_entropy(model(input_ids=inputs).logits.transpose(1, 2), targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            if step % 100 == 0:
                print(f"step {step}: loss {loss.item():.3f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.0f} s; snapshots in {args.out}")


if __name__ == "__main__":
    main()
