"""A user's skills as a file (`dataset.labels=PATH`): passages of text with labelled
character spans, aligned to the study's tokens by offset mapping.

Three forms, one row per passage:
- JSONL: `{"text": "...", "spans": [{"start": 0, "end": 5, "label": "name"}, ...]}`,
  character offsets into `text`, `end` exclusive (spaCy's and Prodigy's spans);
- JSONL, pre-tokenized: `{"tokens": ["Mary", "had", ...], "labels": ["name", null, ...]}`
  (Hugging Face token classification); the tokens are joined with single spaces and
  each labelled one becomes a span, so either form is tokenized by the study's tokenizer;
- a Parquet file or a local Hugging Face `datasets` directory (`save_to_disk`) with the
  same columns.

The whole file is read and checked before any work: a bad row is refused in one line
that names the file, the line (or row) and the field.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polca_study.errors import ConfigError, first_line

# the label of a token in no span (analysis.skills.BACKGROUND; not imported from there,
# which would bring scikit-learn into a settings check)
BACKGROUND = ""

# a pre-tokenized word with one of these labels is background (CoNLL's "O" included)
UNLABELLED = (None, "", "O")
FORMS = {"spans": ("text", "spans"), "tokens": ("tokens", "labels")}
SPAN_KEYS = ("start", "end", "label")
# label names become metric names (label_<name>_recovery) and W&B keys
NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Span:
    start: int  # character offsets into the passage's text, end exclusive
    end: int
    label: str


@dataclass(frozen=True)
class Passage:
    text: str
    spans: tuple[Span, ...]  # sorted by start, disjoint


def read_labels(path: str | Path) -> list[Passage]:
    """Every passage of a label file, checked; a ConfigError names the first bad field.
    Read once per version of the file: the settings check and the data share it."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"dataset.labels={path}: no such file or directory")
    stat = p.stat()
    return list(_read(p, stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=4)
def _read(p: Path, mtime_ns: int, size: int) -> tuple[Passage, ...]:
    """(mtime and size are the cache key: an edited file is read again)"""
    if p.is_dir():
        rows = _table_rows(p, _hf_records(p))
    elif p.suffix == ".parquet":
        rows = _table_rows(p, _parquet_records(p))
    else:
        rows = _jsonl_rows(p)
    passages = [_passage(where, row) for where, row in rows]
    if not passages:
        raise ConfigError(f"{p}: the label file is empty: it needs one passage a line")
    if not any(passage.spans for passage in passages):
        raise ConfigError(f"{p}: no passage has a labelled span: every token would be background")
    return tuple(passages)


def label_names(passages: list[Passage]) -> list[str]:
    return sorted({s.label for p in passages for s in p.spans})


def digest(passages: list[Passage]) -> str:
    """The passages by content (for cache keys): where the file lives does not matter."""
    canon = [[p.text, [[s.start, s.end, s.label] for s in p.spans]] for p in passages]
    return hashlib.sha256(json.dumps(canon, ensure_ascii=False).encode()).hexdigest()[:20]


def align(offsets: np.ndarray, spans: tuple[Span, ...]) -> np.ndarray:
    """The label of each token (N,) from its character span `offsets` (N, 2): the span it
    overlaps most (a byte-level token " Mary" overlaps the span "Mary"), background
    when it overlaps none; an empty token (an added special token) is background."""
    out = np.full(len(offsets), BACKGROUND, dtype=object)
    if not spans or not len(offsets):
        return out
    start, end = offsets[:, 0:1], offsets[:, 1:2]  # (N, 1)
    s = np.array([[sp.start for sp in spans]])  # (1, K)
    e = np.array([[sp.end for sp in spans]])
    overlap = np.minimum(end, e) - np.maximum(start, s)  # (N, K)
    best = overlap.argmax(axis=1)
    hit = overlap[np.arange(len(offsets)), best] > 0
    names = np.array([sp.label for sp in spans], dtype=object)
    out[hit] = names[best[hit]]
    return out


def write_labels(path: Path, passages: list[Passage]) -> None:
    """A label file in the JSONL span form, written atomically."""
    from polca_study.atomic import write_text_atomic

    lines = [
        json.dumps(
            {"text": p.text, "spans": [{"start": s.start, "end": s.end, "label": s.label} for s in p.spans]},
            ensure_ascii=False,
        )
        for p in passages
    ]
    write_text_atomic(path, "\n".join(lines) + "\n")


# ------------------------------------------------------------------------- reading


def _jsonl_rows(p: Path):
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"dataset.labels={p}: cannot be read: {first_line(err)}") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{p}:{number}: not a JSON object: {err.msg} (column {err.colno})") from None
        if not isinstance(row, dict):
            raise ConfigError(f"{p}:{number}: not a JSON object but {type(row).__name__}")
        yield f"{p}:{number}", row


