"""Per-step phase timing: host timers on the CPU, CUDA events on a GPU (kernels run
asynchronously, so a host clock read between phases would charge one phase's GPU work to the
next). One synchronize per step, at its end."""

from __future__ import annotations

import time

import torch


class PhaseTimer:
    """`mark(name)` at each phase boundary, then `durations()` gives the seconds between
    consecutive marks, keyed by the later mark's name."""

    def __init__(self, device: torch.device | str) -> None:
        self.cuda = torch.device(device).type == "cuda" and torch.cuda.is_available()
        self.marks: list[tuple[str, float, object]] = []

    def mark(self, name: str) -> None:
        event = None
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
        self.marks.append((name, time.perf_counter(), event))

    def durations(self) -> dict[str, float]:
        if self.cuda and self.marks:
            self.marks[-1][2].synchronize()  # type: ignore[union-attr]
        out: dict[str, float] = {}
        for (_, t0, e0), (name, t1, e1) in zip(self.marks, self.marks[1:], strict=False):
            if self.cuda:
                out[name] = e0.elapsed_time(e1) / 1000.0  # type: ignore[union-attr]
            else:
                out[name] = t1 - t0
        return out
