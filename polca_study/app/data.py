"""`polca-study-data`: the text study's offline data, and label files made from it.

polca-study-data fetch [--data-dir DIR] [--deb FILE]      # Jane Austen's novels
polca-study-data copying OUT.jsonl [--passages 200] [--snippet-chars 150] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from polca_study.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="polca-study-data", description="The text study's offline data.")
    commands = parser.add_subparsers(dest="command", required=True)
    fetch = commands.add_parser("fetch", help="fetch the offline corpus (Jane Austen's novels)")
    fetch.add_argument(
        "--data-dir", type=Path, default=None, help="default: $POLCA_DATA_DIR or the user data dir"
    )
    fetch.add_argument("--deb", type=Path, help="a downloaded r-cran-janeaustenr .deb")
    copying = commands.add_parser(
        "copying", help="a label file of copying (A B ... A [B]) and novel words from held-out text"
    )
    copying.add_argument("out", type=Path, help="the label file to write (JSONL)")
    copying.add_argument("--passages", type=int, default=200)
    copying.add_argument(
        "--snippet-chars", type=int, default=150, help="characters of held-out text a passage repeats"
    )
    copying.add_argument(
        "--repeats", type=int, default=2, help="readings of the snippet (1: the text as it is)"
    )
    copying.add_argument("--val-fraction", type=float, default=0.05, help="the study's dataset.val_fraction")
    copying.add_argument("--seed", type=int, default=0)
    copying.add_argument(
        "--data-dir", type=Path, default=None, help="default: $POLCA_DATA_DIR or the user data dir"
    )
    args = parser.parse_args(argv)
    try:
        print(fetch_corpus(args) if args.command == "fetch" else write_copying(args), file=sys.stderr)
    except ConfigError as err:
        parser.exit(2, f"polca-study-data: {err}\n")


def fetch_corpus(args) -> str:
    from polca_study.tasks import corpus

    folder = corpus.fetch_austen(args.data_dir or corpus.default_data_dir(), args.deb)
    sizes = sum((folder / f"{n}.txt").stat().st_size for n in corpus.AUSTEN_BOOKS)
    return f"{folder}: {len(corpus.AUSTEN_BOOKS)} novels, {sizes / 1e6:.1f} MB"


def write_copying(args) -> str:
    from polca_study.errors import at_least
    from polca_study.tasks import copying, corpus, label_file
    from polca_study.tasks.text_data import split_document

    at_least("--passages", args.passages, 1)
    at_least("--snippet-chars", args.snippet_chars, 20)
    at_least("--repeats", args.repeats, 1)
    docs = corpus.load_documents("austen", args.data_dir, [], {}, None)
    # the held-out parts, cut as the study cuts them: a study never trains on these
    held_out = [split_document(d, args.val_fraction)[1] for d in docs]
    passages = copying.copy_passages(held_out, args.passages, args.snippet_chars, args.repeats, args.seed)
    label_file.write_labels(args.out, passages)
    counts = {name: sum(s.label == name for p in passages for s in p.spans) for name in ("copy", "novel")}
    return f"{args.out}: {len(passages)} passages, {counts['copy']} copy and {counts['novel']} novel words"


if __name__ == "__main__":
    main()
