"""Deterministic packed loader: the global batch of a step from (seed, sample index) alone.

Row `g` of the stream (its *sample id*) is built from its own generator seeded with
(seed, split, g): it picks a domain with the mixture's weights, then a window of T+1
tokens starting at a uniformly random token of that domain's documents (so documents are
sampled in proportion to their length, as in concatenate-and-chunk packing), and applies
the objective. Documents inside a window are separated by `doc_ids`; positions restart at
each document. The loader's only state is a cursor (the next sample id) plus a blacklist
of sample ids to never serve, so a checkpoint resumes it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from costmodels.errors import MeshplanError
from executor.data.batch import Batch
from executor.data.objectives import clm_labels, fim_transform, mlm_mask
from executor.data.shards import PreparedDataset

_TRAIN, _EVAL = 0, 1


@dataclass
class _Region:
    """The contiguous token range of one domain a split samples from."""

    name: str
    tokens: np.ndarray
    offsets: np.ndarray  # doc starts within `tokens` (absolute), plus the end
    lo: int
    hi: int


@dataclass
class LoaderConfig:
    seq_len: int
    rows: int  # rows per global batch
    objective: str = "clm"
    seed: int = 0
    mixture: dict[str, float] = field(default_factory=lambda: {"code": 1.0})
    mlm_probability: float = 0.15
    fim_rate: float = 0.5
    fim_spm_rate: float = 0.5
    heldout_docs: int = 0


class PackedLoader:
    def __init__(self, dataset: PreparedDataset, cfg: LoaderConfig, split: str = "train"):
        if cfg.objective not in ("clm", "mlm", "fim"):
            raise MeshplanError(f"train.objective={cfg.objective!r}: must be clm, mlm or fim")
        self.ds = dataset
        self.cfg = cfg
        self.split = _TRAIN if split == "train" else _EVAL
        self.specials = dataset.specials
        names = [n for n, w in cfg.mixture.items() if w > 0]
        weights = np.asarray([cfg.mixture[n] for n in names], dtype=np.float64)
        self.weights = weights / weights.sum()
        self.regions = [self._region(n) for n in names]

    def _region(self, name: str) -> _Region:
        shard = self.ds.domains[name]
        n = shard.num_docs
        held = min(self.cfg.heldout_docs, n // 2)
        cut = int(shard.offsets[n - held]) if held else shard.num_tokens
        lo, hi = (0, cut) if self.split == _TRAIN else (cut, shard.num_tokens)
        need = self.cfg.seq_len + 1
        if hi - lo < need:
            part = "training" if self.split == _TRAIN else "held-out"
            raise MeshplanError(
                f"data domain {name!r}: only {hi - lo} {part} tokens, need >= {need} "
                "(seq_len + 1); add documents or lower data.heldout_docs"
            )
        return _Region(name, shard.tokens, shard.offsets, lo, hi)

    # ----------------------------------------------------------------- rows
    def _rng(self, sample_id: int) -> np.random.Generator:
        return np.random.default_rng([self.cfg.seed, self.split, sample_id])

    def domain_of(self, sample_id: int) -> str:
        """The mixture domain row `sample_id` is drawn from (its generator's first draw)."""
        return self.regions[self._pick_region(self._rng(sample_id))].name

    def _pick_region(self, rng: np.random.Generator) -> int:
        # Domain mixture sampling by weight, one domain per row (as in DoReMi, Xie et al. 2023).
        return int(rng.choice(len(self.regions), p=self.weights))

    def row(self, sample_id: int) -> tuple[np.ndarray, ...]:
        """(input_ids, labels, position_ids, doc_ids) of one row, each [T]."""
        rng = self._rng(sample_id)
        region = self.regions[self._pick_region(rng)]
        t = self.cfg.seq_len
        start = int(rng.integers(region.lo, region.hi - (t + 1) + 1))
        window = np.asarray(region.tokens[start:start + t + 1], dtype=np.int64)
        # Document starts strictly inside the window cut it into segments.
        first = int(np.searchsorted(region.offsets, start, side="right"))
        last = int(np.searchsorted(region.offsets, start + t + 1, side="left"))
        cuts = region.offsets[first:last] - start
        obj = self.cfg.objective
        if obj == "fim":
            window, cuts = self._fim(window, cuts, rng)
        doc = np.searchsorted(cuts, np.arange(t + 1), side="right").astype(np.int64)
        if obj == "mlm":
            ids, labels = mlm_mask(window[:t], rng, self.specials, self.ds.vocab_size,
                                   self.cfg.mlm_probability)
            doc = doc[:t]
        else:
            ids = window[:t]
            labels = clm_labels(window, doc, pad=self.specials.pad)
            doc = doc[:t]
        pos = _positions(doc)
        return ids, labels, pos, doc

    def _fim(self, window: np.ndarray, cuts: np.ndarray,
             rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        need = len(window)
        bounds = [0, *cuts.tolist(), need]
        out: list[int] = []
        new_cuts: list[int] = []
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            if len(out) >= need:
                break
            if out:
                new_cuts.append(len(out))
            seg = window[a:b]
            if rng.random() < self.cfg.fim_rate and len(seg) > 1:
                out.extend(fim_transform(seg, rng, self.ds.tokenizer, self.specials,
                                         self.cfg.fim_spm_rate))
            else:
                out.extend(seg.tolist())
        if len(out) < need:  # re-tokenized parts came out shorter: pad (no loss there)
            new_cuts.append(len(out))
            out.extend([self.specials.pad] * (need - len(out)))
        return np.asarray(out[:need], dtype=np.int64), np.asarray(new_cuts, dtype=np.int64)

    # ----------------------------------------------------------------- batches
    def batch_from_ids(self, sample_ids: list[int]) -> Batch:
        rows = [self.row(s) for s in sample_ids]
        ids, labels, pos, doc = (np.stack(parts) for parts in zip(*rows, strict=True))
        return Batch(
            input_ids=torch.from_numpy(ids),
            labels=torch.from_numpy(labels),
            position_ids=torch.from_numpy(pos),
            doc_ids=torch.from_numpy(doc),
            sample_ids=torch.tensor(sample_ids, dtype=torch.long),
        )

    def next_ids(self, cursor: int, blacklist: set[int] | frozenset[int] = frozenset(),
                 rows: int | None = None) -> tuple[list[int], int]:
        """The next `rows` sample ids at or after `cursor` that are not blacklisted."""
        want = self.cfg.rows if rows is None else rows
        ids: list[int] = []
        while len(ids) < want:
            if cursor not in blacklist:
                ids.append(cursor)
            cursor += 1
        return ids, cursor

    def global_batch(self, cursor: int,
                     blacklist: set[int] | frozenset[int] = frozenset()) -> tuple[Batch, int]:
        """The global batch starting at `cursor` and the cursor after it."""
        ids, nxt = self.next_ids(cursor, blacklist)
        return self.batch_from_ids(ids), nxt


def _positions(doc: np.ndarray) -> np.ndarray:
    """0, 1, 2, ... restarting wherever the document id changes."""
    idx = np.arange(len(doc))
    starts = np.r_[0, np.flatnonzero(doc[1:] != doc[:-1]) + 1]
    return idx - np.repeat(starts, np.diff(np.r_[starts, len(doc)]))

