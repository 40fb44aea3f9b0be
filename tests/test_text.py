"""Text: corpus, tokenizer round trip, rule-based tagger, cluster labeller, evaluation tokens."""

import sys

import numpy as np
import pandas as pd
import pytest
import torch
from torch.nn import functional as F

from polca_study.study.config import validate
from polca_study.tasks import corpus
from polca_study.tasks.tagging import context_tags, rule_tag, rule_words, spacy_model, tag_words
from polca_study.tasks.text import TextConfig
from polca_study.tasks.text_data import (
    TAG_COLUMNS,
    TextData,
    split_document,
    token_loss,
    train_tokenizer,
)
from polca_study.tasks.text_labels import (
    _label_counts,
    _labels_needed,
    best_label_purity,
    label_cluster,
    label_purity,
    nearest_to_medoid,
    simply_labelled_fraction,
    simply_labelled_null,
    smallest_covering_set,
    text_cluster_table,
)
from tests.conftest import DATA_DIR, compose_config, require_corpus


@pytest.fixture(scope="module")
def austen():
    require_corpus()
    return corpus.load_documents("austen", DATA_DIR)


# ---------------------------------------------------------------------- corpus


def test_offline_corpus_is_the_six_novels(austen):
    assert len(austen) == 6
    assert sum(map(len, austen)) > 3_500_000
    assert austen[1].startswith("PRIDE AND PREJUDICE")
    assert (
        "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife." in austen[1]
    )  # reflowed: one paragraph, one line


def test_reflow_joins_wrapped_lines_into_paragraphs():
    assert (
        corpus.reflow(["CHAPTER I", "", "", "It was a", "dark night.", "", "The end."])
        == "CHAPTER I\n\nIt was a dark night.\n\nThe end.\n"
    )


def test_files_source_reads_globs_and_fails_clearly(tmp_path, monkeypatch):
    (tmp_path / "a.txt").write_text("one\n")
    (tmp_path / "b.txt").write_text("two\n")
    assert corpus.load_documents("files", DATA_DIR, [str(tmp_path / "*.txt")]) == ["one\n", "two\n"]
    with pytest.raises(ValueError, match="dataset.files matched no files"):
        corpus.load_documents("files", DATA_DIR, [str(tmp_path / "*.md")])

    def offline(package, dest):
        raise RuntimeError(f"apt-get download {package} failed: no network")

    monkeypatch.setattr(corpus, "download_deb", offline)  # the first use fetches; here it cannot
    with pytest.raises(corpus.CorpusMissing, match="could not be fetched.*polca-study-data fetch"):
        corpus.load_documents("austen", tmp_path)


def test_the_corpus_is_found_from_any_directory(tmp_path, monkeypatch):
    require_corpus()
    monkeypatch.chdir(tmp_path)  # not the checkout
    monkeypatch.setenv("POLCA_DATA_DIR", str(DATA_DIR.resolve()))
    assert corpus.default_data_dir() == DATA_DIR.resolve()
    assert len(corpus.load_documents("austen", None, max_chars=1000)) >= 1
    monkeypatch.delenv("POLCA_DATA_DIR")
    assert corpus.default_data_dir().name == "polca-study"  # the user's data directory


def test_split_document_cuts_at_a_paragraph_break():
    doc = "\n\n".join(f"paragraph {i} " + "word " * 20 for i in range(20))
    train, held_out = split_document(doc, 0.1)
    assert train + held_out == doc
    assert train.endswith("\n\n") and held_out.startswith("paragraph")
    assert 0.05 < len(held_out) / len(doc) < 0.15


# ------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trips_held_out_text(austen):
    train_text, held_out = split_document(austen[0][:300_000], 0.1)
    tok = train_tokenizer([train_text], vocab_size=400)
    assert tok.get_vocab_size() == 400
    for text in (held_out, "Ünïcödé — “quotes”\n\n\ttabs  and  spaces 1813", austen[3][:5000]):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert max(ids) < 400
    # BPE merged something: held-out prose takes fewer tokens than bytes
    assert len(tok.encode(held_out).ids) < 0.6 * len(held_out.encode())


