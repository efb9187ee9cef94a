"""Tensor parallelism with DTensor `parallelize_module` (Megatron-LM style).

Per layer (Shoeybi et al. 2019, §3, Fig. 3): wq/wk/wv and w1/w3 are column-parallel (their
output features, i.e. the attention heads and the MLP's hidden units, are split across
ranks), wo and w2 are row-parallel. Sequence parallelism (Korthikanti et al. 2022, §4.2.2)
keeps the activations between blocks and the norms split along the sequence: the
all-reduce after each row-parallel matmul becomes a reduce-scatter, and an all-gather
restores the full sequence before the column-parallel matmuls. The embedding is split by
vocabulary rows; the output projection is column-parallel over the vocabulary and its
logits stay split: the cross entropy runs vocab-parallel (`loss_parallel`, Shoeybi et al.
2019 §3), each rank exchanging only per-token maxima and sums, never the [B, T, V] logits.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor.parallel.style import ParallelStyle


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, sequence_parallel: bool = True) -> None:
    """Shard `model` over `tp_mesh`: Megatron TP, with sequence parallelism unless
    `sequence_parallel` is False (then activations between blocks are replicated and each
    row-parallel output is all-reduced)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    tp = tp_mesh.size()
    spec = model.spec
    if spec.heads % tp or (spec.kv_heads % tp and tp % spec.kv_heads):
        raise ValueError(
            f"layout.tp={tp} must divide heads={spec.heads} and divide or be a multiple of "
            f"kv_heads={spec.kv_heads}"
        )
    kv_style: Any = ColwiseParallel()
    if spec.kv_heads % tp:  # tp > kv_heads: each rank computes the KV head its queries use
        kv_style = ReplicatedKVHead(spec.head_dim, tp_mesh.get_local_rank() * spec.kv_heads // tp)
    # Between blocks: sequence-sharded activations (SP) or replicated ones.
    between = Shard(1) if sequence_parallel else Replicate()
    top: dict[str, Any] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=between)
    if getattr(model, "norm", None) is not None and sequence_parallel:
        top["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        # Logits stay split over the vocabulary; the loss is computed under `loss_parallel`
        # (vocab-parallel cross entropy, Megatron's design) instead of gathering them.
        top["output"] = ColwiseParallel(input_layouts=between, output_layouts=Shard(-1), use_local_output=False)
    if top:
        parallelize_module(model, tp_mesh, top)

    from executor.moe import MoEFeedForward

    for layer in model.layers.values():
        ffn: dict[str, Any] = {}
        if not isinstance(layer.feed_forward, MoEFeedForward):  # MoE: `executor.parallel.ep`
            ffn = {"feed_forward": PrepareModuleInput(input_layouts=(between,),
                                                      desired_input_layouts=(Replicate(),)),
                   "feed_forward.w1": ColwiseParallel(),
                   "feed_forward.w2": RowwiseParallel(output_layouts=between)}
            if getattr(layer.feed_forward, "w3", None) is not None:
                ffn["feed_forward.w3"] = ColwiseParallel()
        plan: dict[str, Any] = {
            # forward(x, cos, sin, ctx): only x is an activation. One DTensor input shared by
            # wq/wk/wv (w1/w3): its gradient is reduced once, not once per projection.
            "attention": PrepareModuleInput(
                input_layouts=(between, None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": kv_style,
            "attention.wv": kv_style,
            "attention.wo": RowwiseParallel(output_layouts=between),
            **ffn,
        }
        if sequence_parallel:
            plan["attention_norm"] = SequenceParallel()
            plan["ffn_norm"] = SequenceParallel()
        parallelize_module(layer, tp_mesh, plan)


class ReplicatedKVHead(ParallelStyle):
    """Grouped-query attention with more TP ranks than KV heads (tp = k x kv_heads): the
    K / V projection is replicated and each rank keeps the one head its query heads read
    (rank r: head r * kv_heads / tp), so a KV head is computed on k ranks. Its weight
    gradient is the sum of those ranks' parts: the local output gradient is declared Partial
    and `finalize_grads` all-reduces it over the TP group (the replication Megatron-LM and
    vLLM use for tp > num_query_groups)."""

    def __init__(self, head_dim: int, head: int) -> None:
        super().__init__()
        self.head_dim, self.head = head_dim, head

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        from torch.distributed.tensor import Partial, distribute_module

        lo, hi = self.head * self.head_dim, (self.head + 1) * self.head_dim

        def output_fn(mod: nn.Module, out: Any, mesh: Any) -> torch.Tensor:
            return out.to_local(grad_placements=(Partial(),))[..., lo:hi]

        return distribute_module(module, device_mesh, output_fn=output_fn)


def loss_context(tp: int):
    """The context the loss and its backward must run in when the logits are vocab-split."""
    if tp > 1:
        from torch.distributed.tensor.parallel import loss_parallel

        return loss_parallel()
    return nullcontext()


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor, or the tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def materialize(loss: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a (possibly DTensor) loss, for logging."""
    from torch.distributed.tensor import DTensor

    return loss.full_tensor() if isinstance(loss, DTensor) else loss
