"""Mixture-of-experts gradients and statistics of a distributed strategy: routing losses
weighted for the step objective, expert weights reduced over their own replicas (expert
data parallelism) rather than dp x cp, and the routing statistics summed over ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from executor.parallel.mesh import ParallelDims, axis
from executor.parallel.parallelize import all_reduce_gradients
from planner.planfile import Plan


class ExpertGrads:
    """Mixin of `DistributedStrategy` (before `Strategy` in its bases, so these override the
    one-process versions): reads `plan`, `dims`, `mesh`, `grad_replicas`, `grad_sync` and
    `model_parts()`."""

    plan: Plan
    dims: ParallelDims
    mesh: Any
    grad_replicas: int
    grad_sync: str

    def configure_moe(self) -> None:
        """The MoE layers' routing losses and forced balance (`executor.moe.configure_moe`):
        one micro-batch's losses weigh 1 / (micro-batches in the global batch) in the step
        objective, times the gradient replicas the reduction averages over, over the
        context-parallel ranks that each hold a part of it (the balance loss's f is counted
        over them)."""
        from executor.moe import configure_moe

        lay = self.plan.layout_spec()
        micro_batches = max(lay.global_batch // lay.micro_batch, 1)
        cp_mesh = axis(self.mesh, self.dims, "cp")
        configure_moe(self.model_parts(), self.plan.train,
                      self.grad_replicas / (micro_batches * self.dims.cp),
                      cp_mesh.get_group() if cp_mesh is not None else None, self.dims.cp)

    def _unsynced_expert_params(self) -> set[int]:
        """ids of the experts' weights sharded over ep that no FSDP reduction manages: their
        replicas are the expert-data-parallel group, not dp x cp."""
        from torch.distributed.fsdp import FSDPModule

        from executor.parallel.ep import moe_layers

        if self.plan.layout.ep == 1:
            return set()
        return {id(p) for part in self.model_parts() for m in moe_layers(part)
                if not isinstance(m.experts, FSDPModule) for p in m.experts.parameters()}

    def sync_replicated_grads(self) -> None:
        """sharding none / zero1 without DDP: one flat all-reduce over every replica; experts
        sharded over ep: over their expert replicas (edp), divided by all dp x cp replicas
        (each expert's gradient already sums the tokens of its whole ep group)."""
        experts = self._unsynced_expert_params()
        if self.grad_sync == "allreduce":
            dense = [p for part in self.model_parts() for p in part.parameters() if id(p) not in experts]
            all_reduce_gradients(dense, axis(self.mesh, self.dims, "dp_cp").get_group(),
                                 self.grad_replicas)
        if experts:
            from executor.parallel.ep import edp_group

            ordered = [p for part in self.model_parts() for p in part.parameters() if id(p) in experts]
            all_reduce_gradients(ordered, edp_group(self.dims, self.plan.layout.ep), self.grad_replicas)

    @property
    def moe_stat_replicas(self) -> int:  # TP ranks route the same tokens: counted once
        return self.dims.tp

    def reduce_moe_stats(self, stats: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(stats)
        return stats