# ---------------------------------------------------------------------- tagger


def test_rule_tagger_on_a_hand_tagged_sentence():
    text = "The Bennets of Longbourn walked to Meryton, and she was not 21.\n\nIt rained!"
    words = rule_words(text)
    got = [(text[s:e], t) for s, e, t in zip(words.starts, words.ends, words.tags, strict=True)]
    assert got == [
        ("The", "DET"),
        ("Bennets", "CAP"),
        ("of", "ADP"),
        ("Longbourn", "CAP"),
        ("walked", "OTHER"),
        ("to", "PART"),
        ("Meryton", "CAP"),
        (",", "PUNCT"),
        ("and", "CCONJ"),
        ("she", "PRON"),
        ("was", "AUX"),
        ("not", "PART"),
        ("21", "NUM"),
        (".", "PUNCT"),
        ("\n\n", "NEWLINE"),
        ("It", "PRON"),
        ("rained", "OTHER"),
        ("!", "PUNCT"),
    ]


def test_rule_tagger_keeps_contractions_and_possessives_whole():
    text = "Emma's friend couldn't"
    words = rule_words(text)
    assert [text[s:e] for s, e in zip(words.starts, words.ends, strict=True)] == [
        "Emma's",
        "friend",
        "couldn't",
    ]


def test_context_tags_of_a_character_are_its_word_and_the_three_before():
    text = "Of the house, she said"
    words = rule_words(text)  # Of the house , she said
    # 'o' of "house" (offset 8), the space before "said" (offset 17: belongs to the next word)
    tags = context_tags(words, np.array([8, 17, 0]))
    assert tags.tolist() == [
        ["BOS", "ADP", "DET", "OTHER"],
        ["OTHER", "PUNCT", "PRON", "OTHER"],
        ["BOS", "BOS", "BOS", "ADP"],
    ]


# --------------------------------------------------------------------- labeller


def test_smallest_covering_set_on_known_counts():
    tags = ["A"] * 5 + ["B"] * 3 + ["C"] * 2
    assert smallest_covering_set(tags, 0.7) == ["A", "B"]  # 5 + 3 of 10 >= 7
    assert smallest_covering_set(tags, 0.5) == ["A"]  # exactly 5 of 10
    assert smallest_covering_set(tags, 0.81) == ["A", "B", "C"]
    assert smallest_covering_set(["X"] * 7 + ["Y"] * 3, 0.7) == ["X"]  # 70% exactly
    assert smallest_covering_set(["B", "A", "B", "A"], 0.5) == ["A"]  # ties by name


def test_label_cluster_and_the_simply_labelled_rule():
    # positions w-3..w0; 10 tokens
    simple = np.array(
        [
            ["DET"] * 10,
            ["OTHER"] * 6 + ["CAP"] * 2 + ["PUNCT"] * 2,
            ["ADP"] * 10,
            ["CAP"] * 4 + ["OTHER"] * 4 + ["NUM"] * 2,
        ]
    ).T
    sets, is_simple = label_cluster(simple, 0.7, 2)
    assert sets == [["DET"], ["OTHER", "CAP"], ["ADP"], ["CAP", "OTHER"]]
    assert is_simple
    mixed = np.concatenate([simple, simple])  # 20 tokens
    mixed[:, 2] = ["ADP"] * 6 + ["DET"] * 5 + ["PRON"] * 4 + ["NUM"] * 3 + ["CAP"] * 2  # 15 >= 14
    sets, is_simple = label_cluster(mixed, 0.7, 2)
    assert sets[2] == ["ADP", "DET", "PRON"] and not is_simple
    assert label_cluster(mixed, 0.7, 3)[1]


def _labels(tags: np.ndarray) -> pd.DataFrame:
    frame = pd.DataFrame(tags, columns=list(TAG_COLUMNS))
    frame["token"] = [f"t{i % 3}" for i in range(len(tags))]
    return frame


