"""The recorder: snapshots of someone else's training loop, in the store's format."""

import pytest
import torch

from polca_study.polca import flatten_parameters
from polca_study.snapshots.record import SnapshotRecorder
from polca_study.snapshots.store import SnapshotStore

transformers = pytest.importorskip("transformers")


def tiny_neox(seed=0):
    config = transformers.GPTNeoXConfig(
        vocab_size=23,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(seed)
    return transformers.GPTNeoXForCausalLM(config)


def test_recorder_in_a_plain_loop_stores_what_the_model_held(tmp_path):
    model = tiny_neox()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids = torch.randint(0, 23, (4, 8), generator=torch.Generator().manual_seed(0))
    held = {}
    info = {"class": "transformers.GPTNeoXForCausalLM", "config": model.config.to_dict()}
    with SnapshotRecorder(tmp_path / "run", every=3, model=info) as recorder:
        for step in range(10):
            if recorder.step(model, step):
                held[step] = flatten_parameters(model).clone()
            loss = model(input_ids=ids, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        recorder.step(model, 10, force=True)  # the end of training, off the grid
        held[10] = flatten_parameters(model).clone()
    store = SnapshotStore(tmp_path / "run")
    assert store.steps.tolist() == [0, 3, 6, 9, 10]
    assert store.names == [n for n, p in model.named_parameters() if p.requires_grad]
    assert store.model["config"]["hidden_size"] == 16
    for step, theta in held.items():
        assert torch.equal(store.flat(step), theta)
    assert not torch.equal(store.flat(0), store.flat(10))


def test_hugging_face_trainer_callback_records_optimizer_steps(tmp_path):
    pytest.importorskip("accelerate")
    from polca_study.snapshots.record import HFTrainerRecorder

    model = tiny_neox(seed=1)
    ids = torch.randint(0, 23, (16, 8), generator=torch.Generator().manual_seed(1))
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=6,
        per_device_train_batch_size=4,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, callbacks=[HFTrainerRecorder(tmp_path / "run", every=2)]
    )
    trainer.train()
    store = SnapshotStore(tmp_path / "run")
    assert store.steps.tolist() == [0, 2, 4, 6]
    assert torch.equal(store.flat(6), flatten_parameters(model).float())


def test_lightning_callback_records_global_steps(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from polca_study.snapshots.record import LightningRecorder

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.lm = tiny_neox(seed=2)

        def training_step(self, batch, _):
            return self.lm(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    ids = torch.randint(0, 23, (12, 8), generator=torch.Generator().manual_seed(2))
    module = Module()
    trainer = pl.Trainer(
        max_steps=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[LightningRecorder(tmp_path / "run", every=2)],
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(ids, batch_size=4))
    store = SnapshotStore(tmp_path / "run")
    assert store.steps.tolist() == [0, 2, 4]
    assert store.names[0].startswith("lm.")
    initial = torch.cat([p.detach().reshape(-1) for p in tiny_neox(seed=2).parameters()])
    assert torch.equal(store.flat(0), initial)  # recorded before the first step
    assert not torch.equal(store.flat(0), store.flat(4))
