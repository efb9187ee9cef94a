"""Memory-mapped token shards with a document index.

A prepared dataset directory holds, for each domain, ``DOMAIN.bin`` (every document's
tokens followed by ``<eot>``, concatenated, uint16 when the vocabulary fits, else uint32)
and ``DOMAIN.idx.npy`` (int64 start offset of each document, plus the total at the end),
the tokenizer (``tokenizer.json``) and ``meta.json`` (counts, dtype, sha256 of each file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from costmodels.errors import MeshplanError
from executor.data.tokenizer import Specials, load_tokenizer, specials_of

FORMAT = "meshplan-shards-v1"
META_FILE = "meta.json"


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max + 1 else np.dtype(np.uint32)


@dataclass
class DomainShard:
    name: str
    tokens: np.ndarray  # memmap, 1-D
    offsets: np.ndarray  # int64 [docs + 1]

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])


class PreparedDataset:
    """A prepared directory opened read-only (token files memory-mapped)."""

    def __init__(self, directory: str | Path, verify: bool = True) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_FILE
        if not meta_path.is_file():
            raise MeshplanError(
                f"{self.directory}: not a prepared dataset (no {META_FILE}); "
                "run `meshplan data prepare` first"
            )
        try:
            self.meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MeshplanError(f"{meta_path}: corrupt; re-run `meshplan data prepare`") from None
        if not isinstance(self.meta, dict) or self.meta.get("format") != FORMAT:
            fmt = self.meta.get("format") if isinstance(self.meta, dict) else None
            raise MeshplanError(f"{meta_path}: format {fmt!r} is not {FORMAT}")
        if verify:
            bad = self.verify()
            if bad:
                raise MeshplanError(
                    f"{self.directory / bad[0]}: fails its sha256 checksum in {META_FILE} "
                    "(corrupted or changed shard); re-run `meshplan data prepare` into a new "
                    "folder"
                )
        try:
            self._open()
        except (KeyError, TypeError, ValueError, OSError, EOFError) as exc:
            first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else \
                type(exc).__name__
            raise MeshplanError(
                f"{self.directory}: unreadable prepared dataset ({first}); re-run "
                "`meshplan data prepare` into a new folder"
            ) from None

    def _open(self) -> None:
        self.tokenizer: Tokenizer = load_tokenizer(self.directory)
        self.specials: Specials = specials_of(self.tokenizer)
        self.vocab_size: int = int(self.meta["vocab_size"])
        dtype = np.dtype(self.meta["dtype"])
        self.domains: dict[str, DomainShard] = {}
        for name, info in self.meta["domains"].items():
            bin_path = self.directory / info["bin"]
            idx_path = self.directory / info["idx"]
            offsets = np.load(idx_path, allow_pickle=False)
            if offsets.ndim != 1 or len(offsets) < 1 or offsets.dtype.kind not in "iu" \
                    or np.any(np.diff(offsets) < 0) or offsets[0] != 0:
                raise MeshplanError(
                    f"{idx_path}: not a document index; re-run `meshplan data prepare`"
                )
            if bin_path.stat().st_size != int(offsets[-1]) * dtype.itemsize:
                raise MeshplanError(
                    f"{bin_path}: size does not match its index; re-run `meshplan data prepare`"
                )
            tokens = np.memmap(bin_path, dtype=dtype, mode="r") if offsets[-1] else np.zeros(
                0, dtype)
            self.domains[name] = DomainShard(name, tokens, offsets)

    def verify(self) -> list[str]:
        """Checksums of every file against meta.json; returns the names that differ."""
        bad = []
        sums = self.meta.get("sha256", {})
        for name, digest in (sums.items() if isinstance(sums, dict) else []):
            p = self.directory / str(name)
            if not p.is_file() or sha256_file(p) != digest:
                bad.append(str(name))
        return bad

    def summary(self) -> dict[str, dict[str, int]]:
        return {n: {"docs": d.num_docs, "tokens": d.num_tokens} for n, d in self.domains.items()}