def test_cluster_table_and_fraction_on_hand_made_clusters():
    n = 20
    tags = np.array([["DET", "OTHER", "ADP", "CAP"]] * n, dtype=object)
    tags[10:] = [["PUNCT", "PRON", "AUX", "OTHER"], ["DET", "CAP", "NUM", "PUNCT"]] * 5
    # column 0: cluster 0 = the uniform first half, cluster 1 = the alternating half
    # column 1: one cluster of everything
    # column 2: no clusters at all
    assign = np.stack([np.repeat([0, 1], 10), np.zeros(n, int), np.full(n, -1)], axis=1)
    table = text_cluster_table(assign, _labels(tags))
    assert len(table) == 3
    row = table[(table.vector == 0) & (table.cluster == 0)].iloc[0]
    assert row.label == "DET | OTHER | ADP | CAP" and row.simply_labelled and row.tag_share == 1.0
    row = table[(table.vector == 0) & (table.cluster == 1)].iloc[0]
    assert row.label == "DET/PUNCT | CAP/PRON | AUX/NUM | OTHER/PUNCT" and row.simply_labelled
    row = table[table.vector == 1].iloc[0]
    assert row.label_sizes == "1/2/2/2" and row["size"] == n  # DET 15 of 20 covers 75%
    # top-2 shares per position: DET+PUNCT 1.0, OTHER+PRON (10+5)/20, ADP+AUX 0.75, CAP+OTHER 0.75
    assert row.label_purity == pytest.approx(0.75)
    assert [row[f"purity_w{p}"] for p in ("-3", "-2", "-1", "0")] == pytest.approx([1.0, 0.75, 0.75, 0.75])
    assert best_label_purity(table, 3) == pytest.approx((1.0 + 0.75 + 0) / 3)
    assert simply_labelled_fraction(table, 3) == pytest.approx(2 / 3)
    assert simply_labelled_fraction(table[table.vector == 1].assign(simply_labelled=False), 3) == 0.0


def test_vectorised_label_count_matches_the_plain_labeller():
    rng = np.random.default_rng(0)
    tags = rng.choice(["A", "B", "C", "D", "E"], p=[0.4, 0.25, 0.15, 0.1, 0.1], size=(600, 4))
    cluster = rng.integers(0, 7, size=600)
    codes, uniques = pd.factorize(pd.Series(tags.reshape(-1)))
    needed = _labels_needed(cluster, codes.reshape(600, 4), len(uniques), 0.7)
    for c in range(7):
        sets, _ = label_cluster(tags[cluster == c], 0.7)
        assert needed[c].tolist() == [len(s) for s in sets]
    # the null's purity arithmetic, on unshuffled tags, against the plain purity
    ordered, size = _label_counts(cluster, codes.reshape(600, 4), len(uniques))
    purity = (ordered[:, :, 1] / size[:, :, 0]).min(axis=1)
    for c in range(7):
        assert purity[c] == pytest.approx(label_purity(tags[cluster == c]))
    table = text_cluster_table(cluster[:, None], _labels(tags.astype(object)))
    assert best_label_purity(table, 1) == pytest.approx(purity.max())


def test_permutation_null_separates_real_structure_from_chance():
    rng = np.random.default_rng(1)
    n = 400
    tags = rng.choice(["OTHER", "PUNCT", "DET", "ADP", "PRON", "CAP"], size=(n, 4))
    tags[:100] = ["DET", "OTHER", "ADP", "CAP"]  # one real, simply-labelled group
    assign = np.repeat([0, 1, 2, 3], 100)[:, None]
    labels = _labels(tags.astype(object))
    table = text_cluster_table(assign, labels)
    assert simply_labelled_fraction(table, 1) == 1.0
    assert best_label_purity(table, 1) == 1.0
    null = simply_labelled_null(assign, labels, draws=30, seed=0)
    assert null["simply_labelled_fraction"].mean() < 0.2  # shuffled tags: almost never 2-tag clusters
    # six tags drawn uniformly, 100 tokens a cluster: the top 2 tags cover about 1/3 at each
    # position; the purest cluster's least pure position stays far below 1
    assert 0.3 < null["label_purity"].mean() < 0.6


