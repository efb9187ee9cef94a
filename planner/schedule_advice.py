"""Batch arithmetic and learning-rate advice for a plan.

* tokens per optimizer step = micro_batch x dp x grad_accum x seq_len (Shoeybi et al. 2019
  / Narayanan et al. 2021 §2: the global batch is split over data-parallel ranks and
  accumulated micro-batches);
* max LR by model size, interpolated between the seed's anchors (see `recommend_max_lr`);
* warmup 1-2% of the steps, cosine vs WSD, and the LR curve itself (the formula lives in
  `costmodels.lr_schedule` so that the executor's scheduler computes the same numbers).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from costmodels.errors import MeshplanError
from costmodels.lr_schedule import lr_curve

# --------------------------------------------------------------------------- quantities

_SUFFIX = {
    "": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18,
    "ki": 2.0**10, "mi": 2.0**20, "gi": 2.0**30, "ti": 2.0**40, "pi": 2.0**50,
}
_QTY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]{0,2})\s*$", re.IGNORECASE)


def parse_count(text: str | float | int, what: str = "value") -> float:
    """'16M' -> 1.6e7, '16Mi' -> 16 x 2^20, '1.5T' -> 1.5e12, '3.8e25' -> 3.8e25.

    Decimal SI suffixes (k, M, B/G, T, P, E) and binary ones (Ki, Mi, Gi, Ti, Pi).
    """
    if isinstance(text, int | float) and not isinstance(text, bool):
        value = float(text)
    else:
        m = _QTY.match(str(text))
        suffix = m.group(2).lower() if m else ""
        if not m or suffix not in _SUFFIX:
            raise MeshplanError(
                f"{what}={text!r}: not a number; write e.g. 4096, 16M, 16Mi, 1.5T or 3.8e25"
            )
        value = float(m.group(1)) * _SUFFIX[suffix]
    if not (math.isfinite(value) and value > 0):
        raise MeshplanError(f"{what}={text!r}: must be a positive number")
    return value


# --------------------------------------------------------------------------- batch


def tokens_per_step(micro_batch: int, dp: int, grad_accum: int, seq_len: int) -> int:
    """Tokens per optimizer step = micro x dp x accumulation x seq (Narayanan et al. 2021 §2)."""
    for name, v in (("micro_batch", micro_batch), ("dp", dp), ("grad_accum", grad_accum),
                    ("seq_len", seq_len)):
        if not (isinstance(v, int) and v >= 1):
            raise MeshplanError(f"{name}={v!r}: must be an integer >= 1")
    return micro_batch * dp * grad_accum * seq_len


@dataclass(frozen=True)
class BatchPlan:
    seq_len: int
    micro_batch: int
    dp: int
    grad_accum: int
    target_tokens: float

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step."""
        return self.micro_batch * self.dp * self.grad_accum

    @property
    def tokens(self) -> int:
        return tokens_per_step(self.micro_batch, self.dp, self.grad_accum, self.seq_len)

    @property
    def deviation_pct(self) -> float:
        return 100.0 * (self.tokens - self.target_tokens) / self.target_tokens

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(global_batch=self.global_batch, tokens=self.tokens,
                 deviation_pct=self.deviation_pct)
        return d


def solve_grad_accum(
    target_tokens: float, seq_len: int, micro_batch: int = 1, dp: int = 1
) -> BatchPlan:
    """Accumulation steps whose global batch is nearest `target_tokens` (at least 1)."""
    tokens_per_step(micro_batch, dp, 1, seq_len)  # validates the integers
    if not target_tokens > 0:
        raise MeshplanError(f"--global-batch-tokens {target_tokens}: must be > 0")
    per_accum = micro_batch * dp * seq_len
    accum = max(1, int(round(target_tokens / per_accum)))
    return BatchPlan(seq_len, micro_batch, dp, accum, float(target_tokens))


# --------------------------------------------------------------------------- LR

# The seed's anchors (params, max LR): LLaMA-style AdamW pretraining at 7B, 13B and 70B+.
LR_ANCHORS: tuple[tuple[float, float], ...] = ((7e9, 3e-4), (13e9, 1e-4), (70e9, 3e-5))


