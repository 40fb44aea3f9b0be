"""A study scored against a label file: a planted skill is recovered above its null and
the same file with its labels moved is not; a bad file is refused before any work."""

import json
import re
import subprocess

import numpy as np
import pytest

from polca_study.analysis import skills
from polca_study.tasks import corpus, label_file
from polca_study.tasks.text_data import split_document
from tests.conftest import DATA_DIR, POLCA, require_corpus
from tests.test_study import run_state

pytestmark = pytest.mark.slow
# the loss's clusters: at this size POLCA's (two basis vectors, five intervals) do not
# separate the planted tokens, which is the study's finding to report, not this test's
TINY = [
    "experiment=tiny_text",
    "method=loss",
    "cluster.min_cluster_size=40",
    "cluster.min_samples=5",
    "score.permutations=50",
    "progress=false",
    "figures=false",
    "num_threads=1",
]


def passages(planted: bool) -> list[dict]:
    """Held-out snippets; every third ends in 30 random digits, a kind of token the
    training text almost never has: the planted skill, labelled `digits`. With
    `planted=False` the same texts, the label put on the start of the next passage."""
    docs = corpus.load_documents("austen", DATA_DIR)
    held = " ".join(" ".join(split_document(d, 0.05)[1].split()) for d in docs)
    rng = np.random.default_rng(0)
    rows = []
    for i, start in enumerate(sorted(rng.choice(len(held) - 400, 30, replace=False))):
        begin = held.find(" ", start) + 1
        text = held[begin : held.rfind(" ", begin, begin + 120)]
        if i % 3 == 0:
            digits = " ".join(str(d) for d in rng.integers(0, 10, 30))
            span = {"start": len(text) + 1, "end": len(text) + 1 + len(digits), "label": "digits"}
            rows.append({"text": f"{text} {digits}", "spans": [span]})
        else:
            rows.append({"text": text, "spans": []})
    if planted:
        return rows
    moved = [{"text": r["text"], "spans": []} for r in rows]
    for i, r in enumerate(rows):
        if r["spans"]:
            after = moved[(i + 1) % len(rows)]
            after["spans"] = [{"start": 0, "end": min(60, len(after["text"])), "label": "digits"}]
    return moved


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def study(tmp_path, env, labels, name, logger="disabled"):
    run = tmp_path / name
    done = subprocess.run(
        [*POLCA, *TINY, f"logger={logger}", f"dataset.labels={labels}", f"hydra.run.dir={run}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((run / "summary.json").read_text()), (run / "clusters.md").read_text()


def test_a_planted_skill_is_recovered_above_its_null_and_moved_labels_are_not(tmp_path, env):
    require_corpus()
    labels = write(tmp_path / "planted.jsonl", passages(True))
    metrics, clusters = study(tmp_path, env, labels, "planted", logger="offline")
    digits = metrics["labels"]["digits"]
    assert digits["recovery"] > digits["recovery_null95"] and digits["recovery_p"] <= 0.05
    assert digits["recovery_excess"] == pytest.approx(digits["recovery"] - digits["recovery_null_mean"])
    assert metrics["label_digits_recovery_excess"] == digits["recovery_excess"]
    assert set(digits) == {f.name for f in skills.SkillScore.__dataclass_fields__.values()}
    assert "## Labelled skills" in clusters and re.search(r"\| digits +\| +\d+ \|", clusters)
    logged = run_state(tmp_path / "planted")["summary"]  # the W&B run, read back offline
    assert logged["labels/digits/recovery_p"] == digits["recovery_p"]
    assert logged["label_digits_recovery_excess"] == digits["recovery_excess"]
    moved, _ = study(tmp_path, env, write(tmp_path / "moved.jsonl", passages(False)), "moved")
    assert moved["labels"]["digits"]["recovery_p"] > 0.05
    assert moved["labels"]["digits"]["recovery_excess"] < digits["recovery_excess"]


def test_a_span_past_its_text_is_refused_in_one_line_before_any_work(tmp_path, env):
    rows = [{"text": "Mary met John.", "spans": [{"start": 0, "end": 4, "label": "name"}]}]
    rows.append({"text": "John left.", "spans": [{"start": 5, "end": 40, "label": "name"}]})
    path = write(tmp_path / "bad.jsonl", rows)
    done = subprocess.run(
        [*POLCA, *TINY, "logger=disabled", f"dataset.labels={path}", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-3000:]
    assert f"{path}:2: spans[0].end: 40 is past the end of its text (10 characters)" in lines[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def test_background_is_one_value_in_both_layers():
    assert label_file.BACKGROUND == skills.BACKGROUND