def test_nearest_to_medoid_against_brute_force():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(60, 5))
    total = np.linalg.norm(x[:, None] - x[None], axis=2).sum(1)
    medoid = int(np.argmin(total))
    expected = np.argsort(np.linalg.norm(x - x[medoid], axis=1))[:10]
    got = nearest_to_medoid(x, 10)
    assert got[0] == medoid
    assert got.tolist() == expected.tolist()


# ---------------------------------------------------------------- evaluation set


@pytest.fixture(scope="module")
def tiny_text():
    require_corpus()
    return TextData(
        TextConfig(
            data_dir=str(DATA_DIR),
            max_chars=300_000,
            vocab_size=300,
            n_ctx=16,
            eval_tokens=160,
            eval_positions=4,
            hessian_size=8,
            tagger="rules",
        )
    )


def test_evaluation_tokens_are_next_tokens_of_held_out_contexts(tiny_text):
    split = tiny_text.eval_split()
    assert split.inputs.shape == (40, 16) and split.targets.shape == (40, 4)
    pos = split.positions
    assert ((pos >= 8) & (pos < 16)).all()
    inside = pos < 15  # the target at position p is the input at p + 1
    assert torch.equal(split.inputs.gather(1, (pos + 1).clamp(max=15))[inside], split.targets[inside])
    labels = split.labels
    assert len(labels) == 160
    decoded = [tiny_text.tokenizer.decode([t]) for t in labels.target]
    assert decoded == labels.token.tolist()
    # w0 is the word around the token's first visible character, found here by scanning
    # the held-out text; its tag must be the rule tag of that word
    text = tiny_text.tokens["val_text"]
    checked = 0
    for row in labels.itertuples():
        assert row.token.strip(" ") == "" or text[row.char] == row.token.lstrip(" ")[0]
        if not text[row.char].isalpha():
            continue
        start, end = row.char, row.char
        while start > 0 and (text[start - 1].isalpha() or text[start - 1] == "'"):
            start -= 1
        while end < len(text) and (text[end].isalpha() or text[end] == "'"):
            end += 1
        word = text[start:end].strip("'")
        assert labels.at[row.Index, "tag_w0"] == rule_tag(word), word
        checked += 1
    assert checked > 80


def test_evaluation_set_is_fixed_by_the_seed(tiny_text):
    again = TextData(tiny_text.config)
    a, b = tiny_text.eval_split(), again.eval_split()
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.positions, b.positions)
    other = TextData(TextConfig(**{**vars(tiny_text.config), "seed": 1}))
    assert not torch.equal(other.eval_split().inputs, a.inputs)


def test_token_loss_at_positions_against_plain_cross_entropy():
    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    positions = torch.tensor([[3, 5], [3, 4], [4, 5]])
    targets = torch.randint(0, 11, (3, 2))
    got = token_loss(logits, {"positions": positions, "targets": targets})
    for s in range(3):
        for p in range(2):
            ce = F.cross_entropy(logits[s, positions[s, p]][None], targets[s, p][None])
            assert torch.isclose(got[s, p], ce)
    full = token_loss(logits, {"targets": torch.randint(0, 11, (3, 6))})
    assert full.shape == (3, 6)


def test_too_many_evaluation_tokens_fail_with_the_fields_to_change():
    require_corpus()
    with pytest.raises(ValueError, match="dataset.eval_tokens=100000 needs"):
        TextData(
            TextConfig(
                data_dir=str(DATA_DIR),
                max_chars=300_000,
                vocab_size=300,
                n_ctx=16,
                eval_tokens=100_000,
                eval_positions=4,
                tagger="rules",
            )
        )


@pytest.mark.parametrize(
    "override, message",
    [
        ("dataset.source=web", "dataset.source must be one of"),
        ("dataset.tagger=nltk", "dataset.tagger must be one of"),
        ("dataset.eval_positions=40", "dataset.eval_positions must be <= n_ctx/2"),
        ("dataset.val_fraction=1.5", "dataset.val_fraction must be in"),
        ("dataset.source=files", "dataset.files must list text files"),
    ],
)
def test_bad_text_settings_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        validate(compose_config(["experiment=cpu_text", override]))


