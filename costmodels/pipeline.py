"""Pipeline-parallel schedules: which exist, where their stages sit, their bubble, their
in-flight activations and their constraints. The one home of these facts: the cost model,
the search, the contract and the executor read them from here.

Notation: p pipeline ranks, m micro-batches per step, v stages ("chunks") per rank; F, B, W
the forward, input-gradient and weight-gradient time of one micro-batch through all of one
rank's layers (a chunk takes F / v, B / v, W / v). A full backward is B + W.

Bubble, the time each rank idles per step (equal-time stages, no communication):
  gpipe, 1f1b        (p - 1)(F + B + W)          Huang et al. 2019; Narayanan et al. 2021, Sec. 2.2.1
  interleaved        (p - 1)(F + B + W) / v      Narayanan et al. 2021, Sec. 2.2.2
  zbh1               (p - 1)(F + B - W')         Qi et al. 2023 (Zero Bubble PP), Sec. 3.1, ZB-H1
  interleaved_zb     (p - 1)(F + B - W') / v     ibid. on interleaved chunks (torch's ZB1P order)
  zbv, dualpipev     (p - 1)(F + B - W') / 2     V placement, two chunks per rank (Qi et al.
                     Sec. 6, ZB-V; DeepSeek-AI 2024, DeepSeek-V3 report Sec. 3.2.1, DualPipe)
with W' = min(F, B, W): a deferred weight-gradient step fills a drain slot only as far as it
lasts and as far as the slot is long (Qi et al. state F + B - W for W <= F, B).
The first five are exact for the orders `torch.distributed.pipelining` runs (an event
simulation of torch's own action lists checks them in the tests). The V orders are greedy;
for them the expression is ZB-H1's on half-size chunks, within -26 % / +41 % (ZB-V) and
-34 % / +16 % (DualPipe-V) of the simulated bubble over F : B : W ratios 1 : 0.6-2.5 : 0.3-1.5
and p = 2-8 (tests/costmodels/test_pipeline_schedules.py). DeepSeek's DualPipe bubble,
(PP/2 - 1)(F&B + B - 3W) with B a full backward, assumes the overlapped forward-and-backward
pair F&B that DeepSeek's kernels run; torch's DualPipeV runs the pair back to back.

In-flight activations at the peak, in micro-batches through all of a rank's layers:
  gpipe m; 1f1b min(p, m) on the first rank, 1 on the last (Narayanan et al. 2021, Sec. 2.2.1);
  interleaved (v p + p - 1 - 2 r) / v on rank r (Korthikanti et al. 2022, Sec. 4.2.3 for r = 0);
  zbh1 and interleaved_zb ((v - 1) m' + p) / v with m' = m // max(1, m // p) (p when m is a
  multiple of p), zbv p (min(p, (m + 1) / 2) on the first rank below 2p - 1 micro-batches) on
  every rank (the weight gradients they defer keep their micro-batch's saved tensors, Qi et al.
  Sec. 3.1 and 6); dualpipev (2 p + 1) / 2 (DeepSeek-V3 report Table 2: PP + 1 chunks with
  PP = 2p). All counted from torch's orders in the tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ArrayLike = float | np.ndarray


@dataclass(frozen=True)
class Schedule:
    """One pipeline schedule as the planner and the executor know it."""

    name: str
    source: str
    placement: str  # "looped" (rank r: stages r, r + p, ...) or "v" (r and 2p - 1 - r)
    stages: int  # stages per rank it requires; 0: the layout's vpp (at least 2 if `multi`)
    multi: bool  # holds several stages per rank in the looped placement
    splits_backward: bool  # runs input- and weight-gradient steps apart
    torch_class: str  # the `torch.distributed.pipelining` class the executor builds
    interleaved_form: str = ""  # what the schedule becomes with vpp > 1 stages per rank
    needs: str = "pp > 1"  # what a layout needs to run it (for reports)


SCHEDULES: tuple[Schedule, ...] = (
    Schedule("gpipe", "Huang et al. 2019 (GPipe)", "looped", 1, False, False, "ScheduleGPipe",
             "interleaved"),
    Schedule("1f1b", "Narayanan et al. 2021, Sec. 2.1 (PipeDream-Flush)", "looped", 1, False, False,
             "Schedule1F1B", "interleaved", "pp > 1 and >= pp micro-batches per step"),
    Schedule("interleaved", "Narayanan et al. 2021, Sec. 2.2", "looped", 0, True, False,
             "ScheduleInterleaved1F1B", "", "vpp > 1 and micro-batches per step a multiple of pp"),
    Schedule("zbh1", "Qi et al. 2023, Sec. 3.1 (ZB-H1)", "looped", 1, False, True,
             "ScheduleInterleavedZeroBubble", "interleaved_zb", "pp > 1 and >= pp micro-batches per step"),
    Schedule("interleaved_zb", "Qi et al. 2023, Sec. 3-4 (ZB1P) on interleaved chunks", "looped", 0,
             True, True, "ScheduleInterleavedZeroBubble", "",
             ">= pp micro-batches per step, a multiple of max(1, m // pp)"),
    Schedule("zbv", "Qi et al. 2023, Sec. 6 (ZB-V)", "v", 2, False, True, "ScheduleZBVZeroBubble", "",
             "2 x pp layers and >= pp micro-batches per step"),
    Schedule("dualpipev", "DeepSeek-V3 report, Sec. 3.2.1 (DualPipe, V variant)", "v", 2, False, True,
             "ScheduleDualPipeV", "", "2 x pp layers and >= 2 x pp micro-batches per step"),
)
SCHEDULE_NAMES: tuple[str, ...] = tuple(s.name for s in SCHEDULES)
BY_NAME = {s.name: s for s in SCHEDULES}
CODE = {s.name: i for i, s in enumerate(SCHEDULES)}


def effective(name: str, vpp: int) -> str:
    """The schedule a layout runs: gpipe / 1f1b with vpp > 1 stages per rank run interleaved
    1F1B, zbh1 runs interleaved_zb; the others are what they say."""
    s = BY_NAME[name]
    return s.interleaved_form if (vpp > 1 and s.interleaved_form) else name


def stages_per_rank(name: str, vpp: int) -> int:
    """Stages each pipeline rank holds: two for the V schedules, vpp for the looped ones
    (interleaved_zb two when vpp is left at 1)."""
    s = BY_NAME[effective(name, vpp)]
    if s.stages:  # the V schedules' two, the single-stage schedules' one
        return s.stages
    return max(vpp, 2) if s.splits_backward else vpp


def placement(name: str) -> str:
    return BY_NAME[name].placement


def rank_stage_ids(rank: int, pp: int, stages: int, placement: str = "looped") -> list[int]:
    """The stages pipeline rank `rank` holds, in its local order. Looped: r, r + p, ...
    (Narayanan et al. 2021, Sec. 2.2); V: r and 2p - 1 - r (Qi et al. 2023, Sec. 6), so the
    first and the last stage sit on rank 0."""
    if placement == "v":
        return [rank, 2 * pp - 1 - rank]
    return [rank + k * pp for k in range(stages)]


def min_microbatches(schedule: ArrayLike, pp: ArrayLike) -> np.ndarray:
    """Fewest micro-batches per step a schedule (effective code) runs with: 1 for GPipe, 2p
    for DualPipe-V (torch's ScheduleDualPipeV needs one per stage), p for the others."""
    code, p = _codes(schedule), np.asarray(pp, dtype=np.int64)
    return np.where(_is(code, "gpipe"), 1, np.where(_is(code, "dualpipev"), 2 * p, p))


def microbatches_admitted(schedule: ArrayLike, pp: ArrayLike, micro_batches: ArrayLike) -> np.ndarray:
    """Whether each case's micro-batch count runs under its schedule (effective code): the
    minimum above; interleaved 1F1B a multiple of p (Narayanan et al. 2021, Sec. 2.2.2, as
    Megatron-LM enforces); torch's zero-bubble looped orders a multiple of their rounds,
    max(1, m // p)."""
    code, p = _codes(schedule), np.asarray(pp, dtype=np.int64)
    m = np.asarray(micro_batches, dtype=np.int64)
    ok = m >= min_microbatches(code, p)
    ok &= ~_is(code, "interleaved") | (m % np.maximum(p, 1) == 0)
    ok &= ~_is(code, "zbh1", "interleaved_zb") | (m % np.maximum(1, m // np.maximum(p, 1)) == 0)
    return ok | (p <= 1)


def microbatch_problem(name: str, pp: int, vpp: int, m: int) -> str:
    """Why `m` micro-batches per step cannot run under the schedule ('' when they can)."""
    eff = effective(name, vpp)
    code = CODE[eff]
    if bool(microbatches_admitted(code, pp, m)):
        return ""
    need = int(min_microbatches(code, pp))
    if m < need:
        what = f"2 x pp = {need} (one per stage)" if eff == "dualpipev" else f"pp={pp} (one per pipeline rank)"
        return f"layout.schedule={eff}: {m} micro-batches per step is fewer than {what}"
    step = pp if eff == "interleaved" else max(1, m // pp)
    return f"layout.schedule={eff}: {m} micro-batches per step is not a multiple of {step}"


# ---- vectorised over a table of cases (schedule as an integer code column)

def _codes(schedule: ArrayLike) -> np.ndarray:
    return np.asarray(schedule, dtype=np.int64)


def _is(code: np.ndarray, *names: str) -> np.ndarray:
    out = code == CODE[names[0]]
    for n in names[1:]:
        out = out | (code == CODE[n])
    return out


def bubble_time(schedule: ArrayLike, pp: ArrayLike, vpp: ArrayLike, t_f: ArrayLike, t_b: ArrayLike,
                t_w: ArrayLike, micro_batches: ArrayLike = np.inf) -> np.ndarray:
    """Idle seconds per step on each rank (see the module docstring), from one micro-batch's
    forward, input-gradient and weight-gradient time through a rank's layers."""
    code = _codes(schedule)
    p1 = np.asarray(pp, dtype=np.float64) - 1
    v = np.maximum(np.asarray(vpp, dtype=np.float64), 1.0)
    m = np.asarray(micro_batches, dtype=np.float64)
    full = t_f + t_b + t_w
    zb = t_f + t_b - np.minimum(np.minimum(t_f, t_b), t_w)
    # ZB-V with fewer than 2p - 1 micro-batches (torch pads its order to 2p - 1): the drain is
    # (p - 1) max(F, B) with nothing to fill it at m = p, less one W per micro-batch beyond p
    # (fitted to nothing: read off the event simulation of torch's order, which it matches
    # for p = 2-8 and F : B : W = 1 : 1-2 : 0.5-1).
    short_v = np.maximum(p1 * np.maximum(t_f, t_b) - np.maximum(m - p1 - 1, 0.0) * t_w, p1 * zb / 2)
    zbv = np.where(m < 2 * p1 + 1, short_v, p1 * zb / 2)
    out = np.select(
        [_is(code, "gpipe", "1f1b"), _is(code, "interleaved"), _is(code, "zbh1"),
         _is(code, "interleaved_zb"), _is(code, "zbv"), _is(code, "dualpipev")],
        [p1 * full, p1 * full / v, p1 * zb, p1 * zb / v, zbv, p1 * zb / 2],
        default=p1 * full,
    )
    return np.where(p1 > 0, out, 0.0)


def inflight_microbatches(schedule: ArrayLike, pp: ArrayLike, vpp: ArrayLike, micro_batches: ArrayLike,
                          rank: str = "first") -> np.ndarray:
    """Micro-batches whose activations a rank holds at its peak, in units of one micro-batch
    through all of the rank's layers, on the first or the last pipeline rank."""
    code = _codes(schedule)
    p = np.asarray(pp, dtype=np.float64)
    v = np.maximum(np.asarray(vpp, dtype=np.float64), 1.0)
    m = np.maximum(np.asarray(micro_batches, dtype=np.float64), 1.0)
    r = 0.0 if rank == "first" else p - 1
    one_f_one_b = np.minimum(p, m) if rank == "first" else np.ones_like(p * m)
    interleaved = np.minimum((v * p + p - 1 - 2 * r) / v, m)
    # torch's zero-bubble looped order runs rounds of m // rounds micro-batches
    per_round = np.floor(m / np.maximum(1.0, np.floor(m / p)))
    looped_zb = np.minimum(((v - 1) * per_round + p) / v, m)
    out = np.select(
        [_is(code, "gpipe"), _is(code, "1f1b"), _is(code, "interleaved"),
         _is(code, "zbh1", "interleaved_zb"), _is(code, "zbv"), _is(code, "dualpipev")],
        [m, one_f_one_b, interleaved, looped_zb,
         np.minimum(p, (m + 1) / 2 if rank == "first" else m), np.minimum((2 * p + 1) / 2, m)],
        default=one_f_one_b,
    )
    return np.where(p > 1, out, np.minimum(m, 1.0))


def pending_weight_grads(schedule: ArrayLike, pp: ArrayLike, vpp: ArrayLike, micro_batches: ArrayLike,
                         rank: str = "first") -> np.ndarray:
    """Micro-batches (in whole-rank units) whose input-gradient step has run and whose
    weight-gradient step has not, at the peak, on the first or the last rank: under full
    recompute each keeps the activations its input-gradient step rebuilt (counted from
    torch's orders: ZB-H1 1 and p, interleaved zero bubble 1/v and p/v, ZB-V 1/2 and
    p - 1/2, DualPipe-V 1/2 and p/2)."""
    code = _codes(schedule)
    p = np.asarray(pp, dtype=np.float64)
    v = np.maximum(np.asarray(vpp, dtype=np.float64), 1.0)
    m = np.maximum(np.asarray(micro_batches, dtype=np.float64), 1.0)
    first = rank == "first"
    out = np.select(
        [_is(code, "zbh1", "interleaved_zb"), _is(code, "zbv"), _is(code, "dualpipev")],
        [(1.0 if first else p) / v,
         np.full_like(p * m, 0.5) if first else np.minimum(p - 0.5, np.maximum(0.5, m - p + 0.5)),
         np.full_like(p * m, 0.5) if first else p / 2],
        default=0.0,
    )
    return np.where(p > 1, out, 0.0)


def first_rank_holds_last_stage(schedule: ArrayLike) -> np.ndarray:
    """V placements put the last stage (output head, loss) on rank 0 beside the first."""
    return _is(_codes(schedule), "zbv", "dualpipev")


def critical_p2p_hops(schedule: ArrayLike, pp: ArrayLike) -> np.ndarray:
    """Activation / gradient sends on a step's critical path: the fill and the drain cross
    the p - 1 rank boundaries once each way, twice in a V (down and back up)."""
    p1 = np.asarray(pp, dtype=np.float64) - 1
    return np.where(first_rank_holds_last_stage(schedule), 4 * p1, 2 * p1)


def stage_layer_counts(layers: int, stages: int) -> list[int]:
    """Layers of each of `stages` consecutive pipeline stages, as even as possible with the
    first stages one layer longer (the executor's split; Megatron-Core's uneven split puts
    the remainder first too)."""
    base, extra = divmod(layers, stages)
    return [base + (1 if i < extra else 0) for i in range(stages)]


def rank_layer_counts(layers: int, pp: int, vpp: int = 1, placement: str = "looped") -> list[int]:
    """Layers each pipeline rank holds under the schedule's placement."""
    per_stage = stage_layer_counts(layers, pp * vpp)
    return [sum(per_stage[s] for s in rank_stage_ids(r, pp, vpp, placement)) for r in range(pp)]
