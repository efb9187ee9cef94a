"""What every multi-process strategy shares: ranks, the data-parallel row split, the loss
normalised by the global target-token count, the global gradient norm, scalar all-reduces,
communication accounting and distributed checkpoints.

The loss each rank back-propagates is sum(token losses on its rows) / (target tokens of the
WHOLE step, all micro-batches and all data-parallel ranks), multiplied by the number of
gradient replicas (dp x cp) because DDP, FSDP and DeepSpeed average gradients over their
group. The reduced gradient is then exactly the one-process gradient of the mean token
loss over the global batch (Goyal et al. 2017, §2.2: large-batch SGD sums per-example
gradients; averaging over k workers needs the k-fold loss scale to stay equal).
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from costmodels.comm_volume import whole_tensor_grad_norm
from costmodels.errors import MeshplanError
from executor.applied import applied_layout, check_applied
from executor.data.batch import Batch
from executor.loss import apply_loss_chunks
from executor.parallel.comm import CommCounter
from executor.parallel.comm_accounting import CommAccounting
from executor.parallel.data_parallel import fsdp_param_group, fsdp_reshards_after_forward
from executor.parallel.expert_grads import ExpertGrads
from executor.parallel.mesh import ParallelDims, axis, build_mesh, init_distributed, release_meshes
from executor.parallel.parallelize import apply_recompute
from executor.parallel.tp import local_tensor
from executor.parallel.zero1 import Zero1Partition
from executor.strategy import Strategy, autocast_dtype, build_optimizer, token_loss_sum
from planner.planfile import Plan

__all__ = ["DistributedStrategy", "token_loss_sum"]


WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _plain_name(name: str) -> str:
    """A parameter's name in the one-process model: wrapper segments (activation
    checkpointing, torch.compile, FSDP1) and DDP's `module.` prefix removed."""
    for seg in WRAPPER_SEGMENTS:
        name = name.replace(seg, "")
    return name.removeprefix("module.")


def _is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


