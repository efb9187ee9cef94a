"""Loss-spike policy (as in OLMo / PaLM practice): skip bad updates, roll back on streaks.

PaLM (Chowdhery et al. 2022, §5.1) restarts from a checkpoint ~100 steps before a spike and
skips the batches that were fed around it; OLMo 2 (2024) skips updates whose loss or
gradient norm jumps. Here, per optimizer step:

* a non-finite loss or gradient norm is always skipped;
* after `spike_warmup_steps`, the step is skipped when loss > `spike_factor` x the running
  loss of good steps (a bias-corrected EMA, Kingma & Ba 2015 Alg. 1) or when the gradient
  norm (before clipping) exceeds `grad_norm_limit`;
* `max_consecutive_spikes` skipped steps in a row ask for a rollback to the last good
  checkpoint, whose replay then leaves out the offending samples (blacklist).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from planner.plan_sections import StabilitySection


@dataclass
class Decision:
    skip: bool
    reason: str | None = None
    rollback: bool = False
    running_loss: float | None = None


@dataclass
class SpikeDetector:
    """The plan's `stability:` limits and the running state they are checked against."""

    limits: StabilitySection = field(default_factory=StabilitySection)
    ema: float = 0.0
    n_good: int = 0
    consecutive: int = 0

    @classmethod
    def from_plan(cls, stability: StabilitySection) -> SpikeDetector:
        return cls(stability)

    @property
    def running_loss(self) -> float | None:
        if self.n_good == 0:
            return None
        # Bias-corrected EMA (Kingma & Ba 2015, Algorithm 1: m_t / (1 - beta^t)).
        return self.ema / (1.0 - self.limits.ema_beta ** self.n_good)

    def check(self, step: int, loss: float, grad_norm: float) -> Decision:
        """Decide for `step` (1-based) and update the state accordingly."""
        run = self.running_loss
        reason: str | None = None
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            reason = "nonfinite"
        elif step > self.limits.spike_warmup_steps:
            if run is not None and loss > self.limits.spike_factor * run:
                reason = "loss_spike"
            elif grad_norm > self.limits.grad_norm_limit:
                reason = "grad_norm"
        if reason is None:
            self.ema = self.limits.ema_beta * self.ema + (1.0 - self.limits.ema_beta) * loss
            self.n_good += 1
            self.consecutive = 0
            return Decision(skip=False, running_loss=self.running_loss)
        self.consecutive += 1
        rollback = self.consecutive >= self.limits.max_consecutive_spikes
        return Decision(skip=True, reason=reason, rollback=rollback, running_loss=run)

    def state_dict(self) -> dict[str, float | int]:
        return {"ema": self.ema, "n_good": self.n_good, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.ema = float(state["ema"])
        self.n_good = int(state["n_good"])
        self.consecutive = int(state["consecutive"])

