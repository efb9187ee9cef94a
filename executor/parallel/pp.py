"""Pipeline parallelism with `torch.distributed.pipelining`.

The model's layers are cut into pp x vpp consecutive stages (even, or uneven with the first
stages one layer longer); rank r of the pipeline holds stages r, r + pp, ... (the looped
placement of interleaved 1F1B, Narayanan et al. 2021 §2.2). Each stage is the executor's
own Transformer with the other layers deleted and the embedding / final norm / output
kept only on the first / last stage, so parameter names — and checkpoints — are those of
the one-process model. Schedules: GPipe (Huang et al. 2019), 1F1B (PipeDream-Flush,
Narayanan et al. 2021 §2.1) and interleaved 1F1B (§2.2). Each stage is set up by
`executor.parallel.parallelize` (TP + SP -> CP -> recompute -> FSDP2 / HSDP over the shard
group); replicated gradients are reduced by one flat all-reduce after the schedule (DDP's
bucket rebuild does not survive pipelining's partial backwards).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
from torch import nn

from costmodels.errors import MeshplanError
from costmodels.pipeline import stage_layer_counts
from executor.attention import resolve_backend
from executor.data.batch import Batch
from executor.parallel.base import DistributedStrategy, token_loss_sum
from executor.parallel.comm import WAIT_CLOCK
from executor.parallel.cp import shard_sequence
from executor.parallel.parallelize import gradient_sync, parallelize_chunk
from executor.parallel.spmd import strategy_name
from executor.parallel.tp import loss_context, materialize


def split_layers(layers: int, stages: int, sizes: list[int] | None = None) -> list[range]:
    """Consecutive layer ranges, one per stage: explicit sizes, or
    `costmodels.pipeline.stage_layer_counts` (as even as possible, the first stages longer)."""
    if sizes:
        if len(sizes) != stages or sum(sizes) != layers or min(sizes) < 1:
            raise MeshplanError(
                f"layout.pp_layers={sizes}: needs {stages} positive counts summing to "
                f"{layers} layers"
            )
    else:
        if stages > layers:
            raise MeshplanError(
                f"layout.pp*vpp={stages} exceeds the model's {layers} layers; use fewer stages"
            )
        sizes = stage_layer_counts(layers, stages)
    out, start = [], 0
    for n in sizes:
        out.append(range(start, start + n))
        start += n
    return out


def prune_to_stage(model: nn.Module, keep: range, first: bool, last: bool) -> nn.Module:
    for key in list(model.layers.keys()):
        if int(key) not in keep:
            del model.layers[key]
    if not first:
        model.tok_embeddings = None
    if not last:
        model.norm = None
        model.output = None
    return model


def _min_microbatches(schedule: str, pp: int) -> int:
    """1F1B and interleaved 1F1B need at least as many micro-batches as pipeline ranks."""
    return 1 if schedule == "gpipe" else pp


class PipelineStrategy(DistributedStrategy):
    def __init__(self, plan: Any) -> None:
        super().__init__(plan)
        lay = plan.layout
        self.vpp = lay.vpp
        self.schedule_name = plan.layout_spec().effective_schedule
        self.n_stages = self.dims.pp * self.vpp
        self.sharding = lay.sharding
        self.grad_sync = gradient_sync(lay.sharding, self.dims, pipelined=True, ep=lay.ep)
        inner = strategy_name(lay, self.dims, self.grad_sync)
        self.name = f"pp{self.dims.pp}-{self.schedule_name}" + ("" if inner == "single" else f"+{inner}")
        self._chunks: list[nn.Module] = []
        self._stages: list[Any] = []
        self._schedule: Any = None
        self._schedule_n = 0

    @property
    def is_loss_owner(self) -> bool:
        # the last stage lives on the last pp rank; under TP every rank of it holds the loss
        return self.pp_rank == self.dims.pp - 1 and self.tp_rank == 0

    def stage_ids(self) -> list[int]:
        return [self.pp_rank + k * self.dims.pp for k in range(self.vpp)]

    def setup(self, model: nn.Module, plan: Any) -> None:
        model.attention_backend = resolve_backend(plan.train.attention_backend, self.device)
        from torch.distributed.pipelining import PipelineStage

        spec = model.spec
        ranges = split_layers(spec.layers, self.n_stages)
        pp_group = self.mesh["pp"].get_group()
        ids = self.stage_ids()
        for k, sid in enumerate(ids):
            chunk = model if k == len(ids) - 1 else copy.deepcopy(model)
            prune_to_stage(chunk, ranges[sid], sid == 0, sid == self.n_stages - 1)
            chunk.to(self.device)
            self._chunks.append(chunk)
        self.set_recompute(self._chunks)
        for chunk, sid in zip(self._chunks, ids, strict=True):
            parallelize_chunk(chunk, self.dims, self.mesh, plan.layout, self.precision)
            self._stages.append(
                PipelineStage(chunk, sid, self.n_stages, self.device, group=pp_group)
            )
        self.model = self._chunks[0]
        self.configure_moe()
        self.build_optimizers()
        # the schedule for the plan's micro-batches, built before the first step
        self._schedule_n = plan.layout.grad_accum
        self._schedule = self._build_schedule(self._schedule_n)
        self.record_applied()

    def schedule_applied(self) -> str:
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        kinds = {ScheduleGPipe: "gpipe", Schedule1F1B: "1f1b", ScheduleInterleaved1F1B: "interleaved"}
        return kinds.get(type(self._schedule), type(self._schedule).__name__)

    def microbatches_applied(self) -> int:
        return int(self._schedule._n_microbatches)

    def model_parts(self) -> list[nn.Module]:
        return list(self._chunks)

    def _build_schedule(self, n: int) -> Any:
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleGPipe,
            ScheduleInterleaved1F1B,
        )

        kw = dict(n_microbatches=n, loss_fn=self._loss, scale_grads=False)
        if self.schedule_name == "interleaved":
            return ScheduleInterleaved1F1B(self._stages, **kw)
        cls = ScheduleGPipe if self.schedule_name == "gpipe" else Schedule1F1B
        return cls(self._stages[0], **kw)

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        caller = sys._getframe(1).f_code.co_name
        if logits.is_meta or caller.endswith("metadata_inference"):
            # The stage's one-time shape inference on the first step, not a micro-batch.
            return token_loss_sum(logits, labels)
        i = self._loss_calls
        self._loss_calls += 1
        rows = labels.shape[0]
        w = self._row_weights[i * rows:(i + 1) * rows]
        if bool((w == 1.0).all()):
            ls = token_loss_sum(logits, labels)
        else:  # per-row loss weights (fault injection): weight each row's token sum
            per_tok = torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                ignore_index=-100, reduction="none").view(rows, -1)
            ls = (per_tok.sum(1) * w.to(per_tok.device)).sum()
        self._loss_sums.append(materialize(ls.detach()).float().cpu())
        return ls * (self.grad_replicas / self._denom)

    def forward_backward(self, micro_batches: list[Batch], global_target_tokens: int) -> torch.Tensor:
        self.begin_step_accounting()
        n = len(micro_batches)
        if n < _min_microbatches(self.schedule_name, self.dims.pp):  # the contract refuses these
            raise MeshplanError(
                f"layout.schedule={self.schedule_name}: {n} micro-batches per step is fewer than "
                f"pp={self.dims.pp}; raise global_batch_size or lower micro_batch_size"
            )
        cat = {f: torch.cat([getattr(mb, f) for mb in micro_batches]).to(self.device)
               for f in ("input_ids", "labels", "position_ids", "doc_ids")}
        if self.dims.cp > 1:  # local sequence shards; the model reads the global doc ids
            for f in ("input_ids", "labels", "position_ids"):
                cat[f] = shard_sequence(cat[f], self.dims.cp, self.cp_rank)
        self._row_weights = torch.cat([
            torch.full((mb.rows,), float(mb.loss_weight)) for mb in micro_batches])
        self._denom = float(max(global_target_tokens, 1))
        self._loss_calls = 0
        self._loss_sums: list[torch.Tensor] = []
        if self._schedule is None or self._schedule_n != n:
            self._schedule = self._build_schedule(n)
            self._schedule_n = n
        with self.counting():
            with self.autocast(), loss_context(self.dims.tp), WAIT_CLOCK.bucket("pipeline"):
                self._schedule.step(
                    cat["input_ids"], position_ids=cat["position_ids"], doc_ids=cat["doc_ids"],
                    target=cat["labels"],
                )
            if self.dims.tp > 1:
                self.finalize_grads()
            self.sync_replicated_grads()
            total = torch.stack(self._loss_sums).sum() / self._denom if self._loss_sums \
                else torch.zeros(())
            return self._sum_loss(total)
