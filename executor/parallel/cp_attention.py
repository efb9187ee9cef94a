"""Context parallelism: the sequence split across ranks, attention still exact.

Load-balanced causal split (Liu et al. 2023 "Ring Attention" / Megatron-Core CP): the
sequence is cut into 2*cp chunks and rank r keeps chunks r and 2*cp-1-r, so every rank holds
an equal share of the causal mask's work. Attention all-gathers keys and values over the cp
process group (the all-gather variant of CP used by Llama 3, Dubey et al. 2024 §3.3.2:
"we all-gather K and V, then compute attention for the local Q chunk"), which runs on any
backend, gloo included; its backward reduce-scatters the key/value gradients. The mask is
built from GLOBAL positions and document ids, which every rank has, so packed documents
never attend to each other, exactly as in the one-process run.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def local_token_index(seq_len: int, cp: int, cp_rank: int) -> torch.Tensor:
    """Global positions this rank keeps: chunks r and 2*cp-1-r of 2*cp equal chunks."""
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len={seq_len} must be divisible by 2*cp={2 * cp}")
    c = seq_len // (2 * cp)
    first = torch.arange(cp_rank * c, (cp_rank + 1) * c)
    second = torch.arange((2 * cp - 1 - cp_rank) * c, (2 * cp - cp_rank) * c)
    return torch.cat([first, second])


def gathered_token_index(seq_len: int, cp: int) -> torch.Tensor:
    """Global positions of the keys after the all-gather (rank 0's tokens first, ...)."""
    return torch.cat([local_token_index(seq_len, cp, r) for r in range(cp)])


class _AllGatherSeq(torch.autograd.Function):
    """all_gather along a new leading dim; backward = reduce_scatter of the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        x = x.contiguous()
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_gather_into_tensor(out, x, group=group)
        return out.view(world, *x.shape)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous().flatten(0, 1)
        out = torch.empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]),
                          dtype=grad.dtype, device=grad.device)
        dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return out, None


def all_gather_seq(x: torch.Tensor, group: Any, seq_dim: int) -> torch.Tensor:
    """Gather each rank's local sequence slice; ranks' slices are concatenated in rank order."""
    g = _AllGatherSeq.apply(x, group)  # [cp, *x.shape]
    g = g.movedim(0, seq_dim)  # [..., cp, T_local, ...]
    return g.flatten(seq_dim, seq_dim + 1)


def cp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: Any,
    seq_len: int,
    doc_ids: torch.Tensor | None,
    causal: bool = True,
) -> torch.Tensor:
    """Exact attention for this rank's queries over the whole sequence.

    q: [B, Hq, T_local, D]; k, v: [B, Hkv, T_local, D] in load-balanced local order;
    doc_ids: [B, seq_len] global document ids (None = one document per row).
    Returns [B, Hq, T_local, D].
    """
    cp = dist.get_world_size(group)
    rank = dist.get_rank(group)
    k_all = all_gather_seq(k, group, seq_dim=2)
    v_all = all_gather_seq(v, group, seq_dim=2)
    if k_all.shape[1] != q.shape[1]:  # GQA: each kv head serves Hq / Hkv query heads
        rep = q.shape[1] // k_all.shape[1]
        k_all = k_all.repeat_interleave(rep, dim=1)
        v_all = v_all.repeat_interleave(rep, dim=1)
    qi = local_token_index(seq_len, cp, rank).to(q.device)
    ki = gathered_token_index(seq_len, cp).to(q.device)
    allowed = torch.ones(qi.numel(), ki.numel(), dtype=torch.bool, device=q.device)
    if causal:
        allowed = ki.unsqueeze(0) <= qi.unsqueeze(1)
    mask = allowed.unsqueeze(0).unsqueeze(0)  # [1, 1, Tq, Tk]
    if doc_ids is not None:
        same = doc_ids[:, qi].unsqueeze(2) == doc_ids[:, ki].unsqueeze(1)  # [B, Tq, Tk]
        mask = mask & same.unsqueeze(1)
    return F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask)
