"""Pipeline parallelism with `torch.distributed.pipelining`.

The model's layers are cut into pp x (stages per rank) consecutive stages (even, or uneven
with the first stages one layer longer), placed as the schedule needs
(`costmodels.pipeline.rank_stage_ids`): looped, rank r holding stages r, r + pp, ...
(interleaved 1F1B, Narayanan et al. 2021 §2.2), or a V, rank r holding r and 2 pp - 1 - r
(ZB-V and DualPipe-V, whose first rank holds the output head). Each stage is the executor's
own Transformer with the other layers deleted and the embedding / final norm / output
kept only on the first / last stage, so parameter names — and checkpoints — are those of
the one-process model. Schedules (`costmodels.pipeline.SCHEDULES`): GPipe, 1F1B,
interleaved 1F1B, and the zero-bubble ones, whose stages run each backward as an
input-gradient and a later weight-gradient step (torch's stage splits it): ZB-H1 and
interleaved zero bubble (ScheduleInterleavedZeroBubble), ZB-V, DualPipe-V. Each stage is set up by
`executor.parallel.parallelize` (TP + SP -> CP -> recompute -> FSDP2 / HSDP over the shard
group); replicated gradients are reduced by one flat all-reduce after the schedule (DDP's
bucket rebuild does not survive pipelining's partial backwards).
"""

from __future__ import annotations

import copy
import math
import sys
import time
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from costmodels import pipeline
from costmodels.errors import MeshplanError
from costmodels.pipeline import stage_layer_counts
from costmodels.pipeline_sim import single_stage_orders
from executor.attention import resolve_backend
from executor.data.batch import Batch
from executor.parallel.base import DistributedStrategy, token_loss_sum
from executor.parallel.comm import WAIT_CLOCK
from executor.parallel.cp import shard_sequence
from executor.parallel.parallelize import gradient_sync, parallelize_chunk
from executor.parallel.spmd import strategy_name
from executor.parallel.tp import loss_context, materialize
from planner.planfile import Plan


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


