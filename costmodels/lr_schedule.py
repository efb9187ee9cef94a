"""The learning-rate schedule of a plan, as a pure function (no torch).

One definition shared by the planner (curves, advice, emitters) and the executor's LR
scheduler, so the plan's `train` section means exactly one curve. Semantics follow
`planner.planfile.TrainSection`:

* `step` is the 0-based index of the optimizer update (the LR used for update `step + 1`).
* warmup: `W = warmup_steps or round(warmup_frac * max_steps)`; for `step < W` the LR rises
  linearly, `lr * (step + 1) / W`, so the first update is never taken at LR 0 and update
  `W - 1` uses the full `lr` (linear warmup, Goyal et al. 2017 §2.2).
* `cosine`: after warmup, `min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2` with
  `p = (step - W) / (max_steps - 1 - W)`, so the last update (`max_steps - 1`) uses exactly
  `min_lr` (Loshchilov & Hutter 2017, SGDR eq. 5, one cycle, no restart).
* `wsd`: warmup, then constant `lr` (the stable phase), then the last
  `K = round(wsd_decay_frac * max_steps)` updates decay linearly to `min_lr`:
  `lr - (lr - min_lr) * (step - (max_steps - K) + 1) / K`, reaching `min_lr` at the last
  update (warmup-stable-decay, Hu et al. 2024 MiniCPM §4.1; linear decay as in Hägele et al.
  2024). The decay never starts before warmup ends.
* `constant`: warmup, then `lr`.
* `min_lr` defaults to `lr / 10` (`TrainSection.resolved_min_lr`).
* Steps at or past `max_steps` keep the final value.

Continual pretraining (`continual_schedule`) adds, without changing the above:

* re-warmup: a run initialised from a checkpoint starts its step count at 0 and warms up
  again, from `warmup_start_lr` (default 0) to a peak of `lr x lr_fraction` (Gupta et al.
  2023, "Continual Pre-Training of LLMs: How to (re)warm your model?"; Ibrahim et al. 2024
  §5 re-warm and re-decay; peaks of 1/10-1/3 of the original limit forgetting); `min_lr`
  scales by the same fraction;
* an explicit WSD decay length `wsd_decay_steps` (overrides `wsd_decay_frac`): a branch from
  a stable-phase checkpoint at step N into a decay of D updates is the WSD curve with
  `max_steps = N + D` and `wsd_decay_steps = D` (Hägele et al. 2024 §3: decays branched
  from one stable run).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal

import numpy as np

from costmodels.errors import MeshplanError

ScheduleKind = Literal["cosine", "wsd", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "wsd", "constant")


@dataclass(frozen=True)
class LRSchedule:
    """A fully resolved schedule: every default of `TrainSection` already applied."""

    lr: float
    max_steps: int
    warmup_steps: int
    schedule: ScheduleKind = "cosine"
    min_lr: float | None = None
    wsd_decay_frac: float = 0.2
    wsd_decay_steps: int | None = None  # explicit WSD decay length (wins over the fraction)
    warmup_start_lr: float = 0.0  # re-warmup starts here (0: the usual warmup from zero)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise MeshplanError(
                f"schedule={self.schedule!r}: must be one of {', '.join(SCHEDULES)}"
            )
        if not self.lr > 0:
            raise MeshplanError(f"lr={self.lr}: must be > 0")
        if self.max_steps < 1:
            raise MeshplanError(f"max_steps={self.max_steps}: must be >= 1")
        if not 0 <= self.warmup_steps <= self.max_steps:
            raise MeshplanError(
                f"warmup_steps={self.warmup_steps}: must be in 0..max_steps={self.max_steps}"
            )
        if self.min_lr is not None and not 0 <= self.min_lr <= self.lr:
            raise MeshplanError(f"min_lr={self.min_lr}: must be in [0, lr={self.lr}]")
        if not 0 <= self.wsd_decay_frac <= 1:
            raise MeshplanError(f"wsd_decay_frac={self.wsd_decay_frac}: must be in [0, 1]")
        if self.wsd_decay_steps is not None and not 0 <= self.wsd_decay_steps <= self.max_steps:
            raise MeshplanError(
                f"wsd_decay_steps={self.wsd_decay_steps}: must be in 0..max_steps={self.max_steps}"
            )
        if not 0 <= self.warmup_start_lr <= self.lr:
            raise MeshplanError(f"warmup_start_lr={self.warmup_start_lr}: must be in [0, lr]")

    @property
    def final_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def decay_steps(self) -> int:
        """WSD: updates in the decay phase (never overlapping warmup)."""
        k = _decay_len(self.max_steps, self.wsd_decay_frac, self.wsd_decay_steps)
        return max(0, min(k, self.max_steps - self.warmup_steps))

    @classmethod
    def from_train(cls, train: object) -> LRSchedule:
        """Build from a `planner.planfile.TrainSection` (duck-typed: no planner import)."""
        return cls(
            lr=float(train.lr),  # type: ignore[attr-defined]
            max_steps=int(train.max_steps),  # type: ignore[attr-defined]
            warmup_steps=int(train.resolved_warmup_steps),  # type: ignore[attr-defined]
            schedule=train.schedule,  # type: ignore[attr-defined]
            min_lr=train.resolved_min_lr,  # type: ignore[attr-defined]
            wsd_decay_frac=float(train.wsd_decay_frac),  # type: ignore[attr-defined]
        )

    def at(self, step: int) -> float:
        c = self._curve  # computed once per schedule: the loop asks every step
        return float(c[min(max(int(step), 0), len(c) - 1)])

    @cached_property
    def _curve(self) -> np.ndarray:
        return self.curve()

    def curve(self) -> np.ndarray:
        return lr_curve(
            self.lr, self.max_steps, warmup_steps=self.warmup_steps, schedule=self.schedule,
            min_lr=self.min_lr, wsd_decay_frac=self.wsd_decay_frac,
            wsd_decay_steps=self.wsd_decay_steps, warmup_start_lr=self.warmup_start_lr,
        )


def _decay_len(max_steps: int, frac: float, steps: int | None) -> int:
    return int(steps) if steps is not None else int(round(frac * max_steps))


def continual_schedule(train: object, lr_fraction: float = 1.0,
                       warmup_start_lr: float = 0.0) -> LRSchedule:
    """A continual-pretraining run's schedule: the plan's curve restarted at step 0 with
    re-warmup, peak and floor scaled by `lr_fraction` (Ibrahim et al. 2024 §5)."""
    if not 0 < lr_fraction <= 1:
        raise MeshplanError(f"continual.lr_fraction={lr_fraction}: must be in (0, 1]")
    base = LRSchedule.from_train(train)
    return LRSchedule(
        lr=base.lr * lr_fraction, max_steps=base.max_steps, warmup_steps=base.warmup_steps,
        schedule=base.schedule, min_lr=base.final_lr * lr_fraction,
        wsd_decay_frac=base.wsd_decay_frac, warmup_start_lr=warmup_start_lr,
    )


def branch_schedule(train: object, branch_step: int, decay_steps: int) -> LRSchedule:
    """WSD branch: the stable run's curve up to `branch_step`, then a linear decay of
    `decay_steps` updates to min_lr (Hägele et al. 2024 §3; Hu et al. 2024 §4.1)."""
    base = LRSchedule.from_train(train)
    if base.schedule != "wsd":
        raise MeshplanError(
            f"continual.branch_step: the source run's train.schedule is {base.schedule!r}; "
            "branching needs a wsd run (set train.schedule=wsd)"
        )
    if decay_steps < 1:
        raise MeshplanError(f"continual.decay_steps={decay_steps}: must be >= 1 to branch")
    stable_end = base.max_steps - base.decay_steps  # first update of the source run's decay
    if not base.warmup_steps <= branch_step <= stable_end:
        raise MeshplanError(
            f"continual.branch_step={branch_step}: not in the source run's stable phase "
            f"(steps {base.warmup_steps}..{stable_end}); pick a step in that range"
        )
    return LRSchedule(
        lr=base.lr, max_steps=branch_step + decay_steps,
        warmup_steps=min(base.warmup_steps, branch_step), schedule="wsd", min_lr=base.final_lr,
        wsd_decay_frac=base.wsd_decay_frac, wsd_decay_steps=decay_steps,
    )


def resolve_warmup(max_steps: int, warmup_steps: int = 0, warmup_frac: float = 0.02) -> int:
    """`TrainSection.resolved_warmup_steps`: explicit steps win, else a share of max_steps."""
    return warmup_steps or int(round(warmup_frac * max_steps))


def lr_at(step: int, lr: float, max_steps: int, **schedule: Any) -> float:
    """LR of optimizer update `step` (0-based), clamped to the run; see the module docstring
    for the formulas; `schedule`: `lr_curve`'s keywords (its one implementation)."""
    curve = lr_curve(lr, max_steps, **schedule)
    return float(curve[min(max(int(step), 0), len(curve) - 1)])


