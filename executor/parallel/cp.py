"""Context parallelism wired into the executor's model without renaming anything.

`enable_context_parallel` gives the model its cp process group; the model's
`attention_context` then builds a `CPContext`, whose `attend` runs
`executor.parallel.cp_attention.cp_attention` over the local sequence shard. The attention
modules keep their own code path (projections, RoPE, selective recompute of the core), and
parameter names stay exactly those of the one-process model, so checkpoints move freely
between layouts.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from executor.attention import AttnContext
from executor.parallel.cp_attention import cp_attention, local_token_index


@dataclass
class CPContext(AttnContext):
    """An attention context for the local sequence shard (backend "cp")."""

    group: Any = None
    full_seq_len: int = 0
    doc_ids: torch.Tensor | None = None  # [B, full_seq_len] global document ids

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [B, T/cp, Hq, D], k/v [B, T/cp, Hkv, D] -> [B, T/cp, Hq, D]."""
        out = cp_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), group=self.group,
            seq_len=self.full_seq_len, doc_ids=self.doc_ids, causal=self.causal,
        )
        return out.transpose(1, 2)


def make_cp_context(doc_ids: torch.Tensor, causal: bool, group: Any, cp: int) -> CPContext:
    b, t = doc_ids.shape
    return CPContext(
        backend="cp", causal=causal, batch=b, seqlen=t // cp, group=group, full_seq_len=t,
        doc_ids=doc_ids,
    )


def _cp_attention_context(self: nn.Module, doc_ids: torch.Tensor) -> CPContext:
    return make_cp_context(doc_ids, self.causal, self.cp_group, self.cp_degree)


def enable_context_parallel(model: nn.Module, group: Any, cp: int) -> None:
    """The model's forward builds CP contexts from the GLOBAL document ids it is given
    (every rank has them); its token inputs are the local shard (`shard_sequence`)."""
    model.cp_group, model.cp_degree = group, cp
    model.attention_context = types.MethodType(_cp_attention_context, model)


def shard_sequence(t: torch.Tensor, cp: int, cp_rank: int) -> torch.Tensor:
    """This rank's load-balanced slice of a [B, T, ...] tensor along T."""
    idx = local_token_index(t.shape[1], cp, cp_rank).to(t.device)
    return t.index_select(1, idx)