class PipelineStrategy(DistributedStrategy):
    def __init__(self, plan: Plan) -> None:
        super().__init__(plan)
        lay = plan.layout
        spec = plan.layout_spec()
        self.vpp = spec.vpp
        self.stages_per_rank = spec.stages_per_rank
        self.schedule_name = spec.effective_schedule
        self.schedule_kind = pipeline.BY_NAME[self.schedule_name]
        self.n_stages = self.dims.pp * self.stages_per_rank
        self.sharding = lay.sharding
        self.grad_sync = gradient_sync(lay.sharding, self.dims, pipelined=True, ep=lay.ep)
        inner = strategy_name(lay, self.dims, self.grad_sync)
        self.name = f"pp{self.dims.pp}-{self.schedule_name}" + ("" if inner == "single" else f"+{inner}")
        self._chunks: list[nn.Module] = []
        self._stages: list[Any] = []
        self._schedule: Any = None
        self._schedule_n = 0
        self._schedule_wall = self._schedule_busy = 0.0  # the last step's, see pipeline_idle

    @property
    def is_loss_owner(self) -> bool:
        # the rank holding the last stage (the last pp rank; the first in a V); under TP
        # every rank of it holds the loss, one counts it
        return self.n_stages - 1 in self.stage_ids() and self.tp_rank == 0

    def stage_ids(self) -> list[int]:
        return pipeline.rank_stage_ids(self.pp_rank, self.dims.pp, self.stages_per_rank,
                                       self.schedule_kind.placement)

    def setup(self, model: nn.Module, plan: Plan) -> None:
        model.attention_backend = resolve_backend(plan.train.attention_backend, self.device)
        from torch.distributed.pipelining import PipelineStage
        self.remember_parameter_order(model)

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
            parallelize_chunk(chunk, self.dims, self.mesh, plan.layout, self.precision,
                              compile_blocks=plan.train.compile)
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
        """The schedule the built object runs, named as `layout.schedule` names it (the
        zero-bubble class with one stage per rank is ZB-H1)."""
        cls = type(self._schedule).__name__
        names = [s.name for s in pipeline.SCHEDULES if s.torch_class == cls]
        if len(names) > 1:  # ScheduleInterleavedZeroBubble: by its stages per rank
            names = [n for n in names if pipeline.BY_NAME[n].multi == (len(self._stages) > 1)]
        return names[0] if names else cls

    def microbatches_applied(self) -> int:
        return int(self._schedule._n_microbatches)

    def pipeline_idle(self) -> dict[str, float]:
        """This step's pipeline idle time, mean over ranks: the span of the schedule (its
        slowest rank's wall time) less each rank's own compute inside it (its wall time
        less the time it waited on its neighbours); the warm-up and cool-down idle outside a
        rank's first and last action count too. One all-gather, outside the step's
        accounting (a metric, not training)."""
        mine = torch.tensor([self._schedule_wall, self._schedule_busy], dtype=torch.float64)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        walls = torch.stack(every)
        span = float(walls[:, 0].max())
        return {"pp_span_s": span, "pp_idle_s": float((span - walls[:, 1]).mean())}

    def action_orders(self) -> dict[int, list[tuple[str, int, int]]]:
        """Every pipeline rank's compute actions (kind, stage, micro-batch) in the order the
        built schedule runs them: torch's own lists for the multi-stage runtimes, GPipe and
        1F1B's fixed orders otherwise (`costmodels.pipeline_sim`)."""
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle

        if isinstance(self._schedule, PipelineScheduleSingle):
            return single_stage_orders(self.schedule_name, self.dims.pp, self._schedule_n)
        order = self._schedule.pipeline_order
        kinds = {"FORWARD": "F", "BACKWARD_INPUT": "B", "BACKWARD_WEIGHT": "W", "FULL_BACKWARD": "BW"}
        out: dict[int, list[tuple[str, int, int]]] = {}
        for r, acts in order.items():  # compute only (not the REDUCE_GRAD / UNSHARD bookkeeping)
            steps = [(str(s.computation_type).rsplit(".", 1)[-1], s.stage_index, s.microbatch_index)
                     for a in acts if a is not None for s in (a.sub_actions or [a])]
            out[r] = [(kinds[k], st, mb) for k, st, mb in steps if k in kinds]
        return out

    def predicted_pipeline(self) -> dict[str, float]:
        """The cost model's pipeline idle for this run on this host: its forward, input- and
        weight-gradient time per micro-batch (`costmodels.steptime`, this machine's profile)
        and the output head on the last stage, through the schedule's own action order,
        time-shared where the host has fewer cores than ranks (`costmodels.pipeline_sim`)."""
        from costmodels.cases import single_case
        from costmodels.pipeline_sim import simulate
        from costmodels.specs import ClusterSpec
        from costmodels.steptime import evaluate
        from planner.profiles import load_profile

        lay, spec = self.plan.layout_spec(), self.plan.model_spec()
        profile = load_profile(None)
        cluster = ClusterSpec(self.plan.cluster.accelerator, lay.world_size)
        pred = evaluate(single_case(spec, lay, cluster, profile.hardware.get(cluster.accelerator),
                                    "meshplan"), profile)
        g = {k: float(v[0]) for k, v in pred.items()}
        full_speed = g["core_share"] / self.stages_per_rank  # one chunk at a whole core
        per = {"F": g["pp_fwd_s"], "B": g["pp_bwd_input_s"], "W": g["pp_bwd_weight_s"]}
        head = g["pp_head_s"] * g["core_share"] / 3  # its fwd, dX and dW GEMMs
        last = self.n_stages - 1

        def duration(kind: str, stage: int) -> float:
            parts = ("B", "W") if kind == "BW" else (kind,)
            return sum(per[k] * full_speed + (head if stage == last else 0.0) for k in parts)

        cap = g["core_capacity"]
        sim = simulate(self.action_orders(), self.n_stages, duration, cap if math.isfinite(cap) else None,
                       send_s=g["pp_send_s"])
        # the simulated span (sends included) replaces compute + bubble + p2p; the rest of the
        # step (gradient sync, optimizer, per-call costs) as the cost model has it
        step = (sim.span_s + g["non_pipeline_s"]) * (1 + g["straggler_factor"])
        return {"predicted_idle_s": sim.idle_s, "predicted_step_time_s": step,
                "predicted_bubble_share": sim.idle_s / step, "dedicated_bubble_s": g["pp_bubble_s"]}

    def model_parts(self) -> list[nn.Module]:
        return list(self._chunks)

    def _build_schedule(self, n: int) -> Any:
        from torch.distributed.pipelining import schedules

        kw = dict(n_microbatches=n, loss_fn=self._loss, scale_grads=False)
        cls = getattr(schedules, self.schedule_kind.torch_class)
        if issubclass(cls, schedules.PipelineScheduleSingle):
            return cls(self._stages[0], **kw)
        return cls(self._stages, **kw)

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
        problem = pipeline.microbatch_problem(self.schedule_name, self.dims.pp, self.vpp, n)
        if problem:  # the contract refuses these before a run starts
            raise MeshplanError(f"{problem}; raise global_batch_size or lower micro_batch_size")
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
            t0, waited = time.perf_counter(), WAIT_CLOCK.seconds["pipeline"]
            with self.autocast(), loss_context(self.dims.tp), WAIT_CLOCK.bucket("pipeline"):
                self._schedule.step(
                    cat["input_ids"], position_ids=cat["position_ids"], doc_ids=cat["doc_ids"],
                    target=cat["labels"],
                )
            self._schedule_wall = time.perf_counter() - t0
            self._schedule_busy = self._schedule_wall - (WAIT_CLOCK.seconds["pipeline"] - waited)
            if self.dims.tp > 1:
                self.finalize_grads()
            self.sync_replicated_grads()
            total = torch.stack(self._loss_sums).sum() / self._denom if self._loss_sums \
                else torch.zeros(())
            return self._sum_loss(total)