def lr_curve(
    lr: float,
    max_steps: int,
    *,
    warmup_steps: int | None = None,
    warmup_frac: float = 0.02,
    schedule: str = "cosine",
    min_lr: float | None = None,
    wsd_decay_frac: float = 0.2,
    wsd_decay_steps: int | None = None,
    warmup_start_lr: float = 0.0,
) -> np.ndarray:
    """LR for every update 0..max_steps-1: linear warmup (Goyal et al. 2017 §2.2) from
    warmup_start_lr, then constant, one cosine half-period to min_lr (Loshchilov & Hutter
    2017 eq. 5) or warmup-stable-decay with a linear decay tail (Hu et al. 2024 §4.1)."""
    if schedule not in SCHEDULES:
        raise MeshplanError(f"schedule={schedule!r}: must be one of {', '.join(SCHEDULES)}")
    total = max(1, int(max_steps))
    w = resolve_warmup(total, warmup_steps or 0, warmup_frac) if warmup_steps is None else int(
        warmup_steps
    )
    w = min(max(w, 0), total)
    floor = lr / 10 if min_lr is None else min_lr
    s = np.arange(total, dtype=np.float64)
    if schedule == "constant":
        out = np.full(total, lr, dtype=np.float64)
    elif schedule == "cosine":
        span = total - 1 - w
        p = np.ones(total) if span <= 0 else np.clip((s - w) / span, 0.0, 1.0)
        out = floor + (lr - floor) * 0.5 * (1.0 + np.cos(np.pi * p))
    elif schedule == "wsd":
        k = max(0, min(_decay_len(total, wsd_decay_frac, wsd_decay_steps), total - w))
        start = total - k
        out = np.full(total, lr, dtype=np.float64)
        if k > 0:
            tail = s >= start
            out[tail] = lr - (lr - floor) * (s[tail] - start + 1) / k
    else:
        raise MeshplanError(f"schedule={schedule!r}: must be one of {', '.join(SCHEDULES)}")
    if w > 0:  # linear (re-)warmup from warmup_start_lr (0 by default)
        out[:w] = warmup_start_lr + (lr - warmup_start_lr) * (s[:w] + 1) / w
    return out
