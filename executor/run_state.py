"""A run's own state between steps: what a resume needs besides the model and optimizer
(`TrainState`), the stop request SIGTERM / SIGINT make (`StopFlag`), and seeding."""

from __future__ import annotations

import random
import signal
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resume needs."""

    step: int = 0  # optimizer steps completed (skipped ones included)
    tokens: int = 0  # tokens consumed
    cursor: int = 0  # next sample id of the data stream
    blacklist: set[int] = field(default_factory=set)
    rollbacks: int = 0
    skipped: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "tokens": self.tokens, "cursor": self.cursor,
            "blacklist": sorted(self.blacklist), "rollbacks": self.rollbacks,
            "skipped": self.skipped,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> TrainState:
        return cls(
            step=int(d["step"]), tokens=int(d["tokens"]), cursor=int(d["cursor"]),
            blacklist={int(x) for x in d.get("blacklist", [])},
            rollbacks=int(d.get("rollbacks", 0)), skipped=int(d.get("skipped", 0)),
        )


class StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and exit after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:  # second signal: give up at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
