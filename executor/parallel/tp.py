"""Tensor parallelism with DTensor `parallelize_module` (Megatron-LM style).

Per layer (Shoeybi et al. 2019, §3, Fig. 3): wq/wk/wv and w1/w3 are column-parallel (their
output features, i.e. the attention heads and the MLP's hidden units, are split across
ranks), wo and w2 are row-parallel. Sequence parallelism (Korthikanti et al. 2022, §4.2.2)
keeps the activations between blocks and the norms split along the sequence: the
all-reduce after each row-parallel matmul becomes a reduce-scatter, and an all-gather
restores the full sequence before the column-parallel matmuls. The embedding is split by
vocabulary rows; the output projection is column-parallel over the vocabulary and its
logits are gathered so the loss is the one-process loss.
"""

from __future__ import annotations

from typing import Any

from torch import nn


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
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
    if spec.heads % tp or spec.kv_heads % tp:
        raise ValueError(
            f"layout.tp={tp} must divide heads={spec.heads} and kv_heads={spec.kv_heads}"
        )
    top: dict[str, Any] = {}
    if getattr(model, "tok_embeddings", None) is not None:
        top["tok_embeddings"] = RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1))
    if getattr(model, "norm", None) is not None:
        top["norm"] = SequenceParallel()
    if getattr(model, "output", None) is not None:
        top["output"] = ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate())
    if top:
        parallelize_module(model, tp_mesh, top)

    for layer in model.layers.values():
        ffn = {"feed_forward.w1": ColwiseParallel(),
               "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1))}
        if getattr(layer.feed_forward, "w3", None) is not None:
            ffn["feed_forward.w3"] = ColwiseParallel()
        plan = {
            "attention_norm": SequenceParallel(),
            # forward(x, cos, sin, ctx): only x is a sequence-sharded activation.
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), None, None, None),
                desired_input_layouts=(Replicate(), None, None, None),
            ),
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=Shard(1)),
            "ffn_norm": SequenceParallel(),
            "feed_forward": PrepareModuleInput(
                input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)
            ),
            **ffn,
        }
        parallelize_module(layer, tp_mesh, plan)


def tp_input_is_sharded(model: nn.Module) -> bool:
    """Middle/last pipeline stages receive sequence-sharded hidden states under TP."""
    return getattr(model, "tok_embeddings", None) is None
