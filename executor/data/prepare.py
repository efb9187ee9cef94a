"""`meshplan data prepare`: documents -> locally trained BPE -> memory-mapped shards.

Also resolves which prepared dataset a plan trains on, preparing (and caching) the embedded
default corpus when the plan names no sources.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from costmodels.errors import MeshplanError
from executor.data.corpus import corpus_fingerprint, default_corpus
from executor.data.readers import iter_documents
from executor.data.shards import FORMAT, META_FILE, PreparedDataset, sha256_file, token_dtype
from executor.data.tokenizer import save_tokenizer, train_tokenizer

TOKENIZER_TRAIN_CHARS = 32_000_000  # beyond this the BPE is trained on an evenly spaced sample
_ENCODE_CHUNK = 128


def cache_root() -> Path:
    env = os.environ.get("MESHPLAN_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "meshplan"


def _progress(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TimeElapsedColumn(), disable=not enabled, transient=True,
    )


def _training_sample(docs: dict[str, list[str]]) -> list[str]:
    total = sum(len(t) for ds in docs.values() for t in ds)
    stride = max(1, -(-total // TOKENIZER_TRAIN_CHARS))
    return [t for ds in docs.values() for t in ds[::stride]]


def _collect_documents(sources: dict[str, Iterable[str]],
                       max_docs_per_domain: int | None) -> dict[str, list[str]]:
    """The non-empty documents of each domain (at most `max_docs_per_domain`)."""
    docs: dict[str, list[str]] = {}
    for name, it in sources.items():
        if not name.isidentifier():
            raise MeshplanError(f"domain name {name!r}: use letters, digits and _ only")
        items: list[str] = []
        for text in it:
            if text.strip():
                items.append(text)
            if max_docs_per_domain and len(items) >= max_docs_per_domain:
                break
        if not items:
            raise MeshplanError(f"domain {name!r}: no non-empty documents found in its source")
        docs[name] = items
    return docs


def _write_domain(tok: Any, name: str, items: list[str], tmp: Path, dtype: np.dtype, eot: int,
                  bar: Any) -> dict[str, object]:
    """One domain's token stream (`NAME.bin`, each document ending in <eot>) and its
    document offsets (`NAME.idx.npy`); returns its meta entry."""
    task = bar.add_task(f"tokenizing {name}", total=len(items))
    offsets = [0]
    with (tmp / f"{name}.bin").open("wb") as fh:
        for i in range(0, len(items), _ENCODE_CHUNK):
            chunk = items[i:i + _ENCODE_CHUNK]
            for enc in tok.encode_batch(chunk, add_special_tokens=False):
                arr = np.asarray(enc.ids + [eot], dtype=dtype)
                fh.write(arr.tobytes())
                offsets.append(offsets[-1] + len(arr))
            bar.advance(task, len(chunk))
    np.save(tmp / f"{name}.idx.npy", np.asarray(offsets, dtype=np.int64))
    return {"bin": f"{name}.bin", "idx": f"{name}.idx.npy", "docs": len(items), "tokens": offsets[-1]}


def prepare_dataset(
    sources: dict[str, Iterable[str]],
    out_dir: str | Path,
    vocab_size: int,
    max_docs_per_domain: int | None = None,
    progress: bool = True,
    fingerprint: str = "",
) -> Path:
    """Tokenize `sources` (domain -> documents) into `out_dir`, atomically (temp + rename).

    Returns `out_dir`. An existing prepared directory with the same fingerprint is reused.
    """
    out = Path(out_dir)
    if (out / META_FILE).is_file():
        meta = json.loads((out / META_FILE).read_text())
        if fingerprint and meta.get("fingerprint") == fingerprint:
            return out
        raise MeshplanError(
            f"{out}: already holds a different prepared dataset; choose another --out or "
            "delete it"
        )
    if out.exists() and any(out.iterdir()):
        raise MeshplanError(f"{out}: exists and is not empty; choose another --out")
    docs = _collect_documents(sources, max_docs_per_domain)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        with _progress(progress) as bar:
            task = bar.add_task("training BPE tokenizer", total=1)
            tok = train_tokenizer(_training_sample(docs), vocab_size)
            bar.advance(task)
            save_tokenizer(tok, tmp)
            actual_vocab = tok.get_vocab_size()
            dtype = token_dtype(actual_vocab)
            eot = tok.token_to_id("<eot>")
            meta_domains = {name: _write_domain(tok, name, items, tmp, dtype, eot, bar)
                            for name, items in docs.items()}
        files = ["tokenizer.json"] + [
            f for d in meta_domains.values() for f in (str(d["bin"]), str(d["idx"]))
        ]
        meta = {
            "format": FORMAT,
            "vocab_size": actual_vocab,
            "dtype": dtype.name,
            "fingerprint": fingerprint,
            "domains": meta_domains,
            "sha256": {f: sha256_file(tmp / f) for f in files},
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        try:
            if out.is_dir():
                out.rmdir()  # an empty folder the user created for the output
            os.replace(tmp, out)
        except OSError:
            if (out / META_FILE).is_file():  # a concurrent preparer won the race
                shutil.rmtree(tmp, ignore_errors=True)
                return out
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prepare_default_corpus(
    vocab_size: int, max_docs_per_domain: int, progress: bool = True
) -> Path:
    """The embedded corpus, prepared once per (Python version, vocab, size) and cached."""
    fp = f"default-{corpus_fingerprint()}-v{vocab_size}-d{max_docs_per_domain}"
    out = cache_root() / "corpus" / fp
    if (out / META_FILE).is_file():
        bad = _cache_damage(out)
        if not bad:
            return out
        # A cache is ours to rebuild: set the damaged copy aside and prepare it again (the
        # preparation is deterministic, so a resumed run sees the same tokens).
        print(f"warning: cached corpus {out} is damaged ({bad}); rebuilding it",
              file=sys.stderr)
        aside = out.with_name(f".{out.name}.damaged-{os.getpid()}")
        with contextlib.suppress(OSError):
            os.replace(out, aside)
        shutil.rmtree(aside, ignore_errors=True)
        if (out / META_FILE).is_file() and not _cache_damage(out):
            return out  # another process rebuilt it meanwhile
    return prepare_dataset(
        default_corpus(max_docs_per_domain), out, vocab_size, progress=progress, fingerprint=fp
    )


def _cache_damage(directory: Path) -> str | None:
    """Why a cached prepared folder cannot be trusted (a failing file), or None."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return f"{META_FILE} unreadable"
    sums = meta.get("sha256") if isinstance(meta, dict) else None
    if not isinstance(sums, dict) or not sums:
        return f"{META_FILE} lists no checksums"
    for name, digest in sums.items():
        p = directory / str(name)
        if not p.is_file() or sha256_file(p) != digest:
            return f"{name} fails its sha256 checksum"
    return None


