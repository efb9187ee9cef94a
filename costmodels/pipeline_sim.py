"""Event simulation of a pipeline schedule's action order: each rank runs its list of
forward (F), input-gradient (B), weight-gradient (W) and full-backward (BW) actions in
order; a forward waits for the previous stage's forward of its micro-batch, a backward for
the next stage's backward (the last stage for its own forward), a W for its own B.

On dedicated devices every rank runs at full speed. On a host whose ranks time-share
`capacity` cores' worth of speed (a CPU run with more ranks than cores), the k ranks that
have work at a moment each progress at min(1, capacity / k) (processor sharing): a rank
waiting on its neighbour frees its core for the others, which is why a time-shared host's
measured bubble is not the dedicated formula's.

`costmodels.pipeline` holds the closed forms the planner uses; this simulation checks them
(tests/costmodels/test_pipeline_schedules.py) and predicts what a run on a CPU host
measures (the executor's `pipeline` record).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

Action = tuple[str, int, int]  # kind ("F", "B", "W", "BW"), stage, micro-batch
Orders = dict[int, list[Action]]


@dataclass(frozen=True)
class SimResult:
    span_s: float  # first action to last, over all ranks
    busy_s: list[float]  # per rank: seconds it had an action running

    @property
    def idle_s(self) -> float:
        """Mean over ranks of the span less the rank's busy time."""
        return sum(self.span_s - b for b in self.busy_s) / len(self.busy_s)


def single_stage_orders(name: str, pp: int, m: int) -> Orders:
    """GPipe (all forwards, then all backwards; Huang et al. 2019) and 1F1B
    (PipeDream-Flush: p - r - 1 warm-up forwards, then one forward one backward;
    Narayanan et al. 2021, Sec. 2.1) on one stage per rank."""
    out: Orders = {}
    for r in range(pp):
        if name == "gpipe":
            out[r] = [("F", r, i) for i in range(m)] + [("BW", r, i) for i in range(m)]
            continue
        acts: list[Action] = []
        f = b = 0
        for _ in range(min(pp - r - 1, m)):
            acts.append(("F", r, f))
            f += 1
        while f < m:
            acts += [("F", r, f), ("BW", r, b)]
            f, b = f + 1, b + 1
        acts += [("BW", r, i) for i in range(b, m)]
        out[r] = acts
    return out


def _deps(kind: str, stage: int, mb: int, stages: int) -> tuple[tuple[str, int, int], ...]:
    if kind == "F":
        return (("F", stage - 1, mb),) if stage > 0 else ()
    if kind == "W":
        return (("B", stage, mb),)
    return (("B", stage + 1, mb),) if stage < stages - 1 else (("F", stage, mb),)


def simulate(orders: Orders, stages: int, duration: Callable[[str, int], float],
             capacity: float | None = None, send_s: float = 0.0) -> SimResult:
    """Run the orders; `duration(kind, stage)` is an action's seconds at full speed
    ("BW" is B + W); `capacity` the ranks' worth of speed the host shares out (None:
    dedicated devices); `send_s` the seconds an activation or gradient takes to reach a
    stage on another rank."""
    ranks = sorted(orders)
    rank_of = {s: r for r in ranks for _, s, _ in orders[r]}
    nxt = dict.fromkeys(ranks, 0)
    left: dict[int, float] = {}  # rank -> full-speed seconds left of its running action
    done: dict[tuple[str, int, int], float] = {}
    waiting: dict[int, float] = {}  # rank -> when the input of its next action arrives
    busy = dict.fromkeys(ranks, 0.0)
    now = 0.0
    total = sum(len(orders[r]) for r in ranks)
    finished = 0
    while finished < total:
        for r in ranks:
            if r not in left and nxt[r] < len(orders[r]):
                kind, s, mb = orders[r][nxt[r]]
                deps = _deps(kind, s, mb, stages)
                if all(d in done for d in deps):
                    arrive = max((done[d] + (send_s if rank_of.get(d[1], r) != r else 0.0) for d in deps),
                                 default=now)
                    if arrive > now + 1e-15:  # its input is still on the wire
                        waiting[r] = arrive
                        continue
                    left[r] = max(duration(kind, s), 0.0)
        if not left and not waiting:
            raise ValueError("the pipeline order deadlocks")
        speed = 1.0 if capacity is None else min(1.0, capacity / max(len(left), 1))
        dt = min([v / speed for v in left.values()] + [t - now for t in waiting.values()])
        now += dt
        waiting.clear()
        for r in list(left):
            busy[r] += dt
            left[r] -= dt * speed
            if left[r] <= 1e-12:
                kind, s, mb = orders[r][nxt[r]]
                done[("F" if kind == "F" else "W" if kind == "W" else "B", s, mb)] = now
                del left[r]
                nxt[r] += 1
                finished += 1
    return SimResult(now, [busy[r] for r in ranks])