def test_paper_text_preset_matches_the_paper():
    s = validate(compose_config(["experiment=paper_text"]))
    assert (s.model.n_layers, s.model.d_model, s.model.n_heads, s.model.d_mlp) == (3, 512, 4, 2048)
    assert (s.dataset.n_ctx, s.dataset.eval_tokens, s.dataset.vocab_size) == (128, 12600, 30000)
    assert (s.basis.k, s.basis.interval, s.polca.interval, s.train.steps) == (1, 750, 200, 14000)
    assert s.cluster.min_cluster_size == 300


def test_huggingface_source_streams_until_max_chars(monkeypatch):
    calls = []

    def load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return ({"story": f"Once upon a time {i}."} for i in range(1000))

    fake = type(sys)("datasets")
    fake.load_dataset = load_dataset
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = corpus.load_documents(
        "huggingface",
        DATA_DIR,
        hf={"name": "roneneldan/TinyStories", "config": None, "split": "validation", "text_field": "story"},
        max_chars=100,
    )
    assert calls == [("roneneldan/TinyStories", None, "validation", True)]
    assert "".join(docs) == "".join(f"Once upon a time {i}." for i in range(6))[:100]
    with pytest.raises(ValueError, match="dataset.hf_name"):
        corpus.load_documents("huggingface", DATA_DIR, hf={"name": None})


@pytest.mark.skipif(spacy_model() is None, reason="spaCy and an English pipeline are an optional extra")
def test_spacy_tagger_gives_universal_tags_and_newlines():
    text = "The cat sat on the mat.\n\nShe smiled."
    words = tag_words(text, "spacy")
    got = [(text[s:e], t) for s, e, t in zip(words.starts, words.ends, words.tags, strict=True)]
    assert got == [
        ("The", "DET"),
        ("cat", "NOUN"),
        ("sat", "VERB"),
        ("on", "ADP"),
        ("the", "DET"),
        ("mat", "NOUN"),
        (".", "PUNCT"),
        ("\n\n", "NEWLINE"),
        ("She", "PRON"),
        ("smiled", "VERB"),
        (".", "PUNCT"),
    ]


def test_the_tagger_is_part_of_the_training_key(monkeypatch):
    """Training curves are grouped by the tag of the target's word: another tagger must
    not reuse a training run whose curves carry the first tagger's tags. The key is the
    one the training source itself asks the cache for."""
    from polca_study.study.cache import stage_key
    from polca_study.study.sources import make_source
    from polca_study.tasks import make_task, tagging

    require_corpus()
    cfg = validate(
        compose_config(
            [
                "dataset=text",
                "model=tiny",
                f"dataset.data_dir={DATA_DIR}",
                "dataset.max_chars=300000",
                "dataset.vocab_size=300",
                "dataset.n_ctx=16",
                "dataset.eval_tokens=160",
                "dataset.eval_positions=4",
                "dataset.hessian_size=8",
                "dataset.tagger=rules",
            ]
        )
    )

    class Stored(Exception):  # carries the key the training run would be stored under
        pass

    class Keys:  # builds nothing: stops at the key
        def get_or_build(self, stage, spec, build, load, again=False):
            raise Stored(stage_key(stage, spec))

    def train_key(task):
        with pytest.raises(Stored) as stored:
            make_source(cfg).prepare(task, Keys(), torch.device("cpu"), False)
        return stored.value.args[0]

    first = train_key(make_task(cfg.dataset))
    assert train_key(make_task(cfg.dataset)) == first  # the key is a function of the config
    monkeypatch.setattr(tagging, "resolve_tagger", lambda name: "stand-in")
    monkeypatch.setattr(tagging, "tag_words", lambda text, tagger="auto": tagging.rule_words(text))
    other = make_task(cfg.dataset)  # built once under the other tagger
    assert other.spec["tagger"] == "stand-in"
    assert train_key(other) != first
