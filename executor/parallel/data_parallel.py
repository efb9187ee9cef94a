"""Data parallelism: DDP, or FSDP2 `fully_shard` for ZeRO-2/3 (1-D, or 2-D for HSDP).

Sharding map (Rajbhandari et al. 2020, ZeRO §5):
  none  -> DDP (gradients all-reduced; replicas of everything); with DTensor parameters or
           pipeline stages, one flat all-reduce after the backward (`parallelize`)
  zero1 -> the same gradient all-reduce, the optimizer state partitioned
           (`executor.parallel.zero1`)
  zero2 -> fully_shard(reshard_after_forward=False): parameters stay gathered from forward to
           backward (one all-gather per step), gradients and optimizer state sharded
  zero3 -> fully_shard(reshard_after_forward=True): parameters, gradients and optimizer
           state sharded; parameters re-gathered for backward
HSDP (`layout.dp_shard`): fully_shard on a 2-D (replicate, shard) mesh — sharded within
groups of dp_shard ranks, gradients all-reduced across the groups (Zhao et al. 2023 §3.2.1).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def mixed_precision_policy(precision: str) -> Any:
    """bf16/fp16 compute and parameter all-gathers, fp32 gradient reduction (Micikevicius
    et al. 2018 §3: accumulate in fp32)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if precision == "fp16":
        return MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def reshard_after_forward(sharding: str) -> bool:
    return sharding == "zero3"


def apply_fsdp(model: nn.Module, dp_mesh: Any, sharding: str, precision: str,
               own_mesh: dict[nn.Module, Any] | None = None,
               divide_factor: float | None = None) -> nn.Module:
    """fully_shard each transformer block, then the root (embedding, final norm, output).
    `own_mesh`: submodules sharded on a mesh of their own first (MoE experts over their
    expert-data-parallel replicas, their gradients divided by `divide_factor`), or left
    unsharded (mesh None: a module held by one replica)."""
    from torch.distributed.fsdp import fully_shard

    mp = mixed_precision_policy(precision)
    raf = reshard_after_forward(sharding)
    ignored: set[nn.Parameter] = set()
    for mod, mesh in (own_mesh or {}).items():
        if mesh is None:
            ignored |= set(mod.parameters())
            continue
        fully_shard(mod, mesh=mesh, reshard_after_forward=raf, mp_policy=mp)
        if divide_factor:
            mod.set_gradient_divide_factor(divide_factor)
    for layer in model.layers.values():
        own = ignored & set(layer.parameters())
        fully_shard(layer, mesh=dp_mesh, reshard_after_forward=raf, mp_policy=mp,
                    ignored_params=own or None)
    fully_shard(model, mesh=dp_mesh, reshard_after_forward=raf, mp_policy=mp,
                ignored_params=ignored or None)
    return model


def apply_ddp(model: nn.Module, group: Any) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(
        model, process_group=group, broadcast_buffers=False, gradient_as_bucket_view=True,
    )


def fsdp_param_group(module: Any) -> Any:
    """The FSDP2 parameter group of a `fully_shard`ed module (None when it owns no
    parameters directly, e.g. a pipeline stage's root without embedding or head)."""
    return module._get_fsdp_state()._fsdp_param_group


def fsdp_reshards_after_forward(group: Any) -> bool:
    """Whether an FSDP2 parameter group reshards after forward (zero3) or keeps its
    parameters (zero2). FSDP2 has a setter but no getter: the group's post-forward mesh is
    set exactly when it reshards after forward."""
    return group.post_forward_mesh_info is not None
