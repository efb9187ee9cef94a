"""Wire context-parallel attention into the executor's model without renaming anything.

Each layer's `attention.forward` is rebound to a version that calls
`executor.parallel.cp_attention.cp_attention`; parameter names stay exactly those of the
one-process model, so checkpoints move freely between layouts.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from executor.attention import AttnContext
from executor.model import apply_rope
from executor.parallel.cp_attention import cp_attention, local_token_index


@dataclass
class CPContext(AttnContext):
    """An attention context for the local sequence shard (backend "cp")."""

    group: Any = None
    full_seq_len: int = 0
    doc_ids: torch.Tensor | None = None  # [B, full_seq_len] global document ids


def _cp_forward(
    self: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: CPContext
) -> torch.Tensor:
    b, t, _ = x.shape
    q = self.wq(x).view(b, t, -1, self.head_dim)
    k = self.wk(x).view(b, t, -1, self.head_dim)
    v = self.wv(x).view(b, t, -1, self.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = cp_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group=ctx.group,
        seq_len=ctx.full_seq_len, doc_ids=ctx.doc_ids, causal=ctx.causal,
    )
    return self.wo(out.transpose(1, 2).reshape(b, t, -1))


def enable_context_parallel(model: nn.Module) -> None:
    """Rebind every `layers[i].attention.forward` to the context-parallel version."""
    for layer in model.layers.values():
        layer.attention.forward = types.MethodType(_cp_forward, layer.attention)


def shard_sequence(t: torch.Tensor, cp: int, cp_rank: int) -> torch.Tensor:
    """This rank's load-balanced slice of a [B, T, ...] tensor along T."""
    idx = local_token_index(t.shape[1], cp, cp_rank).to(t.device)
    return t.index_select(1, idx)


def make_cp_context(doc_ids: torch.Tensor, causal: bool, group: Any, cp: int) -> CPContext:
    b, t = doc_ids.shape
    return CPContext(
        backend="cp", causal=causal, batch=b, seqlen=t // cp, group=group, full_seq_len=t,
        doc_ids=doc_ids,
    )
