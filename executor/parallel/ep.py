"""Expert parallelism (and expert tensor parallelism) for the MoE layers of one chunk.

The expert-parallel group is carved from data x context parallelism, Megatron-Core's and
torchtitan's convention: the dp x cp ranks of a pipeline stage (and one tensor-parallel
index) split into `ep`-sized groups of consecutive ranks, each group holding every expert
once (rank r of a group: experts [r E / ep, (r + 1) E / ep)), and the dp x cp / ep groups
("expert data parallel", edp) hold replicas of each expert. The expert mesh is that view of
the world, (pp, edp, ep, tp), over the same ranks as the dense mesh
(`executor.parallel.mesh`).

Expert weights become DTensors on (ep, tp): sharded over experts on ep, and (expert tensor
parallelism = tp, Megatron-Core's default) over each expert's hidden units on tp, w1 / w3
column-wise and w2 row-wise like a dense MLP (Shoeybi et al. 2019 §3). Under tensor
parallelism the MoE layer receives the whole token set on every TP rank (the input is
all-gathered from the sequence shards under SP, as a dense MLP's is), routes identically on
each, and returns a partial sum the output hook reduces (all-reduce, or reduce-scatter
under SP); the router and the shared experts' gate are replicated and their gradients,
partial per rank, are all-reduced over TP with the other DTensor gradients
(`DistributedStrategy.finalize_grads`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from executor.moe import ExpertParallel, MoEFeedForward
from executor.parallel.mesh import ParallelDims, device_type

_EXPERT_MESHES: dict[tuple[ParallelDims, int], Any] = {}


def expert_mesh(dims: ParallelDims, ep: int) -> Any:
    """The (pp, edp, ep, tp) DeviceMesh of `dims` with expert parallelism `ep` (built once
    per process, collectively)."""
    from torch.distributed.device_mesh import DeviceMesh

    key = (dims, ep)
    if key not in _EXPERT_MESHES:
        dpcp = dims.dp * dims.cp
        ranks = torch.arange(dims.world_size).view(dims.pp, dpcp // ep, ep, dims.tp)
        _EXPERT_MESHES[key] = DeviceMesh(device_type(), ranks, mesh_dim_names=("pp", "edp", "ep", "tp"))
    return _EXPERT_MESHES[key]


def release_expert_meshes() -> None:
    _EXPERT_MESHES.clear()


def moe_layers(chunk: nn.Module) -> list[MoEFeedForward]:
    return [m for m in chunk.modules() if isinstance(m, MoEFeedForward)]


def _distribute(module: nn.Module, name: str, mesh: Any, placements: list[Any]) -> None:
    """Replace `module.name` by its DTensor shard (every rank holds the same full tensor,
    so each keeps its slice: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    p = getattr(module, name)
    if p is None:
        return
    dt = distribute_tensor(p.data, mesh, placements, src_data_rank=None)
    module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))


def _tp_hooks(moe: nn.Module, tp_mesh: Any, sequence_parallel: bool) -> None:
    """Input: the whole token set on every TP rank (all-gathered from the sequence shards
    under SP); its gradient, a partial sum per rank, is reduced back (reduce-scatter under SP,
    else all-reduce). Output: the partial sum reduced the same way (Megatron's f / g
    operators, Shoeybi et al. 2019 §3, Fig. 3)."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    between = Shard(1) if sequence_parallel else Replicate()

    def pre(_mod: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        x = args[0]
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, tp_mesh, (between,), run_check=False)
        x = x.redistribute(tp_mesh, (Replicate(),)).to_local(grad_placements=(Partial(),))
        return (x, *args[1:])

    def post(_mod: nn.Module, _args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        partial = DTensor.from_local(out, tp_mesh, (Partial(),), run_check=False)
        return partial.redistribute(tp_mesh, (between,)).to_local()

    moe.register_forward_pre_hook(pre)
    moe.register_forward_hook(post)


def apply_moe_parallel(chunk: nn.Module, dims: ParallelDims, layout: Any, tp_mesh: Any) -> None:
    """Shard every MoE layer of `chunk` over experts (ep) and hidden units (tp); set each
    layer's all-to-all group. `tp_mesh` is the dense mesh's TP axis (None without TP)."""
    from torch.distributed.tensor import Replicate, Shard

    ep, tp = layout.ep, dims.tp
    layers = moe_layers(chunk)
    if not layers or (ep == 1 and tp == 1):
        return
    emesh = expert_mesh(dims, ep)
    if ep > 1 and tp > 1:
        sub, col, row = emesh["ep", "tp"], [Shard(0), Shard(2)], [Shard(0), Shard(1)]
    elif ep > 1:
        sub, col, row = emesh["ep"], [Shard(0)], [Shard(0)]
    else:
        sub, col, row = emesh["tp"], [Shard(2)], [Shard(1)]
    for moe in layers:
        for name, pl in (("w1", col), ("w3", col), ("w2", row)):
            _distribute(moe.experts, name, sub, pl)
        if ep > 1:
            ep_mesh = emesh["ep"]
            moe.ep = ExpertParallel(ep_mesh.get_group(), ep, ep_mesh.get_local_rank())
        if tp > 1:
            _distribute(moe.gate, "weight", tp_mesh, [Replicate()])
            moe.tp_size = tp
            shared = moe.shared_experts
            if shared is not None:
                for name, pl in (("w1", [Shard(1)]), ("w3", [Shard(1)]), ("w2", [Shard(0)])):
                    _distribute(shared, name, tp_mesh, pl)
                if shared.gate is not None:
                    _distribute(shared.gate, "weight", tp_mesh, [Replicate()])
            _tp_hooks(moe, tp_mesh, layout.sequence_parallel)


def expert_params(chunk: nn.Module) -> set[nn.Parameter]:
    """The routed experts' weights (sharded over ep; reduced over the edp group)."""
    return {p for m in moe_layers(chunk) for p in m.experts.parameters()}


def edp_group(dims: ParallelDims, ep: int) -> Any:
    """The process group of this rank's expert replicas (None when there is one)."""
    if dims.dp * dims.cp // ep == 1:
        return None
    return expert_mesh(dims, ep)["edp"].get_group()


def edp_mesh(dims: ParallelDims, ep: int) -> Any:
    return expert_mesh(dims, ep)["edp"]
