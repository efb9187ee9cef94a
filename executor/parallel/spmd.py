"""The SPMD strategy: every rank runs the whole model on its data — DDP or FSDP2 over the
data-parallel axis, optionally with DTensor tensor parallelism and context parallelism."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from executor.attention import resolve_backend
from executor.data.batch import Batch
from executor.parallel.base import DistributedStrategy, token_loss_sum
from executor.parallel.cp import enable_context_parallel, make_cp_context, shard_sequence
from executor.parallel.data_parallel import apply_ddp, apply_fsdp, uses_fsdp
from executor.parallel.mesh import data_parallel_submesh, submesh
from executor.parallel.tp import apply_tensor_parallel, loss_context, materialize


class SPMDStrategy(DistributedStrategy):
    def __init__(self, plan: Any) -> None:
        super().__init__(plan)
        lay = plan.layout
        self.sharding = lay.sharding
        self.fsdp = uses_fsdp(lay.sharding, lay.tp)
        self.ddp = False
        parts = []
        if self.dims.dp * self.dims.cp > 1:
            parts.append("fsdp2-" + ("zero3" if lay.sharding == "zero3" else "zero2")
                         if self.fsdp else "ddp")
        if self.dims.tp > 1:
            parts.append(f"tp{self.dims.tp}")
        if self.dims.cp > 1:
            parts.append(f"cp{self.dims.cp}")
        self.name = "+".join(parts) or "single"
        self._inner: nn.Module | None = None  # the unwrapped model
        self.causal = True

    def setup(self, model: nn.Module, plan: Any) -> None:
        model.attention_backend = resolve_backend(plan.train.attention_backend, self.device)
        model.to(self.device)
        self._inner = model
        self.causal = bool(getattr(model, "causal", True))
        tp_mesh = submesh(self.mesh, self.dims, "tp")
        dp_mesh = data_parallel_submesh(self.mesh, self.dims)
        if tp_mesh is not None:
            apply_tensor_parallel(model, tp_mesh, plan.layout.sequence_parallel)
        if self.dims.cp > 1:
            enable_context_parallel(model)
        if dp_mesh is not None and self.fsdp:
            apply_fsdp(model, dp_mesh, self.sharding, self.precision)
        elif dp_mesh is not None:
            model = apply_ddp(model, dp_mesh.get_group())
            self.ddp = True
        self.model = model
        self.build_optimizers()

    def model_parts(self) -> list[nn.Module]:
        assert self._inner is not None
        return [self._inner]

    def _sync_context(self, last: bool):
        """Reduce gradients only after the last micro-batch of the step."""
        if self.ddp and not last:
            return self.model.no_sync()  # type: ignore[union-attr,operator]
        if self.fsdp and hasattr(self.model, "set_requires_gradient_sync"):
            self.model.set_requires_gradient_sync(last)  # type: ignore[union-attr,operator]
            if self.sharding != "zero3":
                # zero1/zero2: keep parameters gathered across the step's micro-batches.
                self.model.set_reshard_after_backward(last)  # type: ignore[union-attr,operator]
        return nullcontext()

    def _forward_loss(self, mb: Batch) -> torch.Tensor:
        mb = mb.to(self.device)
        input_ids, labels, pos = mb.input_ids, mb.labels, mb.position_ids
        ctx = None
        if self.dims.cp > 1:
            group = self.mesh["cp"].get_group()
            ctx = make_cp_context(mb.doc_ids, self.causal, group, self.dims.cp)
            input_ids = shard_sequence(input_ids, self.dims.cp, self.cp_rank)
            labels = shard_sequence(labels, self.dims.cp, self.cp_rank)
            pos = shard_sequence(pos, self.dims.cp, self.cp_rank)
        with self.autocast():
            logits = self.model(input_ids, pos, mb.doc_ids, ctx)
        return token_loss_sum(logits, labels) * float(mb.loss_weight)

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
            return self._sum_loss(total)
