"""`meshplan data prepare`: tokenize documents into memory-mapped shards."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from costmodels.errors import MeshplanError
from planner.cli import add_action_command


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = add_action_command(subparsers, "data", "prepare training data")
    prep = sub.add_parser(
        "prepare", help="text / JSONL / Parquet -> local BPE + token shards",
        description="Train a byte-level BPE on the documents and write memory-mapped token "
                    "shards with a document index. Without --source, the embedded default "
                    "corpus (the Python standard library's source and reference docs).",
    )
    prep.add_argument("--out", required=True, help="dataset folder to create")
    prep.add_argument("--source", action="append", default=[], metavar="DOMAIN=PATH",
                      help="a domain and its file or folder (.txt/.py/.md..., .jsonl, "
                           ".parquet); repeatable")
    prep.add_argument("--vocab", type=int, default=8192, help="BPE vocabulary size")
    prep.add_argument("--max-docs", type=int, default=None, help="documents per domain cap")
    prep.add_argument("--text-field", default=None,
                      help="JSONL key / Parquet column holding the text (default: text)")
    prep.add_argument("--no-progress", action="store_true")
    prep.set_defaults(func=handle_prepare)


def handle_prepare(args: argparse.Namespace) -> int:
    from executor.data.corpus import corpus_fingerprint, default_corpus
    from executor.data.prepare import prepare_dataset
    from executor.data.readers import iter_documents
    from executor.data.shards import PreparedDataset

    if args.max_docs is not None and args.max_docs < 1:
        raise MeshplanError("--max-docs: must be >= 1")
    if args.source:
        sources = {}
        for item in args.source:
            name, sep, path = item.partition("=")
            if not sep or not name or not path:
                raise MeshplanError(f"--source {item!r}: expected DOMAIN=PATH, e.g. code=src/")
            if name in sources:
                raise MeshplanError(f"--source {name}: domain given twice; merge the paths")
            if not Path(path).exists():
                raise MeshplanError(f"--source {item}: {path} not found")
            sources[name] = iter_documents(path, args.text_field)
        fp = json.dumps({"sources": args.source, "vocab": args.vocab, "max_docs": args.max_docs})
    else:
        sources = default_corpus(args.max_docs or 4000)
        fp = f"default-{corpus_fingerprint()}-v{args.vocab}-d{args.max_docs or 4000}"
    from executor.dir_lock import sibling_lock

    with sibling_lock(args.out, "--out"):  # the folder itself appears whole, by rename
        out = prepare_dataset(sources, args.out, args.vocab, args.max_docs,
                              progress=not args.no_progress, fingerprint=fp)
    ds = PreparedDataset(out)
    for name, info in ds.summary().items():
        print(f"{name}: {info['docs']} documents, {info['tokens']} tokens")
    print(f"vocab {ds.vocab_size}; wrote {out}")
    return 0
