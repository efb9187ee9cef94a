"""Planted faults for testing the stability policy (`meshplan run --inject-fault KIND@STEP`).

* ``nan@S``: step S's loss is multiplied by NaN once.
* ``spike@S``: the samples step S consumes are poisoned: any batch holding one of them has
  its loss scaled by SPIKE_SCALE (a data-borne spike, so a replay that blacklists them is
  clean again).
* ``garbage@S``: the samples of step S are poisoned with uniformly random tokens.
* ``nangrad@S``: after step S's backward, this rank's first gradient is NaN: a fault local
  to one rank or pipeline stage (a bad device, a corrupted buffer) that nothing propagates.

Any kind takes an optional ``:R`` suffix (``nan@S:1``) that plants it on data-parallel
process rank R only (env ``RANK``), e.g. a NaN in one rank's gradients: the skip decision
is taken on the all-reduced loss and gradient norm, so every rank must skip that step.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace

import torch

from costmodels.errors import MeshplanError
from executor.data.batch import IGNORE_INDEX, Batch

KINDS = ("nan", "spike", "garbage", "nangrad")
SPIKE_SCALE = 1000.0


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int | None = None  # None: every rank

    @classmethod
    def parse(cls, text: str) -> Fault:
        kind, sep, rest = text.partition("@")
        step, colon, rank = rest.partition(":")
        ok = (sep and kind in KINDS and step.isascii() and step.isdigit() and int(step) >= 1
              and (not colon or (rank.isascii() and rank.isdigit())))
        if not ok:
            raise MeshplanError(
                f"--inject-fault {text!r}: expected KIND@STEP[:RANK] with KIND one of "
                f"{', '.join(KINDS)}, STEP >= 1 and RANK >= 0, e.g. spike@25 or nan@5:1"
            )
        return cls(kind, int(step), int(rank) if colon else None)


def _env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


@dataclass
class FaultInjector:
    faults: list[Fault] = field(default_factory=list)
    vocab_size: int = 256
    poisoned: dict[int, str] = field(default_factory=dict)
    fired: set[Fault] = field(default_factory=set)
    rank: int = field(default_factory=_env_rank)

    def apply(self, step: int, batch: Batch) -> tuple[Batch, list[str]]:
        """The batch as step `step` sees it, and the faults that touched it."""
        notes: list[str] = []
        for f in self.faults:
            if f.step != step or f in self.fired or f.kind == "nangrad":
                continue
            self.fired.add(f)
            if f.rank is not None and f.rank != self.rank:
                continue
            if f.kind == "nan":
                batch = replace(batch, loss_weight=float("nan"))
                notes.append("nan")
            else:
                for s in batch.sample_ids.tolist():
                    self.poisoned[int(s)] = f.kind
        ids = batch.sample_ids.tolist()
        kinds = {self.poisoned.get(int(s)) for s in ids} - {None}
        if "spike" in kinds:
            batch = replace(batch, loss_weight=batch.loss_weight * SPIKE_SCALE)
            notes.append("spike")
        if "garbage" in kinds:
            rows = torch.tensor([self.poisoned.get(int(s)) == "garbage" for s in ids])
            gen = torch.Generator().manual_seed(step)
            noise = torch.randint(0, self.vocab_size, batch.input_ids.shape, generator=gen)
            input_ids = torch.where(rows[:, None], noise, batch.input_ids)
            shifted = torch.roll(noise, -1, dims=1)
            labels = torch.where(rows[:, None] & (batch.labels != IGNORE_INDEX), shifted,
                                 batch.labels)
            batch = replace(batch, input_ids=input_ids, labels=labels)
            notes.append("garbage")
        return batch, notes

    def corrupt_grads(self, step: int, params) -> list[str]:
        """Fire step `step`'s `nangrad` faults of this rank on the gradients of `params`."""
        hit = [f for f in self.faults if f.kind == "nangrad" and f.step == step
               and f not in self.fired and f.rank in (None, self.rank)]
        if not hit:
            return []
        self.fired.update(hit)
        first = next(iter(params), None)
        if first is None:  # no gradient held here (DeepSpeed keeps its own; refused in `meshplan run`)
            return []
        with torch.no_grad():
            first.grad.fill_(float("nan"))
        return ["nangrad"]
