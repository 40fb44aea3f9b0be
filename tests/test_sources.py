"""Snapshots from elsewhere: a store recorded in a plain loop, Hugging Face checkpoint
directories, and our own training read back as a recorded run."""

import json
import shutil

import pandas as pd
import pytest
import torch

from polca_study.snapshots.record import SnapshotRecorder
from polca_study.snapshots.store import SnapshotStore
from polca_study.study.config import ConfigError, validate
from polca_study.study.sources import (
    HuggingFaceSource,
    RecordedSource,
    check_matches,
    revision_step,
    store_fingerprint,
)
from tests.conftest import compose_config, require_corpus
from tests.test_study import polca

transformers = pytest.importorskip("transformers")


def test_revision_names_give_steps_and_bad_settings_name_the_field(tmp_path):
    assert [revision_step(r) for r in ("step1000", "checkpoint-500", "main-step3")] == [1000, 500, 3]
    with pytest.raises(ValueError, match="snapshots.steps"):
        revision_step("main")
    for name in ("checkpoint-20", "checkpoint-100", "checkpoint-3"):
        (tmp_path / name).mkdir()
    cfg = validate(compose_config(["snapshots=huggingface", f"snapshots.path={tmp_path}"]))
    assert HuggingFaceSource(cfg).revisions() == [
        ("checkpoint-3", 3),
        ("checkpoint-20", 20),
        ("checkpoint-100", 100),
    ]
    cfg = validate(
        compose_config(["snapshots=huggingface", f"snapshots.path={tmp_path}", "snapshots.steps=[1,2]"])
    )
    with pytest.raises(ValueError, match="snapshots.steps has 2 entries for 3 revisions"):
        HuggingFaceSource(cfg).revisions()
    with pytest.raises(
        ConfigError, match=r"snapshots.kind must be one of \['train', 'recorded', 'huggingface'\]"
    ):
        validate(compose_config(["snapshots.kind=wandb"]))


def test_each_source_has_its_own_config_node(tmp_path):
    """A setting of another source is not silently carried along: Hydra refuses it."""
    from hydra.errors import ConfigCompositionException

    assert set(compose_config().snapshots) == {"kind", "tokenizer", "allow_duplicates"}
    for overrides in (
        ["snapshots.path=runs/mine"],  # our own training reads no path
        ["snapshots=recorded", "snapshots.path=runs/mine", "snapshots.revisions=[step0]"],
        ["snapshots=huggingface", "snapshots.path=x", "snapshots.factory=pkg.mod:fn"],
    ):
        with pytest.raises(ConfigCompositionException, match=overrides[-1].split("=")[0]):
            compose_config(overrides)
    with pytest.raises(ConfigError, match="needs the snapshots group's schema: use snapshots=recorded"):
        validate(compose_config(["snapshots.kind=recorded"]))


def test_a_store_of_another_architecture_is_refused_with_its_first_difference(tmp_path):
    small = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    with SnapshotRecorder(tmp_path, every=1) as recorder:
        recorder.step(small, 0)
    other = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 5))
    with pytest.raises(ValueError, match="first differ at index 2"):
        check_matches(SnapshotStore(tmp_path), other)
    cfg = validate(compose_config(["snapshots=recorded", f"snapshots.path={tmp_path}"]))
    with pytest.raises(ValueError, match="snapshots.factory"):  # neither ours nor transformers
        RecordedSource(cfg).prepare(None, None, torch.device("cpu"), False)


def test_a_recorded_stores_key_covers_its_model_class_and_config(tmp_path):
    """Editing the model config in manifest.json (an activation, a norm epsilon) makes
    another model: no stage computed with the old one is reused."""
    model = transformers.GPTNeoXForCausalLM(
        transformers.GPTNeoXConfig(
            vocab_size=11, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16
        )
    )
    with SnapshotRecorder(tmp_path, every=1) as recorder:
        recorder.step(model, 0)
    before = store_fingerprint(SnapshotStore(tmp_path))
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["model"]["config"]["layer_norm_eps"] = 1e-3
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert store_fingerprint(SnapshotStore(tmp_path)) != before
    manifest["model"]["config"]["hidden_act"] = "relu"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert len({before, store_fingerprint(SnapshotStore(tmp_path))}) == 2