def _parquet_records(p: Path) -> list[dict]:
    import pandas as pd

    try:
        return pd.read_parquet(p).to_dict("records")
    except Exception as err:  # pyarrow's errors have no common base worth naming
        raise ConfigError(f"dataset.labels={p}: not a readable Parquet file: {first_line(err)}") from None


def _hf_records(p: Path) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise ConfigError(
            f"dataset.labels={p} is a directory, read as a Hugging Face dataset: "
            "install the hf extra (pip install 'polca-study[hf]')"
        ) from None
    try:
        data = datasets.load_from_disk(str(p))
    except (FileNotFoundError, ValueError, OSError) as err:
        raise ConfigError(
            f"dataset.labels={p}: not a Hugging Face dataset saved with save_to_disk: {first_line(err)}"
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise ConfigError(
                f"dataset.labels={p} holds the splits {sorted(data)}: point it at one split's directory"
            )
        data = next(iter(data.values()))
    return data.to_list()


def _table_rows(p: Path, records: list[dict]):
    for i, row in enumerate(records):
        yield f"{p} row {i}", {k: _plain(v) for k, v in row.items()}


def _plain(value):
    """Arrow's arrays and NumPy scalars as the JSON values they stand for."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and value != value:  # a missing cell
        return None
    return value


# ------------------------------------------------------------------------ checking


def _passage(where: str, row: dict) -> Passage:
    form = "tokens" if "tokens" in row or "labels" in row else "spans"
    allowed = FORMS[form]
    for key in row:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown column {key!r}: a passage has text and spans, or tokens and labels"
            )
    for key in allowed:
        if key not in row or row[key] is None:
            raise ConfigError(f"{where}: {key}: missing (a {form} passage has {' and '.join(allowed)})")
    return _from_tokens(where, row["tokens"], row["labels"]) if form == "tokens" else _from_spans(where, row)


def _from_spans(where: str, row: dict) -> Passage:
    text, raw = row["text"], row["spans"]
    if not isinstance(text, str) or not text:
        raise ConfigError(f"{where}: text: must be a non-empty string")
    if not isinstance(raw, list):
        raise ConfigError(f"{where}: spans: must be a list of {{start, end, label}}")
    spans = []
    for i, span in enumerate(raw):
        field = f"spans[{i}]"
        if not isinstance(span, dict):
            raise ConfigError(f"{where}: {field}: must be an object with start, end and label")
        for key in span:
            if key not in SPAN_KEYS:
                raise ConfigError(f"{where}: {field}.{key}: unknown field (a span has start, end, label)")
        for key in SPAN_KEYS:
            if key not in span:
                raise ConfigError(f"{where}: {field}.{key}: missing")
        start, end = span["start"], span["end"]
        for key, value in (("start", start), ("end", end)):
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"{where}: {field}.{key}: must be an integer, got {value!r}")
        if not 0 <= start < end:
            raise ConfigError(f"{where}: {field}: needs 0 <= start < end, got start={start}, end={end}")
        if end > len(text):
            raise ConfigError(
                f"{where}: {field}.end: {end} is past the end of its text ({len(text)} characters)"
            )
        spans.append(Span(start, end, _name(where, f"{field}.label", span["label"])))
    spans.sort(key=lambda s: (s.start, s.end))
    for a, b in zip(spans, spans[1:], strict=False):
        if b.start < a.end:
            raise ConfigError(
                f"{where}: spans: [{a.start}, {a.end}) {a.label!r} and [{b.start}, {b.end}) "
                f"{b.label!r} overlap: a token has one label"
            )
    return Passage(text, tuple(spans))


def _from_tokens(where: str, tokens, labels) -> Passage:
    if not isinstance(tokens, list) or not tokens:
        raise ConfigError(f"{where}: tokens: must be a non-empty list of strings")
    if not isinstance(labels, list) or len(labels) != len(tokens):
        n = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise ConfigError(f"{where}: labels: must be a list as long as tokens ({len(tokens)}), got {n}")
    spans, at = [], 0
    for i, (token, label) in enumerate(zip(tokens, labels, strict=True)):
        if not isinstance(token, str) or not token:
            raise ConfigError(f"{where}: tokens[{i}]: must be a non-empty string, got {token!r}")
        if label not in UNLABELLED:
            spans.append(Span(at, at + len(token), _name(where, f"labels[{i}]", label)))
        at += len(token) + 1
    return Passage(" ".join(tokens), tuple(spans))


def _name(where: str, field: str, label) -> str:
    if not isinstance(label, str) or not NAME.match(label):
        raise ConfigError(
            f"{where}: {field}: a label is a name of letters, digits, '_', '.' or '-', got {label!r}"
        )
    return label
