"""English corpora for the text study: documents as plain strings.

Three sources:
- `austen` (the offline default): Jane Austen's six novels as Debian's
  `r-cran-janeaustenr` package ships them (package MIT-licensed, the novels public domain,
  from Project Gutenberg), fetched on first use (or by `polca-study-data fetch`): the
  package comes with `apt-get download`, its R data files are read with the `rdata`
  library (no R needed) and one UTF-8 text file per novel is written into
  `<data dir>/austen/`. The data directory is the user's (platformdirs:
  `~/.local/share/polca-study` on Linux) unless `POLCA_DATA_DIR` or `dataset.data_dir`
  names another, so the study finds its corpus from any working directory.
- `files`: the user's own UTF-8 text files (paths or glob patterns), one document each.
- `huggingface`: a Hugging Face dataset (e.g. wikitext, TinyStories), with network access
  and the `hf` extra installed.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
import zlib
from pathlib import Path

from tqdm.auto import tqdm

from polca_study.atomic import write_atomic
from polca_study.errors import ConfigError, first_line

AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_BOOKS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
CORPORA = ("austen", "files", "huggingface")


class CorpusMissing(ConfigError):
    """The offline corpus is not where the settings say, and could not be fetched."""


def default_data_dir() -> Path:
    """`POLCA_DATA_DIR`, else the user's data directory for polca-study."""
    if os.environ.get("POLCA_DATA_DIR"):
        return Path(os.environ["POLCA_DATA_DIR"])
    import platformdirs

    return Path(platformdirs.user_data_dir("polca-study", appauthor=False))


def load_documents(
    source: str,
    data_dir: str | os.PathLike | None,
    files: list[str] | None = None,
    hf: dict | None = None,
    max_chars: int | None = None,
) -> list[str]:
    """The corpus as a list of documents (at most `max_chars` characters in all)."""
    if source == "austen":
        docs = austen(Path(data_dir) if data_dir else default_data_dir())
    elif source == "files":
        docs = read_files(files or [])
    elif source == "huggingface":
        docs = huggingface(**(hf or {}), max_chars=max_chars)
    else:
        raise ConfigError(f"dataset.source must be one of {list(CORPORA)}, got {source!r}")
    if max_chars is not None:
        docs = truncate(docs, max_chars)
    if not any(d.strip() for d in docs):
        raise ConfigError(f"the corpus of dataset.source={source!r} holds no text")
    return docs


def truncate(docs: list[str], max_chars: int) -> list[str]:
    out, total = [], 0
    for d in docs:
        if total >= max_chars:
            break
        out.append(d[: max_chars - total])
        total += len(out[-1])
    return out


def fingerprint(docs: list[str]) -> str:
    """Content hash of a corpus: the cache key of everything built from it."""
    h = hashlib.sha256()
    for d in docs:
        h.update(hashlib.sha256(d.encode()).digest())
    return h.hexdigest()[:16]


# -------------------------------------------------------------------------- austen


def austen(data_dir: Path) -> list[str]:
    """The six novels, fetched into `data_dir` on first use."""
    folder = data_dir / "austen"
    paths = [folder / f"{name}.txt" for name in AUSTEN_BOOKS]
    if not all(p.exists() for p in paths):
        try:
            fetch_austen(data_dir)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
            reason = first_line(err)
            raise CorpusMissing(
                f"the offline corpus is not in {folder} and could not be fetched ({reason}): "
                f"fetch it with `polca-study-data fetch --data-dir {data_dir}` (apt-get, "
                f"Debian's package lists), or offline with `--deb FILE` added, FILE a downloaded "
                f"{AUSTEN_PACKAGE} .deb; or set dataset.data_dir (env POLCA_DATA_DIR) to where it is"
            ) from err
    return [p.read_text(encoding="utf-8") for p in paths]


def reflow(lines: list[str]) -> str:
    """Gutenberg lines wrapped at ~70 columns -> paragraphs on one line, separated by a
    blank line, so newlines in the text mark paragraph breaks, not line wraps."""
    paragraphs, current = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            current.append(line)
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs) + "\n"


