"""Pipeline parallelism with `torch.distributed.pipelining`.

The model's layers are cut into pp x vpp consecutive stages (even, or uneven with the first
stages one layer longer); rank r of the pipeline holds stages r, r + pp, ... (the looped
placement of interleaved 1F1B, Narayanan et al. 2021 §2.2). Each stage is the executor's
own Transformer with the other layers deleted and the embedding / final norm / output
kept only on the first / last stage, so parameter names — and checkpoints — are those of
the one-process model. Schedules: GPipe (Huang et al. 2019), 1F1B (PipeDream-Flush,
Narayanan et al. 2021 §2.1) and interleaved 1F1B (§2.2). Each stage can be data-parallel
(DDP or FSDP2 over the dp axis).
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from costmodels.errors import MeshplanError
from executor.attention import resolve_backend
from executor.data.batch import Batch
from executor.parallel.base import DistributedStrategy, token_loss_sum
from executor.parallel.comm import WAIT_CLOCK
from executor.parallel.data_parallel import apply_fsdp
from executor.parallel.mesh import submesh


def split_layers(layers: int, stages: int, sizes: list[int] | None = None) -> list[range]:
    """Consecutive layer ranges, one per stage: explicit sizes, or as even as possible."""
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
        base, extra = divmod(layers, stages)
        sizes = [base + (1 if i < extra else 0) for i in range(stages)]
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
        if self.dims.tp > 1 or self.dims.cp > 1:
            raise MeshplanError(
                "layout.pp > 1 with tp > 1 or cp > 1 is not supported by the executor yet; "
                "use pp with dp only"
            )
        self.vpp = lay.vpp
        self.schedule_name = "interleaved" if lay.vpp > 1 else lay.schedule
        self.n_stages = self.dims.pp * self.vpp
        self.sharding = lay.sharding
        self.stage_sizes = getattr(lay, "pp_layers", None)
        self.name = f"pp{self.dims.pp}-{self.schedule_name}" + (
            f"+{'ddp' if self.sharding == 'none' else 'fsdp2-' + self.sharding}"
            if self.dims.dp > 1 else "")
        self._chunks: list[nn.Module] = []
        self._stages: list[Any] = []
        self._schedule: Any = None
        self._schedule_n = 0
        self._ddp = False

    @property
    def is_loss_owner(self) -> bool:
        return self.pp_rank == self.dims.pp - 1  # the last stage lives on the last pp rank

    def stage_ids(self) -> list[int]:
        return [self.pp_rank + k * self.dims.pp for k in range(self.vpp)]

    def setup(self, model: nn.Module, plan: Any) -> None:
        model.attention_backend = resolve_backend(plan.train.attention_backend, self.device)
        from torch.distributed.pipelining import PipelineStage

        spec = model.spec
        if spec.tied_embeddings:
            raise MeshplanError(
                "layout.pp > 1 needs untied embeddings (model.tied_embeddings=false)"
            )
        ranges = split_layers(spec.layers, self.n_stages, self.stage_sizes)
        pp_group = self.mesh["pp"].get_group()
        dp_mesh = submesh(self.mesh, self.dims, "dp")
        ids = self.stage_ids()
        for k, sid in enumerate(ids):
            chunk = model if k == len(ids) - 1 else copy.deepcopy(model)
            prune_to_stage(chunk, ranges[sid], sid == 0, sid == self.n_stages - 1)
            chunk.to(self.device)
            self._chunks.append(chunk)
            wrapped: nn.Module = chunk
            if dp_mesh is not None and self.sharding != "none":
                apply_fsdp(chunk, dp_mesh, self.sharding, self.precision)
            elif dp_mesh is not None:
                # DDP's bucket rebuild does not survive pipelining's partial backwards, so
                # replicas average their gradients after the schedule (see _all_reduce_grads).
                self._dp_group = dp_mesh.get_group()
                self._ddp = True
            self._stages.append(
                PipelineStage(wrapped, sid, self.n_stages, self.device, group=pp_group)
            )
        self.model = self._chunks[0]
        self.build_optimizers()

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
        self._loss_sums.append(ls.detach().float().cpu())
        return ls * (self.grad_replicas / self._denom)

    @torch.no_grad()
    def _all_reduce_grads(self) -> None:
        """One flat all-reduce of this stage's gradients over the dp group, then the mean
        (what DDP does, Li et al. 2020 §3.2, in a single bucket)."""
        grads = [p.grad for c in self._chunks for p in c.parameters() if p.grad is not None]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=self._dp_group)
        flat.div_(self.dims.dp)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def forward_backward(self, micro_batches: list[Batch], global_target_tokens: int) -> torch.Tensor:
        self.begin_step_accounting()
        rows = sum(mb.rows for mb in micro_batches)
        n = len(micro_batches)
        need = _min_microbatches(self.schedule_name, self.dims.pp)
        if n < need:  # re-split the rows more finely: the loss normaliser is global anyway
            n = next((m for m in range(need, rows + 1) if rows % m == 0), 0)
            if not n:
                raise MeshplanError(
                    f"layout.schedule={self.schedule_name}: {rows} rows per data-parallel rank "
                    f"cannot make the {need} micro-batches it needs; raise global_batch_size"
                )
        cat = {f: torch.cat([getattr(mb, f) for mb in micro_batches]).to(self.device)
               for f in ("input_ids", "labels", "position_ids", "doc_ids")}
        self._row_weights = torch.cat([
            torch.full((mb.rows,), float(mb.loss_weight)) for mb in micro_batches])
        self._denom = float(max(global_target_tokens, 1))
        self._loss_calls = 0
        self._loss_sums: list[torch.Tensor] = []
        if self._schedule is None or self._schedule_n != n:
            self._schedule = self._build_schedule(n)
            self._schedule_n = n
        with self.counting():
            with self.autocast(), WAIT_CLOCK.bucket("pipeline"):
                self._schedule.step(
                    cat["input_ids"], position_ids=cat["position_ids"], doc_ids=cat["doc_ids"],
                    target=cat["labels"],
                )
            if self._ddp:
                self._all_reduce_grads()
            total = torch.stack(self._loss_sums).sum() / self._denom if self._loss_sums \
                else torch.zeros(())
            return self._sum_loss(total)
