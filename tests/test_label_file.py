"""Label files: the three forms, one-line refusals that name file, line and field, and
alignment of character spans to tokens."""

import json

import numpy as np
import pandas as pd
import pytest

from polca_study.errors import ConfigError
from polca_study.tasks.copying import copy_spans
from polca_study.tasks.label_file import Passage, Span, align, digest, read_labels, write_labels


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


SPANS = {"text": "Mary met John. Mary met", "spans": [{"start": 15, "end": 19, "label": "name"}]}
TOKENS = {"tokens": ["the", "cat", "sat"], "labels": [None, "noun", "O"]}


def test_span_and_pretokenized_lines(tmp_path):
    passages = read_labels(write(tmp_path / "l.jsonl", [SPANS, "", TOKENS]))
    assert passages[0] == Passage(SPANS["text"], (Span(15, 19, "name"),))
    # tokens joined by single spaces; a word labelled null or "O" is background
    assert passages[1] == Passage("the cat sat", (Span(4, 7, "noun"),))


def test_parquet_and_hf_dataset_dir_give_the_same_passages(tmp_path):
    rows = [SPANS, {"text": "x y", "spans": []}]
    expected = read_labels(write(tmp_path / "l.jsonl", rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "l.parquet")
    assert read_labels(tmp_path / "l.parquet") == expected
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    assert read_labels(tmp_path / "hf") == expected
    tokens = [TOKENS, {"tokens": ["a"], "labels": ["x"]}]
    datasets.Dataset.from_list(tokens).save_to_disk(str(tmp_path / "hf_tokens"))
    assert read_labels(tmp_path / "hf_tokens") == read_labels(write(tmp_path / "t.jsonl", tokens))


@pytest.mark.parametrize(
    "row, message",
    [
        (
            {"text": "abc", "spans": [{"start": 1, "end": 9, "label": "x"}]},
            r":2: spans\[0\]\.end: 9 is past the end of its text \(3",
        ),
        (
            {
                "text": "abcdef",
                "spans": [{"start": 0, "end": 3, "label": "x"}, {"start": 2, "end": 5, "label": "y"}],
            },
            r":2: spans: \[0, 3\) 'x' and \[2, 5\) 'y' overlap",
        ),
        ({"text": "abc", "spans": [], "label": "x"}, r":2: unknown column 'label'"),
        (
            {"text": "abc", "spans": [{"start": 0, "end": 1, "label": "a b"}]},
            r":2: spans\[0\]\.label: a label is a name",
        ),
        (
            {"text": "abc", "spans": [{"start": 2, "end": 1, "label": "x"}]},
            r":2: spans\[0\]: needs 0 <= start < end",
        ),
        ({"text": "abc", "spans": [{"start": 0, "end": 1}]}, r":2: spans\[0\]\.label: missing"),
        ({"text": "abc"}, r":2: spans: missing"),
        (
            {"tokens": ["a", "b"], "labels": ["x"]},
            r":2: labels: must be a list as long as tokens \(2\), got 1",
        ),
        ("{not json", r":2: not a JSON object"),
    ],
)
def test_a_bad_line_is_refused_in_one_line_naming_file_line_and_field(tmp_path, row, message):
    path = write(tmp_path / "bad.jsonl", [SPANS, row])
    with pytest.raises(ConfigError, match=message) as err:
        read_labels(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_empty_missing_and_unlabelled_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="empty"):
        read_labels(write(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(ConfigError, match="no such file"):
        read_labels(tmp_path / "nowhere.jsonl")
    with pytest.raises(ConfigError, match="no passage has a labelled span"):
        read_labels(write(tmp_path / "none.jsonl", [{"text": "abc", "spans": []}]))
    pd.DataFrame([{"text": "a", "spans": [], "extra": 1}]).to_parquet(tmp_path / "x.parquet")
    with pytest.raises(ConfigError, match=r"x\.parquet row 0: unknown column 'extra'"):
        read_labels(tmp_path / "x.parquet")


def test_alignment_by_offsets_takes_the_span_a_token_overlaps_most():
    # tokens of "Mary had a lamb" as a byte-level BPE cuts them: " had" holds its space
    offsets = np.array([[0, 4], [4, 8], [8, 10], [10, 13], [13, 15], [15, 15]])
    spans = (Span(5, 8, "verb"), Span(11, 14, "noun"))
    assert align(offsets, spans).tolist() == ["", "verb", "", "noun", "noun", ""]
    # [10, 13) overlaps noun by 2; [13, 15) by 1, and the empty token none


def test_written_files_read_back_and_digest_ignores_where_they_live(tmp_path):
    passages = [Passage("a b a b", copy_spans("a b a b"))]
    write_labels(tmp_path / "one.jsonl", passages)
    write_labels(tmp_path / "two.jsonl", passages)
    assert read_labels(tmp_path / "one.jsonl") == passages
    assert digest(read_labels(tmp_path / "one.jsonl")) == digest(read_labels(tmp_path / "two.jsonl"))


def test_copy_labels_mark_completed_bigrams_and_novel_words():
    text = "the cat sat . the cat ran"
    labels = {text[s.start : s.end] + f"@{s.start}": s.label for s in copy_spans(text)}
    # "cat" at 18 completes "the cat" seen before; "ran" is new; "the" at 14 and "." are
    # neither (seen before, but not after the word before them)
    assert labels == {
        "cat@4": "novel",
        "sat@8": "novel",
        ".@12": "novel",
        "cat@18": "copy",
        "ran@22": "novel",
    }


def test_the_copying_command_writes_a_label_file_of_held_out_text(tmp_path, capsys):
    from polca_study.app.data import main
    from tests.conftest import DATA_DIR, require_corpus

    require_corpus()
    out = tmp_path / "copying.jsonl"
    main(["copying", str(out), "--passages", "5", "--snippet-chars", "80", "--data-dir", str(DATA_DIR)])
    passages = read_labels(out)
    assert len(passages) == 5 and "5 passages" in capsys.readouterr().err
    for p in passages:
        half = p.text[: len(p.text) // 2]
        assert p.text == f"{half} {half}"  # a snippet read twice
        # the second reading's words after its first complete bigrams of the first
        copies = [s for s in p.spans if s.label == "copy"]
        assert copies and all(
            s.start > len(half) or p.text.count(p.text[s.start : s.end]) > 1 for s in copies
        )
    again = tmp_path / "again.jsonl"
    main(["copying", str(again), "--passages", "5", "--snippet-chars", "80", "--data-dir", str(DATA_DIR)])
    assert again.read_bytes() == out.read_bytes()  # a function of its command