def read_r_lazyload(prefix: Path) -> dict[str, list[str]]:
    """Character vectors in an R package's lazy-load database (`prefix`.rdx/.rdb). Each
    object is a 4-byte length then a zlib stream of an R serialization."""
    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS"
        index = rdata.conversion.convert(rdata.parser.parse_data(prefix.with_suffix(".rdx").read_bytes()))
        db = prefix.with_suffix(".rdb").read_bytes()
        out = {}
        for name, (offset, length) in index["variables"].items():
            raw = zlib.decompress(db[offset + 4 : offset + length])
            out[str(name)] = [
                str(x) if x is not None else ""
                for x in rdata.conversion.convert(rdata.parser.parse_data(raw))
            ]
    return out


def fetch_austen(data_dir: Path, deb: Path | None = None) -> Path:
    """Write the six novels into `data_dir`/austen/ (idempotent; atomic per file)."""
    folder = data_dir / "austen"
    if all((folder / f"{n}.txt").exists() for n in AUSTEN_BOOKS):
        return folder
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        deb = deb or download_deb(AUSTEN_PACKAGE, tmp)
        folder.mkdir(parents=True, exist_ok=True)
        print(f"writing the offline corpus into {folder} (once)", file=sys.stderr)
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp / "x")], check=True)
        root = tmp / "x/usr/lib/R/site-library/janeaustenr"
        books = read_r_lazyload(root / "data/Rdata")
        for name in tqdm(AUSTEN_BOOKS, desc="austen", unit="novel", file=sys.stderr):
            text = reflow(books[name])
            write_atomic(folder / f"{name}.txt", lambda p, text=text: p.write_text(text, encoding="utf-8"))
        shutil.copy(tmp / f"x/usr/share/doc/{AUSTEN_PACKAGE}/copyright", folder / "COPYRIGHT")
    (folder / "SOURCE").write_text(
        f"Jane Austen's six novels (public domain, Project Gutenberg texts) from Debian's\n"
        f"{AUSTEN_PACKAGE} package (MIT, see COPYRIGHT), reflowed into paragraphs.\n"
    )
    return folder


def download_deb(package: str, dest: Path) -> Path:
    """`apt-get download` a .deb into dest; refresh the package lists once if needed."""
    if shutil.which("apt-get") is None:
        raise RuntimeError(f"apt-get is not available: fetch {package} by hand and pass --deb")
    for attempt in range(2):
        done = subprocess.run(["apt-get", "download", package], cwd=dest, capture_output=True, text=True)
        debs = list(dest.glob(f"{package}_*.deb"))
        if done.returncode == 0 and debs:
            return debs[0]
        if attempt == 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update", "-qq"], check=False, capture_output=True)
    # apt's own message is several lines; its last line says what went wrong
    last = (done.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"apt-get download {package} failed: {last}")


# ------------------------------------------------------------------- other sources


def read_files(patterns: list[str]) -> list[str]:
    paths = sorted({p for pat in patterns for p in glob.glob(os.path.expanduser(pat), recursive=True)})
    if not paths:
        raise ConfigError(f"dataset.files matched no files: {patterns}")
    return [Path(p).read_text(encoding="utf-8", errors="replace") for p in paths]


def huggingface(
    name: str | None = None,
    config: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_chars: int | None = None,
) -> list[str]:
    """Documents of a Hugging Face dataset, streamed until `max_chars`."""
    if not name:
        raise ConfigError("dataset.hf_name must name a Hugging Face dataset for source=huggingface")
    try:
        from datasets import load_dataset
    except ImportError as err:
        raise ImportError("dataset.source=huggingface needs `pip install -e .[hf]`") from err
    docs, total = [], 0
    for row in load_dataset(name, config, split=split, streaming=True):
        text = row[text_field]
        docs.append(text)
        total += len(text)
        if max_chars is not None and total >= max_chars:
            break
    return docs