def recommend_max_lr(params: float) -> float:
    """Peak LR by model size: log-log linear interpolation between `LR_ANCHORS`.

    Between two anchors (N1, lr1), (N2, lr2): log lr = log lr1 + (log N - log N1) *
    (log lr2 - log lr1) / (log N2 - log N1), i.e. a power law through both anchors. Outside
    the anchors the value is held flat (3e-4 below 7B, 3e-5 from 70B up) rather than
    extrapolated, because the 7B->13B slope (lr ~ N^-1.8) would give absurd LRs for small
    models. Flat-below-7B is conservative for small models (which tolerate higher LRs).
    """
    if not (math.isfinite(params) and params > 0):
        raise MeshplanError(f"params={params!r}: must be a positive number")
    logs_n = np.log([a[0] for a in LR_ANCHORS])
    logs_lr = np.log([a[1] for a in LR_ANCHORS])
    return float(np.exp(np.interp(math.log(params), logs_n, logs_lr)))


def recommend_warmup_frac(max_steps: int) -> float:
    """Warmup share: 2% for short runs, 1% from 10,000 steps up (the 1-2% band of the issue;
    LLaMA-3 405B used 8,000 of ~1.2M steps, Dubey et al. 2024 §3.4.1)."""
    return 0.02 if max_steps < 10_000 else 0.01


def recommend_schedule(length_known: bool = True, continual: bool = False) -> tuple[str, str]:
    """Cosine when the run length is fixed in advance; WSD when it is open or continued."""
    if continual or not length_known:
        return (
            "wsd",
            "WSD keeps a constant LR until a short final decay, so the run can be extended "
            "or branched from the stable phase (Hu et al. 2024; Hägele et al. 2024)",
        )
    return (
        "cosine",
        "cosine to lr/10 over a fixed number of steps is the standard pretraining schedule "
        "(Hoffmann et al. 2022 §3; Touvron et al. 2023)",
    )


@dataclass(frozen=True)
class LRAdvice:
    params: float
    max_lr: float
    min_lr: float
    schedule: str
    reason: str
    max_steps: int
    warmup_steps: int
    warmup_frac: float
    wsd_decay_frac: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def curve(self) -> np.ndarray:
        return lr_curve(
            self.max_lr, self.max_steps, warmup_steps=self.warmup_steps,
            schedule=self.schedule, min_lr=self.min_lr, wsd_decay_frac=self.wsd_decay_frac,
        )

    def train_overrides(self) -> dict[str, Any]:
        """Values for a plan's `train` section (keys of `planner.planfile.TrainSection`)."""
        return {
            "lr": self.max_lr, "min_lr": self.min_lr, "schedule": self.schedule,
            "max_steps": self.max_steps, "warmup_steps": self.warmup_steps,
            "wsd_decay_frac": self.wsd_decay_frac,
        }


def recommend_lr(
    params: float,
    max_steps: int,
    length_known: bool = True,
    continual: bool = False,
    wsd_decay_frac: float = 0.2,
) -> LRAdvice:
    if not (isinstance(max_steps, int) and max_steps >= 1):
        raise MeshplanError(f"max_steps={max_steps!r}: must be an integer >= 1")
    schedule, reason = recommend_schedule(length_known, continual)
    lr = recommend_max_lr(params)
    frac = recommend_warmup_frac(max_steps)
    warmup = max(1, int(round(frac * max_steps))) if max_steps > 1 else 0
    return LRAdvice(
        params=params, max_lr=lr, min_lr=lr / 10, schedule=schedule, reason=reason,
        max_steps=max_steps, warmup_steps=warmup, warmup_frac=frac,
        wsd_decay_frac=wsd_decay_frac,
    )


def steps_for_tokens(total_tokens: float, tokens_per_step_: int) -> int:
    """Optimizer steps to consume `total_tokens` at a fixed global batch (rounded up)."""
    if not (total_tokens > 0 and tokens_per_step_ > 0):
        raise MeshplanError("steps_for_tokens: tokens and tokens per step must be > 0")
    return max(1, math.ceil(total_tokens / tokens_per_step_))
