"""A checkpoint suite as a hub publishes it, read offline from a Hugging Face cache the
test builds itself: `refs/<revision>` holds a commit id, `snapshots/<commit>/` the
config, weights and tokenizer; no `main` ref, HF_HUB_OFFLINE=1."""

import json
import os
import signal
import subprocess

import pytest
import torch

from polca_study.snapshots.store import SnapshotStore
from tests.conftest import POLCA, ROOT, require_corpus

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow
REVISIONS = ("step0", "step10", "step20", "step30")


def publish(hub, revision: str, model, tokenizer) -> str:
    """One revision in the cache's layout; returns its commit id."""
    commit = f"{abs(hash(revision)):040x}"[:40]
    folder = hub / "snapshots" / commit
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (hub / "refs").mkdir(parents=True, exist_ok=True)
    (hub / "refs" / revision).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """org/tiny-neox at four revisions (weights of different seeds), and its tokenizer."""
    require_corpus()
    from polca_study.tasks.text import TextConfig
    from polca_study.tasks.text_data import EOT, TextData
    from tests.conftest import DATA_DIR

    home = tmp_path_factory.mktemp("hf_home")
    hub = home / "hub" / "models--org--tiny-neox"
    base = TextData(TextConfig(data_dir=str(DATA_DIR), max_chars=200000, vocab_size=300, tagger="rules"))
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=base.tokenizer, eos_token=EOT)
    config = transformers.GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
    )
    models = {}
    for i, revision in enumerate(REVISIONS):
        torch.manual_seed(i)
        models[revision] = transformers.GPTNeoXForCausalLM(config)
        publish(hub, revision, models[revision], tokenizer)
    return {"home": home, "hub": hub, "models": models, "tokenizer": tokenizer}


def study(suite, tmp_path, revisions=REVISIONS, popen=False):
    env = {**os.environ, "HF_HOME": str(suite["home"]), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    args = [
        *POLCA,
        "experiment=tiny_text",
        "logger=disabled",
        "progress=false",
        "figures=false",
        "num_threads=1",
        "snapshots=huggingface",
        "snapshots.path=org/tiny-neox",
        f"snapshots.revisions=[{','.join(revisions)}]",
        "basis.interval=10",
        "polca.interval=10",
        f"cache_dir={tmp_path / 'cache'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    if popen:
        return subprocess.Popen(
            args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def test_a_suite_is_read_offline_at_its_revisions_and_an_interrupted_import_resumes(suite, tmp_path):
    assert not (suite["hub"] / "refs" / "main").exists()  # the tokenizer is read at a listed revision
    first = study(suite, tmp_path, popen=True)
    for line in first.stdout:  # killed once the first revision is imported
        if "imported revision step0" in line:
            os.kill(first.pid, signal.SIGKILL)
            break
    first.wait(timeout=600)
    assert first.returncode == -signal.SIGKILL
    again = study(suite, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stdout + again.stderr
    assert "imported revision step0" not in log  # resumed after it
    assert all(f"imported revision {r} " in log for r in REVISIONS[1:])
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["vectors"] >= 1
    (store,) = [
        p / "snapshots" for p in (tmp_path / "cache" / "snapshots").iterdir() if not p.name.startswith(".")
    ]
    store = SnapshotStore(store)
    assert store.steps.tolist() == [0, 10, 20, 30]
    for revision, step in zip(REVISIONS, (0, 10, 20, 30), strict=True):
        want = torch.cat([p.detach().reshape(-1) for p in suite["models"][revision].parameters()])
        assert torch.equal(store.flat(step), want)


def test_a_missing_revision_is_refused_in_one_line_naming_it(suite, tmp_path):
    proc = study(suite, tmp_path, revisions=("step0", "step5", "step10"))
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(
        "polca-study: error: snapshots.revisions: revision step5 of org/tiny-neox could not be"
    )


def test_a_revision_serving_an_earlier_ones_weights_is_refused_before_the_basis(suite, tmp_path):
    """Public suites have served the final model's weights under early step names."""
    hub = suite["hub"]
    served = tmp_path / "home"
    subprocess.run(["cp", "-r", str(suite["home"]), str(served)], check=True)
    bad = served / "hub" / "models--org--tiny-neox"
    (bad / "refs" / "step20").write_text((hub / "refs" / "step10").read_text())  # step20 serves step10
    proc = study({**suite, "home": served}, tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = proc.stderr.strip().splitlines()
    assert "steps 10 and 20 hold identical parameters" in line
    assert not (tmp_path / "cache" / "basis").exists()