@pytest.mark.slow
def test_our_training_read_back_as_a_recorded_run_gives_the_same_study(tmp_path, tiny_overrides, env):
    """The recorded source is an independent route to the same snapshots: the study's
    decomposition and clusters must be those of the run that trained them."""
    polca(tiny_overrides + ["logger=disabled", f"hydra.run.dir={tmp_path}/trained"], env)
    (entry,) = [p for p in (tmp_path / "cache" / "train").iterdir() if not p.name.startswith(".")]
    shutil.copytree(entry / "snapshots", tmp_path / "mine")  # as if recorded in another loop
    again = tiny_overrides + ["logger=disabled", "snapshots=recorded", f"snapshots.path={tmp_path}/mine"]
    polca(again + [f"hydra.run.dir={tmp_path}/recorded"], env)
    trained = json.loads((tmp_path / "trained" / "summary.json").read_text())
    recorded = json.loads((tmp_path / "recorded" / "summary.json").read_text())
    assert recorded["cache_hits"]["curves"] is False  # the learning curves, from the snapshots
    assert "train" not in recorded["cache_hits"]
    for key in ("carry_recovery", "clusters", "coverage", "aggregate_breakthrough_step", "final_accuracy"):
        assert recorded[key] == pytest.approx(trained[key]), key
    a = pd.read_csv(tmp_path / "trained" / "clusters.csv")
    b = pd.read_csv(tmp_path / "recorded" / "clusters.csv")
    pd.testing.assert_frame_equal(a, b)


@pytest.fixture
def neox_run(tmp_path_factory):
    """A tiny GPT-NeoX (built from a config: no download) trained 40 steps in a plain
    loop on the offline corpus with its own tokenizer; recorded every 10 steps, and
    saved as Hugging Face checkpoints (checkpoint-N/) every 20."""
    require_corpus()
    from polca_study.tasks.text import TextConfig
    from polca_study.tasks.text_data import EOT, TextData
    from tests.conftest import DATA_DIR

    root = tmp_path_factory.mktemp("neox")
    tiny = dict(
        data_dir=str(DATA_DIR), max_chars=300000, n_ctx=16, eval_tokens=160, eval_positions=4, tagger="rules"
    )
    base = TextData(TextConfig(**tiny, vocab_size=300))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=base.tokenizer, eos_token=EOT)
    tokenizer.save_pretrained(root / "hf")
    data = TextData(TextConfig(**tiny, tokenizer=str(root / "hf")))
    config = transformers.GPTNeoXConfig(
        vocab_size=data.d_vocab,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = data.train_batches(16, 0)
    with SnapshotRecorder(root / "recorded", every=10) as recorder:
        for step in range(41):
            recorder.step(model, step)
            if step % 20 == 0:
                model.save_pretrained(root / "hf" / f"checkpoint-{step}")
            if step == 40:
                break
            inputs, targets = next(batches)
            loss = torch.nn.functional.cross_entropy(model(input_ids=inputs).logits.transpose(1, 2), targets)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return root


def text_overrides(tmp_path):
    return [
        "experiment=tiny_text",
        "logger=offline",
        f"cache_dir={tmp_path / 'cache'}",
        "progress=false",
        "figures=false",
        "num_threads=1",
        "save_trajectories=false",
    ]


@pytest.mark.slow
def test_a_recorded_neox_run_and_its_hf_checkpoints_run_end_to_end(neox_run, tmp_path, env):
    recorded = text_overrides(tmp_path) + [
        "snapshots=recorded",
        f"snapshots.path={neox_run / 'recorded'}",
        f"snapshots.tokenizer={neox_run / 'hf'}",
        "basis.interval=20",
        "polca.interval=10",
        "polca=exact",  # checked against double backward before any work
        f"hydra.run.dir={tmp_path}/recorded",
    ]
    polca(recorded, env)
    summary = json.loads((tmp_path / "recorded" / "summary.json").read_text())
    assert summary["vectors"] == 2  # basis at steps 0 and 20 (40 is the last snapshot)
    (curves,) = [p for p in (tmp_path / "cache" / "curves").iterdir() if not p.name.startswith(".")]
    history = pd.read_parquet(curves / "history.parquet")  # evaluated at every recorded snapshot
    assert sorted(history.step.unique()) == [0, 10, 20, 30, 40]
    assert history.groupby("step").loss.mean().iloc[-1] < history.groupby("step").loss.mean().iloc[0]
    assert (tmp_path / "recorded" / "clusters.md").exists()

    hf = text_overrides(tmp_path) + [
        "snapshots=huggingface",
        f"snapshots.path={neox_run / 'hf'}",
        "basis.interval=20",
        "polca.interval=20",
        f"hydra.run.dir={tmp_path}/hf",
    ]
    polca(hf, env)
    summary = json.loads((tmp_path / "hf" / "summary.json").read_text())
    assert summary["vectors"] == 2 and summary["final_accuracy"] > 0
    (store_dir,) = [p for p in (tmp_path / "cache" / "snapshots").iterdir() if not p.name.startswith(".")]
    store = SnapshotStore(store_dir / "snapshots")
    assert store.steps.tolist() == [0, 20, 40]
    recorded_store = SnapshotStore(neox_run / "recorded")
    for step in (0, 20, 40):  # the checkpoints hold what the recorder saw at the same steps
        assert torch.equal(store.flat(step), recorded_store.flat(step))
