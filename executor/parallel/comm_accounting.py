"""Communication accounting of a distributed strategy: the collectives each step issues,
counted per kind on the process groups (payload bytes per rank, seconds blocked), beside
what the cost model predicts for the layout (`costmodels.comm_volume`)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist

from executor.parallel.comm import KINDS, WAIT_CLOCK, CommCounter
from planner.planfile import Plan


class CommAccounting:
    """Mixin of `DistributedStrategy`: reads `plan`, `comm`, `comm_enabled`, `world_size`."""

    plan: Plan
    comm: CommCounter
    comm_enabled: bool
    world_size: int

    @contextmanager
    def counting(self):
        """Count collectives issued inside this block towards the current step."""
        if not self.comm_enabled:
            yield
            return
        with self.comm:
            yield

    def begin_step_accounting(self) -> None:
        self.comm.reset()
        WAIT_CLOCK.install()
        WAIT_CLOCK.reset()

    def comm_bytes(self) -> dict[str, int]:
        """Payload bytes this rank moved since the step began, by collective kind."""
        return self.comm.snapshot()

    def comm_bytes_mean(self) -> dict[str, float]:
        """The per-rank mean over the world (not counted itself) of the payload bytes by
        kind, and of the seconds blocked on collectives (`comm_wait_s`) and on pipeline
        neighbours (`pipeline_wait_s`)."""
        waits = WAIT_CLOCK.snapshot()
        vals = torch.tensor([float(self.comm.bytes.get(k, 0)) for k in KINDS]
                            + [waits["comm"], waits["pipeline"]], dtype=torch.float64)
        dist.all_reduce(vals)
        keys = [*KINDS, "comm_wait_s", "pipeline_wait_s"]
        return {k: float(v) / self.world_size for k, v in zip(keys, vals.tolist(), strict=True)}

    def pipeline_idle(self) -> dict[str, float]:
        """Pipeline strategies: the step's idle time in the schedule (`pp_idle_s`)."""
        return {}

    def predicted_comm(self) -> dict[str, float]:
        from costmodels.comm_volume import comm_volume

        if not hasattr(self, "_predicted_comm"):
            self._predicted_comm = comm_volume(
                self.plan.model_spec(), self.plan.layout_spec()).by_kind()
        return self._predicted_comm

    def step_comm_metrics(self) -> dict[str, Any]:
        """metrics.jsonl fields: this step's measured payload bytes per rank (mean over
        ranks) and the cost model's prediction for the layout, by collective kind."""
        if not self.comm_enabled:
            return {}
        measured = self.comm_bytes_mean()
        waits = {k: measured.pop(k) for k in ("comm_wait_s", "pipeline_wait_s")}
        predicted = self.predicted_comm()
        return {
            **waits,
            "comm_bytes": {k: int(v) for k, v in measured.items() if v or predicted.get(k)},
            "comm_bytes_predicted": {k: int(v) for k, v in predicted.items()
                                     if v or measured.get(k)},
        }