def resolve_dataset(plan, run_dir: str | Path | None, progress: bool = True) -> PreparedDataset:
    """The prepared dataset a plan trains on (preparing it first when needed)."""
    data = plan.data
    vocab = data.tokenizer_vocab or int(plan.model["vocab"])
    if data.dataset_dir and (Path(data.dataset_dir) / META_FILE).is_file():
        ds = PreparedDataset(data.dataset_dir)
    elif not data.sources:
        ds = PreparedDataset(prepare_default_corpus(vocab, data.max_docs_per_domain, progress))
    else:
        paths = {Path(p) for p in data.sources.values()}
        prepared = [p for p in paths if (p / META_FILE).is_file()]
        if prepared and len(paths) == 1:
            ds = PreparedDataset(prepared[0])
        elif prepared:
            raise MeshplanError(
                "data.sources: mixes a prepared dataset with other paths; prepare all domains "
                "together with `meshplan data prepare` and point every domain at that folder"
            )
        else:
            target = Path(data.dataset_dir) if data.dataset_dir else (
                Path(run_dir) / "data" if run_dir else None)
            if target is None:
                raise MeshplanError("data.dataset_dir: needed to prepare data.sources; set it")
            fp = json.dumps({"sources": data.sources, "vocab": vocab,
                             "max_docs": data.max_docs_per_domain}, sort_keys=True)
            ds = PreparedDataset(prepare_dataset(
                {name: iter_documents(p) for name, p in data.sources.items()}, target, vocab,
                data.max_docs_per_domain, progress=progress, fingerprint=fp,
            ))
    missing = sorted(set(data.mixture) - set(ds.domains))
    if missing:
        raise MeshplanError(
            f"data.mixture: domain(s) {', '.join(missing)} not in the dataset at {ds.directory} "
            f"(has {', '.join(sorted(ds.domains))}); fix the mixture or data.sources"
        )
    if ds.vocab_size > int(plan.model["vocab"]):
        raise MeshplanError(
            f"model.vocab={plan.model['vocab']} is smaller than the tokenizer's {ds.vocab_size} "
            f"tokens at {ds.directory}; raise model.vocab or data.tokenizer_vocab"
        )
    return ds
