"""Other people's models as they come, end to end: a GPT-2 with its default dropout
trained by the Hugging Face Trainer (gradient accumulation), a Llama with grouped-query
attention trained by Lightning and resumed from a checkpoint, a Llama in a plain loop;
each recorded and then studied. Built from configs: no download."""

import json

import pandas as pd
import pytest
import torch

from polca_study.polca import flatten_parameters
from polca_study.snapshots.record import SnapshotRecorder
from polca_study.snapshots.store import MANIFEST, SnapshotStore
from tests.conftest import DATA_DIR, require_corpus
from tests.test_sources import text_overrides
from tests.test_study import polca

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
STEPS, EVERY = 20, 5


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    """The tiny text study's data, tokenized by a tokenizer saved as a user's would be."""
    require_corpus()
    from polca_study.tasks.text import TextConfig
    from polca_study.tasks.text_data import EOT, TextData

    root = tmp_path_factory.mktemp("text")
    tiny = dict(
        data_dir=str(DATA_DIR), max_chars=300000, n_ctx=16, eval_tokens=160, eval_positions=4, tagger="rules"
    )
    base = TextData(TextConfig(**tiny, vocab_size=300))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=base.tokenizer, eos_token=EOT)
    tokenizer.save_pretrained(root / "tokenizer")
    data = TextData(TextConfig(**tiny, tokenizer=str(root / "tokenizer")))
    batches = data.train_batches(8, 0)
    rows = torch.cat([next(batches)[0] for _ in range(2 * STEPS * 2)])
    return root, data.d_vocab, rows


def study(tmp_path, env, store, tokenizer, name, *extra):
    """The tiny text study of a recorded run, in its own cache; its summary and clusters."""
    overrides = text_overrides(tmp_path / name) + [
        "logger=disabled",
        "snapshots=recorded",
        f"snapshots.path={store}",
        f"snapshots.tokenizer={tokenizer}",
        "basis.interval=10",
        "polca.interval=5",
        "cluster.min_cluster_size=4",  # 160 tokens, 20 training steps: small clusters
        "cluster.min_samples=2",
        "basis.drop_rising=false",  # 20 steps: a projected loss may still rise
        f"hydra.run.dir={tmp_path / name / 'run'}",
        *extra,
    ]
    polca(overrides, env)
    run = tmp_path / name / "run"
    return json.loads((run / "summary.json").read_text()), pd.read_csv(run / "clusters.csv")


def gpt2(vocab: int, dropout: float):
    config = transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=16,
        resid_pdrop=dropout,
        embd_pdrop=dropout,
        attn_pdrop=dropout,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def llama(vocab: int, kv_heads: int):
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=kv_heads,
        max_position_embeddings=16,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config)


def test_gpt2_with_dropout_from_the_trainer_studies_as_without_dropout(text, tmp_path, env):
    """The Trainer's steps are optimizer steps (2 micro-batches each); the analysis runs
    in eval mode, so the snapshots give the same study whatever dropout the config says."""
    pytest.importorskip("accelerate")
    from polca_study.snapshots.record import HFTrainerRecorder

    root, vocab, rows = text
    model = gpt2(vocab, dropout=0.1)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=STEPS,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    data = [{"input_ids": r, "labels": r} for r in rows]
    recorder = HFTrainerRecorder(tmp_path / "gpt2", every=EVERY)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
    trainer.train()
    assert model.training  # the Trainer leaves it in training mode, dropout on
    store = SnapshotStore(tmp_path / "gpt2")
    assert store.steps.tolist() == list(range(0, STEPS + 1, EVERY))  # optimizer steps
    assert torch.equal(store.flat(STEPS), flatten_parameters(model).float())
    assert store.model["config"]["resid_pdrop"] == 0.1

    # the same snapshots, the model's config saying no dropout
    (tmp_path / "nodrop").mkdir()
    for f in (tmp_path / "gpt2").iterdir():
        (tmp_path / "nodrop" / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((tmp_path / "nodrop" / MANIFEST).read_text())
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        manifest["model"]["config"][key] = 0.0
    (tmp_path / "nodrop" / MANIFEST).write_text(json.dumps(manifest))

    tokenizer = root / "tokenizer"
    dropout, clusters = study(tmp_path, env, tmp_path / "gpt2", tokenizer, "dropout", "polca=exact")
    none, clusters_none = study(tmp_path, env, tmp_path / "nodrop", tokenizer, "none", "polca=exact")
    assert dropout["vectors"] == 2 and dropout["clusters"] >= 1
    for key in (
        "clusters",
        "label_purity",
        "label_purity_p",
        "coverage",
        "basis_residual_max",
        "final_accuracy",
    ):
        assert dropout[key] == none[key], key
    pd.testing.assert_frame_equal(clusters, clusters_none)


def test_llama_with_grouped_query_attention_from_resumed_lightning(text, tmp_path, env):
    """A Lightning run stopped at step 10 and resumed from its checkpoint to 20: every
    snapshot once, the one at 10 being the checkpoint's parameters."""
    pl = pytest.importorskip("lightning.pytorch")
    from polca_study.snapshots.record import LightningRecorder

    root, vocab, rows = text

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lm = llama(vocab, kv_heads=1)

        def training_step(self, batch, _):
            return self.lm(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=3e-3)

    def trainer(steps):
        return pl.Trainer(
            max_steps=steps,
            accumulate_grad_batches=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            accelerator="cpu",
            callbacks=[
                LightningRecorder(tmp_path / "llama", every=EVERY, model={"config": {"vocab": vocab}})
            ],
            default_root_dir=tmp_path,
        )

    loader = torch.utils.data.DataLoader(rows, batch_size=8)
    first = trainer(STEPS // 2)
    first.fit(Module(), loader)
    first.save_checkpoint(tmp_path / "half.ckpt")
    halfway = flatten_parameters(first.lightning_module).float()
    resumed = Module()
    trainer(STEPS).fit(resumed, loader, ckpt_path=tmp_path / "half.ckpt")
    store = SnapshotStore(tmp_path / "llama")
    assert store.steps.tolist() == list(range(0, STEPS + 1, EVERY))
    assert torch.equal(store.flat(STEPS // 2), halfway)
    assert torch.equal(store.flat(STEPS), flatten_parameters(resumed).float())
    assert store.names[0].startswith("lm.")

    summary, _ = study(
        tmp_path,
        env,
        tmp_path / "llama",
        root / "tokenizer",
        "llama_gqa",
        "snapshots.factory=tests.test_other_models:LlamaLM",  # called with vocab=...
    )
    assert summary["vectors"] == 2 and summary["final_accuracy"] > 0


class LlamaLM(torch.nn.Module):
    """What the Lightning module trains, as the study calls it: inputs -> logits, its
    parameters under the LightningModule's names (lm.*)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.lm = llama(vocab, kv_heads=1)

    def forward(self, inputs):
        return self.lm(input_ids=inputs, use_cache=False).logits


def test_llama_from_a_plain_loop(text, tmp_path, env):
    root, vocab, rows = text
    model = llama(vocab, kv_heads=2)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with SnapshotRecorder(tmp_path / "llama", every=EVERY) as recorder:
        for step in range(STEPS + 1):
            recorder.step(model, step)
            if step == STEPS:
                break
            batch = rows[step * 8 : (step + 1) * 8]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    summary, _ = study(tmp_path, env, tmp_path / "llama", root / "tokenizer", "llama")
    assert summary["vectors"] == 2 and summary["clusters"] >= 1 and summary["final_accuracy"] > 0
