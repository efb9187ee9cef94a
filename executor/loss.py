"""The token loss: cross entropy summed over labelled positions, whole or in sequence chunks.

The chunked form runs the output projection and the loss on one chunk of the sequence at a
time under activation checkpointing, so only one chunk's logits (and, in backward, their
gradient) exist at once; backward re-runs each chunk's output GEMM and cross entropy. (The
memory saving of Liger-Kernel's fused linear cross entropy, Hsu et al. 2024, which instead
computes the chunk's gradients inside the forward.) In bf16 autocast the head weight's
gradient sums its chunks in fp32 (`_chunk_loss_sum`). `costmodels.memory.logits_bytes` charges
1 / chunks of the logits term for it, `costmodels.step_layer.logits` the second GEMM."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from executor.data.batch import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of the cross-entropy of every labelled position (computed in fp32)."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )


def _chunk_loss_sum(head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One chunk's loss sum. Under autocast the head's weight is cast here, once per chunk,
    not through autocast's cache: each chunk's 16-bit weight gradient then lands in the fp32
    parameter's gradient, which sums the chunks in fp32 (through the shared cached cast they
    would sum in bf16: 3.7e-3 relative error on the head's gradient at 8 chunks)."""
    dev = hidden.device.type
    if not torch.is_autocast_enabled(dev):
        return token_loss_sum(head(hidden), labels)
    dtype = torch.get_autocast_dtype(dev)
    bias = None if head.bias is None else head.bias.to(dtype)
    with torch.autocast(dev, enabled=False):
        logits = F.linear(hidden.to(dtype), head.weight.to(dtype), bias)
    return token_loss_sum(logits, labels)


def chunked_loss_sum(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                     chunks: int) -> torch.Tensor:
    """`token_loss_sum(head(hidden), labels)` over `chunks` slices of the sequence (dim 1),
    each chunk's logits recomputed in backward instead of kept."""
    total = hidden.new_zeros((), dtype=torch.float32)
    grad = torch.is_grad_enabled()
    for h, y in zip(hidden.chunk(chunks, dim=1), labels.chunk(chunks, dim=1), strict=True):
        if grad:
            total = total + checkpoint(_chunk_loss_sum, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss_sum(head, h, y)
    return total


def apply_loss_chunks(parts: list[nn.Module], chunks: int) -> int:
    """Set `layout.loss_chunks` on the model parts that hold the output head; returns the
    chunks applied (summary.json's `applied.loss_chunks`; 1 where no part holds the head)."""
    applied = 1
    for part in parts:
        if getattr(part, "output", None) is not None:
            part.loss_chunks = chunks
            applied = chunks
    return applied


def forward_loss_sum(model: nn.Module, loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                     chunks: int, autocast: AbstractContextManager, input_ids: torch.Tensor,
                     position_ids: torch.Tensor, doc_ids: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """One micro-batch's token loss sum: the model's forward in `chunks` chunks when > 1
    (the logits never whole), else `loss_sum` of its logits."""
    with autocast:
        if chunks > 1:
            return model(input_ids, position_ids, doc_ids, labels=labels)
        logits = model(input_ids, position_ids, doc_ids)
    return loss_sum(logits, labels)
