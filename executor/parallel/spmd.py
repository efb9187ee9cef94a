"""The SPMD strategy: every rank runs the whole model on its data, set up by
`executor.parallel.parallelize` (TP + SP -> CP -> recompute -> FSDP2 / HSDP), with DDP or a
flat all-reduce for replicated gradients (sharding none / zero1)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from executor.attention import resolve_backend
from executor.compile import loss_sum_fn
from executor.data.batch import Batch
from executor.loss import forward_loss_sum
from executor.parallel.base import DistributedStrategy
from executor.parallel.cp import shard_sequence
from executor.parallel.data_parallel import apply_ddp
from executor.parallel.mesh import axis
from executor.parallel.parallelize import gradient_sync, parallelize_chunk
from executor.parallel.tp import loss_context, materialize
from planner.planfile import Plan


def strategy_name(lay: Any, dims: Any, grad_sync: str) -> str:
    parts = []
    if grad_sync == "fsdp":
        parts.append(("hsdp-" if dims.dp_replicate > 1 else "fsdp2-") + lay.sharding)
    elif grad_sync in ("ddp", "allreduce"):
        parts.append(("ddp" if grad_sync == "ddp" else "dp-allreduce")
                     + ("+zero1" if lay.sharding == "zero1" else ""))
    if dims.tp > 1:
        parts.append(f"tp{dims.tp}")
    if dims.cp > 1:
        parts.append(f"cp{dims.cp}")
    return "+".join(parts) or "single"


class SPMDStrategy(DistributedStrategy):
    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        lay = plan.layout
        self.sharding = lay.sharding
        self.grad_sync = gradient_sync(lay.sharding, self.dims, pipelined=False, ep=lay.ep)
        self.name = strategy_name(lay, self.dims, self.grad_sync)
        self._inner: nn.Module | None = None  # the unwrapped model

    def setup(self, model: nn.Module, plan: Plan) -> None:
        model.attention_backend = resolve_backend(plan.train.attention_backend, self.device)
        model.to(self.device)
        self.remember_parameter_order(model)
        self._inner = model
        self.set_recompute([model])
        parallelize_chunk(model, self.dims, self.mesh, plan.layout, self.precision,
                          compile_blocks=plan.train.compile)
        self.loss_sum = loss_sum_fn(plan.train.compile)
        if self.grad_sync == "ddp":
            model = apply_ddp(model, axis(self.mesh, self.dims, "dp_cp").get_group())
        self.model = model
        self.configure_moe()
        self.build_optimizers()
        self.record_applied()

    def model_parts(self) -> list[nn.Module]:
        assert self._inner is not None
        return [self._inner]

    def _sync_context(self, last: bool):
        """Reduce gradients only after the last micro-batch of the step."""
        if self.grad_sync == "ddp" and not last:
            return self.model.no_sync()  # type: ignore[union-attr,operator]
        if self.grad_sync == "fsdp":
            self.model.set_requires_gradient_sync(last)  # type: ignore[union-attr,operator]
            if self.sharding != "zero3":
                # zero2: keep parameters gathered across the step's micro-batches.
                self.model.set_reshard_after_backward(last)  # type: ignore[union-attr,operator]
        return nullcontext()

    def _forward_loss(self, mb: Batch) -> torch.Tensor:
        mb = mb.to(self.device)
        input_ids, labels, pos = mb.input_ids, mb.labels, mb.position_ids
        if self.dims.cp > 1:  # the model builds its CP context from the global doc ids
            input_ids = shard_sequence(input_ids, self.dims.cp, self.cp_rank)
            labels = shard_sequence(labels, self.dims.cp, self.cp_rank)
            pos = shard_sequence(pos, self.dims.cp, self.cp_rank)
        return forward_loss_sum(self.model, self.loss_sum, self.loss_chunks, self.autocast(),
                                input_ids, pos, mb.doc_ids, labels) * float(mb.loss_weight)

    def _micro_loss_sum(self, mb: Batch) -> torch.Tensor:
        """One micro-batch's loss sum without the backward (evaluation)."""
        with loss_context(self.dims.tp):
            return materialize(self._forward_loss(mb))

    def forward_backward(self, micro_batches: list[Batch], global_target_tokens: int) -> torch.Tensor:
        self.begin_step_accounting()
        denom = float(max(global_target_tokens, 1))
        total = torch.zeros((), dtype=torch.float32)
        with self.counting():
            for i, mb in enumerate(micro_batches):
                last = i == len(micro_batches) - 1
                with self._sync_context(last), loss_context(self.dims.tp):
                    loss_sum = self._forward_loss(mb)
                    (loss_sum * (self.grad_replicas / denom)).backward()
                    loss_sum = materialize(loss_sum.detach())
                total += loss_sum.float().cpu() / denom
            if self.dims.tp > 1:
                self.finalize_grads()
            self.sync_replicated_grads()
            return self._sum_loss(total)
