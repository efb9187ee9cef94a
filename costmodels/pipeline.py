"""Pipeline-parallel schedules: bubble and in-flight activations.

With p stages, m micro-batches per step and v model chunks per stage (interleaving):
  GPipe and 1F1B: bubble / ideal = (p - 1) / m            (Narayanan et al. 2021, Sec. 2.2.1)
  interleaved 1F1B: bubble / ideal = (p - 1) / (v m)      (ibid., Sec. 2.2.2)
As a share of the whole step (bubble + work): (p - 1) / (v m + p - 1), the mission's
(p-1)/(m+p-1) for v = 1.
"""

from __future__ import annotations

import numpy as np

from costmodels.memory import inflight_microbatches_first_stage

ArrayLike = float | np.ndarray

SCHEDULE_CODES = {"gpipe": 0, "1f1b": 1, "interleaved": 2}


def bubble_over_ideal(pp: ArrayLike, micro_batches: ArrayLike, vpp: ArrayLike = 1) -> ArrayLike:
    """Idle time divided by the ideal (bubble-free) compute time."""
    m = np.maximum(micro_batches, 1)
    return (np.asarray(pp) - 1) / (np.asarray(vpp) * m)


def bubble_fraction(pp: ArrayLike, micro_batches: ArrayLike, vpp: ArrayLike = 1) -> ArrayLike:
    """Idle share of the total step: (p - 1) / (v m + p - 1)."""
    m = np.maximum(micro_batches, 1)
    return (np.asarray(pp) - 1) / (np.asarray(vpp) * m + np.asarray(pp) - 1)


def stage_p2p_messages(pp: ArrayLike, micro_batches: ArrayLike, vpp: ArrayLike = 1) -> ArrayLike:
    """Activation sends per step out of one stage: forward and backward for each micro-batch
    and each of its v chunks (interleaving multiplies the boundary crossings by v)."""
    return np.where(np.asarray(pp) > 1, 2 * np.asarray(vpp) * np.maximum(micro_batches, 1), 0)


def activation_multiplier(
    pp: ArrayLike, vpp: ArrayLike, micro_batches: ArrayLike, schedule: ArrayLike = 1
) -> ArrayLike:
    """Micro-batches in flight on the first stage (see `costmodels.memory`)."""
    return inflight_microbatches_first_stage(pp, vpp, micro_batches, np.asarray(schedule) == 0)


def stage_layer_counts(layers: int, stages: int) -> list[int]:
    """Layers of each of `stages` consecutive pipeline stages, as even as possible with the
    first stages one layer longer (the executor's split; Megatron-Core's uneven split puts
    the remainder first too)."""
    base, extra = divmod(layers, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def rank_layer_counts(layers: int, pp: int, vpp: int = 1) -> list[int]:
    """Layers each pipeline rank holds: rank r runs stages r, r + pp, ... (the looped
    placement of interleaved 1F1B, Narayanan et al. 2021 §2.2)."""
    per_stage = stage_layer_counts(layers, pp * vpp)
    return [sum(per_stage[r + k * pp] for k in range(vpp)) for r in range(pp)]