class DistributedStrategy(CommAccounting, ExpertGrads, Strategy):
    """Base class of the torch.distributed strategies (the seam of `executor.strategy`)."""

    name = "distributed"

    def __init__(self, plan: Plan) -> None:
        super().__init__()
        from costmodels.capabilities import unsupported
        from executor.compile import compile_refusal

        reason = unsupported(plan.model_spec(), plan.layout_spec()) or compile_refusal(plan)
        if reason is not None:  # the contract the planner and preflight read
            raise MeshplanError(reason)
        self.plan = plan
        self.dims = ParallelDims.from_plan(plan)
        self.rank, self.world_size = init_distributed()
        self.dims.check_world_size(self.world_size)
        coords = self.dims.coords(self.rank)
        self.dp_rank, self.dp_size = coords["dp"], self.dims.dp
        self.tp_rank, self.pp_rank, self.cp_rank = coords["tp"], coords["pp"], coords["cp"]
        self.is_logging_rank = self.rank == 0
        if torch.cuda.is_available():
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        else:
            self.device = torch.device("cpu")
        self.mesh = build_mesh(self.dims)
        self.precision = plan.train.precision
        self.amp_dtype = autocast_dtype(self.precision)
        self.optimizers: list[torch.optim.Optimizer] = []
        self.zero1: list[Zero1Partition] = []
        self.comm = CommCounter()
        self.comm_enabled = os.environ.get("MESHPLAN_COMM_ACCOUNTING", "1") != "0"
        self.last_comm: dict[str, int] = {}
        # Gradient replicas that average (dp x cp); see the module docstring.
        self.grad_replicas = self.dims.size("dp_cp")
        self.grad_sync = "none"
        self.applied: dict[str, Any] = {}
        self._param_index: dict[str, int] = {}  # see remember_parameter_order

    # ------------------------------------------------------------------ bookkeeping
    @property
    def is_loss_owner(self) -> bool:
        """One rank per (dp, cp) coordinate contributes its loss to the global sum."""
        return self.tp_rank == 0 and self.pp_rank == self.dims.pp - 1

    # ------------------------------------------------------------------ data
    def local_rows(self, global_batch: Batch) -> Batch:
        """This data-parallel rank's contiguous share of the global batch's rows."""
        rows = global_batch.rows
        if rows % self.dp_size:
            raise ValueError(f"global batch of {rows} rows does not split over dp={self.dp_size}")
        per = rows // self.dp_size
        return global_batch.select(slice(self.dp_rank * per, (self.dp_rank + 1) * per))

    # ------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, plan: Plan) -> None:
        raise NotImplementedError

    def build_optimizers(self) -> None:
        """The executor's own AdamW (same groups and defaults as one process), one per
        model part this rank holds; under ZeRO-1 over this rank's partition only."""
        parts = self.model_parts()
        if self.plan.layout.sharding == "zero1" and self.grad_replicas > 1:
            group = axis(self.mesh, self.dims, "dp_shard_cp").get_group()
            self.zero1 = [Zero1Partition(part, group) for part in parts]
            self.optimizers = [z.optimizer(self.plan.train, self.device) for z in self.zero1]
        else:
            self.optimizers = [build_optimizer(part, self.plan.train, self.device) for part in parts]
        self.optimizer = self.optimizers[0]

    def set_recompute(self, chunks: list[nn.Module]) -> int:
        """Recompute (and `layout.loss_chunks`, the loss's own recompute) on the model parts."""
        lay = self.plan.layout
        self._recomputed = apply_recompute(chunks, lay.recompute, lay.recompute_layers)
        self._blocks = sum(len(c.layers) for c in chunks)
        self.loss_chunks = apply_loss_chunks(chunks, lay.loss_chunks)
        return self._recomputed

    def record_applied(self) -> None:
        """`applied` (summary.json): what this rank set up, read from the mesh, the wrappers,
        the optimizer and the schedule; a difference from the plan is an error here, before
        the first step."""
        lay = self.plan.layout_spec()
        sizes = {} if self.mesh is None else {n: self.mesh[n].size() for n in self.mesh.mesh_dim_names}
        self.applied = applied_layout(lay, sizes, self.sharding_applied(), self.grad_sync,
                                      self._recomputed, self._blocks, self.schedule_applied(),
                                      self.microbatches_applied())
        check_applied(lay, self.applied)
        from executor.compile import compiled_blocks

        self.applied["compiled_blocks"] = compiled_blocks(self.model_parts())
        self.applied["loss_chunks"] = self.loss_chunks

    def sharding_applied(self) -> str:
        """The ZeRO stage the built objects implement: FSDP2's reshard-after-forward (zero3)
        or not (zero2), ZeRO-1's partitioned optimizer, else none."""
        from torch.distributed.fsdp import FSDPModule

        if self.zero1:
            return "zero1"
        groups = [g for part in self.model_parts() for m in part.modules()
                  if isinstance(m, FSDPModule) and (g := fsdp_param_group(m)) is not None]
        if not groups:
            return "none"
        stages = {"zero3" if fsdp_reshards_after_forward(g) else "zero2" for g in groups}
        return stages.pop() if len(stages) == 1 else "mixed:" + ",".join(sorted(stages))

    def schedule_applied(self) -> str:
        return "none"

    def microbatches_applied(self) -> int:
        return self.plan.layout.grad_accum

    # ------------------------------------------------------------------ step
    def _sum_loss(self, local: torch.Tensor) -> torch.Tensor:
        """All ranks agree on the step loss: the sum over the loss-owning ranks."""
        x = local.detach().float().reshape(1).clone()
        if not self.is_loss_owner:
            x.zero_()
        dist.all_reduce(x)
        return x[0]

    def grad_norm_sq_local(self) -> torch.Tensor:
        """This rank's share of the squared global gradient norm.

        Every rank of this pipeline stage holds some copy: a DTensor grad's local shard is
        held once per replica along its mesh's replicated dimensions and once per rank of
        the stage outside its mesh (data-parallel replicas of a TP-only DTensor); a plain
        tensor is replicated over every rank of the stage.
        """
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        plain_replicas = self.world_size // self.dims.pp
        for part in self.model_parts():
            for p in part.parameters():
                g = p.grad
                if g is None:
                    continue
                if _is_dtensor(g):
                    local = g.to_local()
                    reps = plain_replicas // g.device_mesh.size()
                    for i, pl in enumerate(g.placements):
                        if pl.is_replicate():
                            reps *= g.device_mesh.size(i)
                else:
                    local, reps = g, plain_replicas
                total += local.double().pow(2).sum() / reps
        return total

    @torch.no_grad()
    def finalize_grads(self) -> None:
        """Bring DTensor gradients to their parameter's placements.

        Under sequence parallelism the norm weights' gradients come out Partial (each rank
        summed over its sequence shard); one all-reduce per weight makes them Replicate, so
        the gradient norm and the optimizer see the true gradient (Korthikanti et al. 2022,
        §4.2.2: the sequence-parallel norm gradients are all-reduced over the TP group).
        """
        for part in self.model_parts():
            for p in part.parameters():
                g = p.grad
                if g is not None and _is_dtensor(g) and tuple(g.placements) != tuple(p.placements):
                    p.grad = g.redistribute(p.device_mesh, p.placements)

    def grads(self) -> list[torch.Tensor]:
        out = []
        for part in self.model_parts():
            for p in part.parameters():
                if p.grad is not None:
                    out.append(local_tensor(p.grad))
        return out

    def remember_parameter_order(self, model: nn.Module) -> None:
        """The one-process model's parameter order, before stages are cut or wrapped: where
        every rank holds whole tensors (`costmodels.comm_volume.whole_tensor_grad_norm`) the
        clip combines per-tensor norms in this order, as one process does."""
        if whole_tensor_grad_norm(self.plan.layout_spec()):
            self._param_index = {_plain_name(n): i for i, (n, _) in enumerate(model.named_parameters())}

    def _whole_tensor_clip(self, max_norm: float) -> float:
        """torch.nn.utils.clip_grad_norm_(foreach=True) over the whole model, bit for bit:
        each tensor's norm by `torch._foreach_norm`, one owner rank per tensor (data-parallel
        rank 0 of its stage; the other copies add only a non-finite flag), summed into the one-process order (x + 0 is exact), the norm
        of the norms, and the clamped fp32 coefficient applied to every gradient."""
        named = [(n, p.grad) for part in self.model_parts() for n, p in part.named_parameters()
                 if p.grad is not None]
        norms = torch.zeros(len(self._param_index), dtype=torch.float32, device=self.device)
        if named:
            local = torch._foreach_norm([g for _, g in named], 2)
            if self.dp_rank == 0 and self.cp_rank == 0:
                idx = torch.tensor([self._param_index[_plain_name(n)] for n, _ in named], device=self.device)
                norms[idx] = torch.stack(local).to(torch.float32)
            else:  # + 0 when finite (exact); a NaN / inf in this copy reaches every rank's total
                norms[:1] += torch.stack(local).sum().to(torch.float32) * 0
        with self.counting():
            dist.all_reduce(norms)
        total = torch.linalg.vector_norm(norms, 2)
        if max_norm > 0 and bool(torch.isfinite(total)):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            with torch.no_grad():
                torch._foreach_mul_([g for _, g in named], coef)
        return float(total)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the gradient; scale by max_norm / (norm + 1e-6) when above
        (the rule of torch.nn.utils.clip_grad_norm_, Pascanu et al. 2013 §3.2)."""
        if self._param_index:
            return self._whole_tensor_clip(max_norm)
        with self.counting():
            sq = self.grad_norm_sq_local().float().reshape(1)
            dist.all_reduce(sq)
        norm = math.sqrt(max(float(sq[0]), 0.0))
        if max_norm > 0 and math.isfinite(norm):
            coef = max_norm / (norm + 1e-6)
            if coef < 1.0:
                with torch.no_grad():
                    for g in self.grads():
                        g.mul_(coef)
        return norm

    def parameters(self):
        return (p for part in self.model_parts() for p in part.parameters()
                if p.grad is not None)

    def optimizer_step(self) -> None:
        with self.counting():
            for z in self.zero1:
                z.attach_grads()
            for opt in self.optimizers:
                opt.step()
            for z in self.zero1:
                z.all_gather_updated()

    def dcp_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers DCP reads and writes: the real ones, or under ZeRO-1 whole-state
        AdamWs over the module parameters assembled from the partitions (collective)."""
        if not self.zero1:
            return self.optimizers
        return [z.consolidated(o, self.plan.train, self.device)
                for z, o in zip(self.zero1, self.optimizers, strict=True)]

    def dcp_loaded(self, opts: list[torch.optim.Optimizer]) -> None:
        """After DCP filled `dcp_optimizers()`: cut ZeRO-1 state back into the partitions."""
        if not self.zero1:
            return
        for z, o, full in zip(self.zero1, self.optimizers, opts, strict=True):
            z.load_consolidated(o, full)

    def zero_grad(self) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        if self.zero1:  # gradients of the parameters other ranks own
            for part in self.model_parts():
                part.zero_grad(set_to_none=True)

    def set_lr(self, lr: float) -> None:
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = lr

    # ------------------------------------------------------------------ scalars
    def all_reduce_sum(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t[0])

    def all_reduce_max(self, x: float) -> float:
        t = torch.tensor([float(x)], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return float(t[0])

    def barrier(self) -> None:
        dist.barrier()

    # ------------------------------------------------------------------ state
    def model_state_dict(self) -> dict[str, Any]:
        from executor.parallel.dcp import full_model_state_dict

        return full_model_state_dict(self)

    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        from executor.parallel.dcp import load_full_model_state_dict

        load_full_model_state_dict(self, state)

    def optim_state_dict(self) -> dict[str, Any]:
        from executor.parallel.dcp import sharded_state

        return sharded_state(self)["optim"]

    def load_optim_state_dict(self, state: dict[str, Any]) -> None:
        from executor.parallel.dcp import apply_sharded_state

        apply_sharded_state(self, {"optim": state}, model=False)

    def save_checkpoint(self, directory: Any, extra_state: dict[str, Any]) -> None:
        from executor.parallel.dcp import save_distributed

        save_distributed(self, directory, extra_state)

    def load_checkpoint(self, directory: Any) -> dict[str, Any]:
        from executor.parallel.dcp import load_distributed

        return load_distributed(self, directory)

    def teardown(self) -> None:
        if dist.is_initialized():
            try:
                dist.barrier()
            finally:
                release_meshes()
                dist.destroy_process_group()


