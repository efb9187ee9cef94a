"""Planted faults for testing the stability policy (`meshplan run --inject-fault KIND@STEP`).

* ``nan@S``: step S's loss is multiplied by NaN once.
* ``spike@S``: the samples step S consumes are poisoned: any batch holding one of them has
  its loss scaled by SPIKE_SCALE (a data-borne spike, so a replay that blacklists them is
  clean again).
* ``garbage@S``: the samples of step S are poisoned with uniformly random tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from costmodels.errors import MeshplanError
from executor.data.batch import IGNORE_INDEX, Batch

KINDS = ("nan", "spike", "garbage")
SPIKE_SCALE = 1000.0


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int

    @classmethod
    def parse(cls, text: str) -> Fault:
        kind, sep, step = text.partition("@")
        if not sep or kind not in KINDS or not step.isdigit() or int(step) < 1:
            raise MeshplanError(
                f"--inject-fault {text!r}: expected KIND@STEP with KIND one of "
                f"{', '.join(KINDS)} and STEP >= 1, e.g. spike@25"
            )
        return cls(kind, int(step))


@dataclass
class FaultInjector:
    faults: list[Fault] = field(default_factory=list)
    vocab_size: int = 256
    poisoned: dict[int, str] = field(default_factory=dict)
    fired: set[Fault] = field(default_factory=set)

    def apply(self, step: int, batch: Batch) -> tuple[Batch, list[str]]:
        """The batch as step `step` sees it, and the faults that touched it."""
        notes: list[str] = []
        for f in self.faults:
            if f.step != step or f in self.fired:
                continue
            self.fired.add(f)
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
