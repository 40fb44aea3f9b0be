"""English language modelling: a BPE tokenizer trained on the corpus, contexts of `n_ctx`
tokens, a fixed set of evaluation tokens tagged with their part-of-speech context.

Each document is split once: its last `val_fraction` (at a paragraph break) is held out.
The tokenizer is trained on the training parts only. Evaluation tokens are
`eval_positions` target tokens in each of ceil(eval_tokens / eval_positions) held-out
contexts (disjoint windows, positions drawn from the second half of the context, so every
target has at least n_ctx/2 tokens of context; eval_tokens is rounded up to whole
contexts). Each evaluation token is labelled with the tags of its word and of the 3
words before it (`tagging.context_tags`).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from torch.nn import functional as F

from polca_study.errors import ConfigError, first_line
from polca_study.tasks import corpus, label_file, tagging

if TYPE_CHECKING:  # the schema lives with the task; this module is its data
    from polca_study.tasks.text import TextConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # quiet under forked launchers

EOT = "<|endoftext|>"
TAG_COLUMNS = ("tag_w-3", "tag_w-2", "tag_w-1", "tag_w0")
CONTEXT_CHARS = 80  # text shown before a target token in reports


@dataclass
class TextSplit:
    """Contexts inputs (S, n_ctx); targets (S, P) at `positions` (S, P), or every
    position's next token (S, n_ctx) when positions is None. labels: one row per
    evaluation token, ordered (sequence, position) like the flattened targets."""

    inputs: Tensor
    targets: Tensor
    positions: Tensor | None = None
    labels: pd.DataFrame | None = None

    def batch(self) -> dict[str, Tensor]:
        out = {"inputs": self.inputs, "targets": self.targets}
        if self.positions is not None:
            out["positions"] = self.positions
        return out


def token_loss(logits: Tensor, batch: dict[str, Tensor]) -> Tensor:
    """Next-token cross-entropy: logits (S, T, V) -> (S, P) at batch["positions"], or
    (S, T) at every position."""
    if "positions" in batch:
        idx = batch["positions"][..., None].expand(-1, -1, logits.shape[-1])
        logits = logits.gather(1, idx)
    return F.cross_entropy(logits.transpose(1, 2), batch["targets"], reduction="none")


def evaluate(model: torch.nn.Module, split: TextSplit) -> dict[str, list]:
    """Loss and accuracy of the evaluation tokens by their label from a label file
    (background: "none"), or else by the tag of their word."""
    device = next(model.parameters()).device
    logits = model(split.inputs.to(device)).cpu()
    batch = split.batch()
    losses = token_loss(logits, batch).reshape(-1).numpy()
    idx = batch["positions"][..., None].expand(-1, -1, logits.shape[-1])
    correct = (logits.gather(1, idx).argmax(-1) == split.targets).reshape(-1).numpy()
    group = split.labels["label"].replace(label_file.BACKGROUND, "none") if "label" in split.labels else None
    frame = pd.DataFrame({"tag": split.labels["tag_w0"] if group is None else group})
    frame = frame.assign(loss=losses, correct=correct)
    out = (
        frame.groupby("tag")
        .agg(loss=("loss", "mean"), accuracy=("correct", "mean"), tokens=("loss", "size"))
        .reset_index()
    )
    return {c: out[c].tolist() for c in out.columns}


# ----------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE (GPT-2 style: every string round-trips) trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def pretrained_tokenizer(name: str, revision: str | None = None):
    """The fast tokenizer of a pretrained model (its `tokenizers.Tokenizer`) and its
    end-of-text token, at `revision` (of a hub model; a local directory's checkpoint
    subdirectory when it holds a tokenizer)."""
    from transformers import AutoTokenizer

    local = Path(name) / revision if revision else None
    if local is not None and any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        name, revision = str(local), None
    try:
        tok = AutoTokenizer.from_pretrained(name, revision=revision)
    except OSError as err:  # not in the cache offline, or no such revision
        first = first_line(err)
        raise ConfigError(
            f"dataset.tokenizer={name} (revision {revision}) could not be loaded: {first}"
        ) from None
    if not tok.is_fast:
        raise ConfigError(f"dataset.tokenizer={name!r} has no fast (Rust) tokenizer, which gives offsets")
    eot = tok.eos_token or tok.sep_token
    if eot is None:
        raise ConfigError(f"dataset.tokenizer={name!r} has no end-of-sequence token to separate documents")
    return tok.backend_tokenizer, eot


def load_tokenizer(json_text: str):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json_text)


def split_document(doc: str, val_fraction: float) -> tuple[str, str]:
    """(train, held-out) parts of a document, cut at a paragraph break near the
    (1 - val_fraction) point when there is one."""
    cut = int(len(doc) * (1 - val_fraction))
    para = doc.rfind("\n\n", 0, cut)
    if para > 0.9 * cut:
        cut = para + 2
    return doc[:cut], doc[cut:]


def tokenize_corpus(docs: list[str], c: TextConfig, pretrained=None) -> dict:
    """The cached "tokenizer" stage: tokenizer, training ids, held-out text with ids
    and character offsets."""
    parts = [split_document(d, c.val_fraction) for d in docs]
    train_texts = [p[0] for p in parts if p[0]]
    held_out = "\n\n".join(p[1].strip("\n") for p in parts if p[1].strip())
    if pretrained:  # (tokenizer, end-of-text token) of `pretrained_tokenizer`
        tok, eot_token = pretrained
    else:
        tok, eot_token = train_tokenizer(train_texts, c.vocab_size), EOT
    eot = tok.token_to_id(eot_token)
    train_ids = []
    for enc in tok.encode_batch(train_texts):
        train_ids.extend(enc.ids)
        train_ids.append(eot)
    val = tok.encode(held_out)
    return {
        "tokenizer": tok.to_str(),
        "train_ids": np.asarray(train_ids, dtype=np.int32),
        "val_ids": np.asarray(val.ids, dtype=np.int32),
        "val_offsets": np.asarray(val.offsets, dtype=np.int64),  # (N, 2) character spans
        "val_text": held_out,
        "vocab_size": tok.get_vocab_size(),
    }


# -------------------------------------------------------------------------- data


class TextData:
    """Tokenized corpus, evaluation tokens with tags, Hessian sample, training stream.

    `cache` (a StageCache) keeps the tokenizer stage and the tags; without one they are
    recomputed.
    """

    def __init__(self, c: TextConfig, cache=None):
        self.config = c
        # a label file is read and checked whole before anything is computed
        self.passages = label_file.read_labels(c.labels) if c.labels else None
        docs = corpus.load_documents(
            c.source,
            c.data_dir,
            c.files,
            {"name": c.hf_name, "config": c.hf_config, "split": c.hf_split, "text_field": c.hf_text_field},
            c.max_chars,
        )
        self.corpus_id = corpus.fingerprint(docs)
        spec = {"corpus": self.corpus_id, "vocab_size": c.vocab_size, "val_fraction": c.val_fraction}
        pretrained = pretrained_tokenizer(c.tokenizer, c.tokenizer_revision) if c.tokenizer else None
        if pretrained:  # by content, not by name: a directory's tokenizer can change
            digest = hashlib.sha256(pretrained[0].to_str().encode()).hexdigest()[:20]
            spec = {**spec, "vocab_size": None, "pretrained": digest}
        self.pretrained = spec.get("pretrained")
        self.tokens, self.tokenizer_key = _cached(
            cache, "tokenizer", spec, lambda: tokenize_corpus(docs, c, pretrained)
        )
        self.tokenizer = load_tokenizer(self.tokens["tokenizer"])
        self.d_vocab = int(self.tokens["vocab_size"])
        self.n_ctx = c.n_ctx
        self.tagger = tagger = tagging.resolve_tagger(c.tagger)
        if self.passages is not None:  # the evaluation text is the label file's
            stream = label_stream(self.tokens, self.tokenizer, self.passages)
            self._eval = label_windows(len(stream["ids"]), c.n_ctx, c.eval_positions)
            self.held_out = _padded(stream, self._eval["front"], self._eval["back"])
            self.labels_digest = label_file.digest(self.passages)
            tag_key = {"labels": self.labels_digest, "tagger": tagger}
        else:
            self.held_out = {k: self.tokens[f"val_{k}"] for k in ("ids", "offsets", "text")}
            self._eval = self._select_eval()
            tag_key = {"tokenizer": self.tokenizer_key, "tagger": tagger}
        words, _ = _cached(
            cache, "tags", tag_key, lambda: vars(tagging.tag_words(self.held_out["text"], tagger))
        )
        self.words = tagging.Words(**words)

    @property
    def spec(self) -> dict:
        """What determines training and evaluation: the corpus by its content (not where
        it was read from), the settings that shape the data, and the tagger that was
        used (the training curves are grouped by the tag of the target's word)."""
        c = asdict(self.config)
        keep = (
            "name",
            "val_fraction",
            "vocab_size",
            "n_ctx",
            "eval_tokens",
            "eval_positions",
            "hessian_size",
            "seed",
        )
        out = {**{k: c[k] for k in keep}, "corpus": self.corpus_id, "tagger": self.tagger}
        if self.pretrained:  # (absent otherwise, so the trained-BPE keys stay as they were)
            out["tokenizer"] = self.pretrained
        if self.passages is not None:  # the evaluation tokens (the training curves are theirs)
            out["labels"] = self.labels_digest
        return out

    def _select_eval(self) -> dict:
        c = self.config
        ids = self.tokens["val_ids"]
        window = c.n_ctx + 1
        n_seq = math.ceil(c.eval_tokens / c.eval_positions)
        available = len(ids) // window
        if n_seq > available:
            raise ConfigError(
                f"dataset.eval_tokens={c.eval_tokens} needs {n_seq} held-out contexts of "
                f"{window} tokens at dataset.eval_positions={c.eval_positions}, but the held-out "
                f"text has {available}: lower eval_tokens or n_ctx, or raise eval_positions or "
                "val_fraction"
            )
        low = c.n_ctx // 2  # config validation keeps eval_positions <= n_ctx - low
        rng = np.random.default_rng([c.seed, 2])
        starts = np.sort(rng.choice(available, size=n_seq, replace=False)) * window
        positions = np.sort(
            np.stack(
                [rng.choice(np.arange(low, c.n_ctx), c.eval_positions, replace=False) for _ in range(n_seq)]
            ),
            axis=1,
        )
        return {"starts": starts, "positions": positions}

    def eval_split(self) -> TextSplit:
        ids, offsets, text = self.held_out["ids"], self.held_out["offsets"], self.held_out["text"]
        starts, positions = self._eval["starts"], self._eval["positions"]
        windows = ids[starts[:, None] + np.arange(self.n_ctx + 1)]
        target_index = starts[:, None] + positions + 1  # (S, P) into val_ids
        flat = target_index.reshape(-1)
        spans = offsets[flat]
        first_char = np.array([_first_visible(text, s, e) for s, e in spans])
        tags = tagging.context_tags(self.words, first_char)
        context_start = offsets[np.repeat(starts, positions.shape[1]), 0]
        labels = pd.DataFrame(
            {
                "sequence": np.repeat(np.arange(len(starts)), positions.shape[1]),
                "position": positions.reshape(-1),
                "target": ids[flat],
                "token": [text[s:e] for s, e in spans],
                "char": first_char,  # offset of the token's first visible character in val_text
                **{col: tags[:, i] for i, col in enumerate(TAG_COLUMNS)},
                "context": [
                    text[max(cs, s - CONTEXT_CHARS) : s]
                    for cs, (s, _) in zip(context_start, spans, strict=True)
                ],
            }
        )
        if "labels" in self.held_out:  # the label file's label of each target, and its passage
            labels["label"] = self.held_out["labels"][flat]
            labels["passage"] = self.held_out["passage"][flat]
        return TextSplit(
            inputs=torch.as_tensor(windows[:, :-1], dtype=torch.long),
            targets=torch.as_tensor(ids[target_index], dtype=torch.long),
            positions=torch.as_tensor(positions, dtype=torch.long),
            labels=labels,
        )

    def _random_windows(self, size: int, rng: np.random.Generator) -> TextSplit:
        ids = self.tokens["train_ids"]
        starts = rng.integers(0, len(ids) - self.n_ctx - 1, size=size)
        w = torch.as_tensor(ids[starts[:, None] + np.arange(self.n_ctx + 1)], dtype=torch.long)
        return TextSplit(inputs=w[:, :-1], targets=w[:, 1:])

    def hessian_split(self) -> TextSplit:
        return self._random_windows(self.config.hessian_size, np.random.default_rng([self.config.seed, 3]))

    def train_batches(self, batch_size: int, seed: int):
        """An endless, seeded stream of training contexts (inputs, next tokens)."""
        if len(self.tokens["train_ids"]) < 2 * (self.n_ctx + 1):
            raise ConfigError(
                f"the training text has {len(self.tokens['train_ids'])} tokens, too few "
                f"for contexts of dataset.n_ctx={self.n_ctx}"
            )
        rng = np.random.default_rng([self.config.seed, seed, 1])
        while True:
            s = self._random_windows(batch_size, rng)
            yield s.inputs, s.targets


# -------------------------------------------------------------------- label files


def label_stream(tokens: dict, tokenizer, passages: list) -> dict:
    """The label file's passages as one held-out stream, each passage after an
    end-of-text token as documents are in training: ids (N,), character offsets (N, 2)
    into `text` (the passages joined by blank lines), the label of each token (N,) and
    its passage (N,; -1 for the separators)."""
    eot = int(tokens["train_ids"][-1])  # every training document ends with it
    encodings = tokenizer.encode_batch([p.text for p in passages], add_special_tokens=False)
    ids, offsets, labels, passage, text, at = [], [], [], [], [], 0
    for i, (p, enc) in enumerate(zip(passages, encodings, strict=True)):
        local = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
        ids += [eot, *enc.ids]
        offsets += [[at, at], *(local + at).tolist()]
        labels += [label_file.BACKGROUND, *label_file.align(local, p.spans)]
        passage += [-1] + [i] * len(enc.ids)
        text.append(p.text)
        at += len(p.text) + 2
    return {
        "ids": np.asarray(ids, dtype=np.int32),
        "offsets": np.asarray(offsets, dtype=np.int64),
        "text": "\n\n".join(text),
        "labels": np.asarray(labels, dtype=object),
        "passage": np.asarray(passage, dtype=np.int64),
    }


def label_windows(n: int, n_ctx: int, per_context: int) -> dict:
    """Contexts that make every token of a stream of `n` (but its first, an end-of-text
    token) an evaluation token exactly once, each with at least n_ctx - per_context
    tokens before it: windows of n_ctx + 1 tokens every `per_context` tokens, targets at
    their last `per_context` positions. Windows reach before the stream and past its end:
    `starts` index the stream padded with `front` end-of-text tokens before it and `back`
    after it (`_padded`); the few targets past its end are end-of-text, background."""
    front = n_ctx - per_context
    count = math.ceil((n - 1) / per_context)
    starts = np.arange(count) * per_context
    positions = np.tile(np.arange(front, n_ctx), (count, 1))
    return {"starts": starts, "positions": positions, "front": front, "back": count * per_context + 1 - n}


def _padded(stream: dict, front: int, back: int) -> dict:
    """`stream` with end-of-text tokens before and after it (background, no passage)."""
    eot, end = stream["ids"][0], len(stream["text"])

    def pad(key, before, after):
        return np.concatenate(
            [np.repeat([before], front, axis=0), stream[key], np.repeat([after], back, axis=0)]
        )

    return {
        "ids": pad("ids", eot, eot).astype(np.int32),
        "offsets": pad("offsets", [0, 0], [end, end]).reshape(-1, 2).astype(np.int64),
        "text": stream["text"],
        "labels": pad("labels", label_file.BACKGROUND, label_file.BACKGROUND).astype(object),
        "passage": pad("passage", -1, -1).astype(np.int64),
    }


def _first_visible(text: str, start: int, end: int) -> int:
    """Offset of a token's first non-space character (a newline counts as visible)."""
    for i in range(start, end):
        if not text[i].isspace() or text[i] == "\n":
            return i
    return start


def _cached(cache, stage: str, spec: dict, compute):
    if cache is None:
        return compute(), None
    return cache.get_or_compute(stage, spec, compute)
