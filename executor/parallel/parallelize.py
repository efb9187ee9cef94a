"""One path from the model (or one pipeline chunk of it) to its parallel form, in the order
torchtitan's `parallelize_llama` uses: tensor parallelism (+ sequence parallelism) ->
context parallelism -> activation recompute -> FSDP2 / HSDP. Replicated data parallelism
(sharding none or zero1) is a gradient sync the strategy runs after the backward (DDP, or
one flat all-reduce where DDP cannot wrap the module: DTensor parameters, pipeline stages).

The SPMD and pipeline strategies set every chunk up through `parallelize_chunk` and
`apply_recompute` (DeepSpeed, a DP engine, through `apply_recompute`), so no strategy can
drop a part of the layout; `executor.applied` records what was set up.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from executor.parallel.cp import enable_context_parallel
from executor.parallel.data_parallel import apply_fsdp
from executor.parallel.ep import apply_moe_parallel, edp_mesh, moe_layers
from executor.parallel.mesh import ParallelDims, axis, fsdp_mesh
from executor.parallel.tp import apply_tensor_parallel, local_tensor

FSDP_STAGES = ("zero2", "zero3")


def uses_fsdp(sharding: str) -> bool:
    """ZeRO-2/3 run as FSDP2 `fully_shard`; none and ZeRO-1 keep whole gradients."""
    return sharding in FSDP_STAGES


def gradient_sync(sharding: str, dims: ParallelDims, pipelined: bool, ep: int = 1) -> str:
    """How replicas agree on gradients: "fsdp" (reduce-scatter inside FSDP2), "ddp"
    (DistributedDataParallel), "allreduce" (one flat all-reduce after the backward: DTensor
    parameters (TP, experts sharded over EP) or pipeline stages, which DDP cannot wrap) or
    "none" (one replica)."""
    if dims.size("dp_cp") == 1:
        return "none"
    if uses_fsdp(sharding):
        return "fsdp"
    return "allreduce" if pipelined or dims.tp > 1 or ep > 1 else "ddp"


def parallelize_chunk(chunk: nn.Module, dims: ParallelDims, mesh: Any, layout: Any,
                      precision: str, compile_blocks: bool = False) -> nn.Module:
    """TP -> EP (MoE layers) -> CP -> compile (`train.compile`) -> FSDP2 on one chunk
    (activation recompute is set across the rank's chunks by `apply_recompute` before this
    runs)."""
    tp_mesh = axis(mesh, dims, "tp")
    if tp_mesh is not None:
        apply_tensor_parallel(chunk, tp_mesh, layout.sequence_parallel)
    apply_moe_parallel(chunk, dims, layout, tp_mesh)
    cp_mesh = axis(mesh, dims, "cp")
    if cp_mesh is not None:
        enable_context_parallel(chunk, cp_mesh.get_group(), dims.cp)
    if compile_blocks:
        from executor.compile import compile_blocks as compile_chunk

        compile_chunk(chunk)
    if uses_fsdp(layout.sharding) and dims.size("dp_cp") > 1:
        own: dict[nn.Module, Any] = {}
        if layout.ep > 1 or dims.tp > 1:  # expert DTensors live on the expert mesh
            edp = edp_mesh(dims, layout.ep) if dims.size("dp_cp") // layout.ep > 1 else None
            own = {m.experts: edp for m in moe_layers(chunk)}
        apply_fsdp(chunk, fsdp_mesh(mesh, dims), layout.sharding, precision, own,
                   divide_factor=float(dims.size("dp_cp")))
    return chunk


def apply_recompute(chunks: list[nn.Module], mode: str, layers: int) -> int:
    """Recompute on this rank's chunks: selective on every block; full on every block, or
    (`layers` > 0) on the first layers / len(chunks) blocks of each chunk (a pipeline rank's
    virtual stages recompute alike, as Megatron's --recompute-num-layers does per chunk; the
    contract asks for a multiple). Returns the number of blocks recomputed."""
    per_chunk = layers // len(chunks) if mode == "full" and layers else 0
    return sum(c.set_recompute(mode, per_chunk) for c in chunks)


BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket_cap_mb (Li et al. 2020 §3.2.3)


@torch.no_grad()
def all_reduce_gradients(params: Iterable[nn.Parameter], group: Any, replicas: int) -> None:
    """All-reduce the gradients of `params` (local shards of DTensor ones) over the replica
    group in DDP-sized flat buckets, then divide by `replicas`: what DDP does (Li et al.
    2020 §3.2), after the backward, holding one bucket of extra memory. `group` None: no
    other replica, divide only."""
    grads = [local_tensor(p.grad) for p in params if p.grad is not None]
    if group is None:
        for g in grads:
            g.div_(replicas)
        return
    bucket: list[torch.Tensor] = []
    size = 0
    for i, g in enumerate(grads):
        bucket.append(g)
        size += g.numel() * g.element_size()
        if size >= BUCKET_BYTES or i == len(grads) - 1:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, group=group)
            flat.div_(replicas)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            bucket, size = [], 0
