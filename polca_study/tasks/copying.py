"""A label file for copying, from the offline corpus's held-out text.

A word is `copy` when it completes a repeat, within its passage, of an earlier bigram
(A B … A [B]): a model that attends back to what followed A before can predict it, and
attention models learn this abruptly (induction heads). A word is `novel` when it occurs
nowhere earlier in its passage, so no earlier token predicts it: the contrast. Other
words are background. Words are runs of letters and digits or single punctuation marks,
so the file does not depend on a tokenizer: every token of a labelled word carries its
label.

Passages are held-out snippets of about `snippet_chars` characters (cut at a word
boundary, never from the text a study trains on), each written `repeats` times in a
row, so its second reading is copying; `repeats=1` keeps the text as it is, where repeats
are the text's own.
"""

from __future__ import annotations

import re

import numpy as np

from polca_study.tasks.label_file import Passage, Span

WORD = re.compile(r"\w+|[^\w\s]")


def copy_spans(text: str) -> tuple[Span, ...]:
    """`copy` and `novel` spans of the words of `text` (the first word is neither)."""
    words = [(m.start(), m.end(), m.group()) for m in WORD.finditer(text)]
    spans, seen_words, seen_bigrams = [], set(), set()
    for i, (start, end, word) in enumerate(words):
        if i and (words[i - 1][2], word) in seen_bigrams:
            spans.append(Span(start, end, "copy"))
        elif i and word not in seen_words:
            spans.append(Span(start, end, "novel"))
        seen_words.add(word)
        if i:
            seen_bigrams.add((words[i - 1][2], word))
    return tuple(spans)


def copy_passages(
    held_out: list[str], count: int, snippet_chars: int, repeats: int, seed: int
) -> list[Passage]:
    """`count` passages from held-out texts, snippets drawn at seeded random places."""
    text = " ".join(" ".join(t.split()) for t in held_out)  # one line: newlines are not words
    rng = np.random.default_rng(seed)
    starts = np.sort(rng.choice(max(len(text) - 2 * snippet_chars, 1), size=count, replace=False))
    passages = []
    for start in starts:
        begin = text.find(" ", start) + 1  # whole words only
        end = text.rfind(" ", begin, begin + snippet_chars)
        snippet = text[begin:end]
        passage = " ".join([snippet] * repeats)
        passages.append(Passage(passage, copy_spans(passage)))
    return passages
