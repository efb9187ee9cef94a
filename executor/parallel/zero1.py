"""ZeRO stage 1: the optimizer state partitioned, gradients and parameters whole
(Rajbhandari et al. 2020 §5.1, P_os).

Each rank of the shard group owns a balanced share of the parameters (whole tensors, largest
first onto the least-loaded rank: the partition `torch.distributed.optim.
ZeroRedundancyOptimizer` uses) and keeps AdamW state for those only. Gradients are reduced
in full beforehand (DDP or the strategy's flat all-reduce), so every rank holds the whole
gradient and the global norm is the one-process norm; after the owners step, each owner
broadcasts its updated parameters to the group, one flat bucket per owner.

Why not `ZeroRedundancyOptimizer` itself: it needs plain tensors (TP parameters are
DTensors) and its state dict is not DCP's, so checkpoints would not move between layouts.
Here the optimizer of each model part is a plain AdamW over real module parameters, which
DCP saves and reshards like any other.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from executor.parallel.tp import local_tensor


def partition(params: list[nn.Parameter], n: int) -> list[int]:
    """Owner index of each parameter: largest first onto the least-loaded rank."""
    load = [0] * n
    owner = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: -local_tensor(params[i]).numel()):
        r = min(range(n), key=lambda k: load[k])
        owner[i] = r
        load[r] += local_tensor(params[i]).numel()
    return owner


class Zero1Partition:
    """The ownership of one model part's parameters over a shard group."""

    def __init__(self, part: nn.Module, group: Any) -> None:
        self.group = group
        self.ranks = dist.get_process_group_ranks(group)
        self.me = self.ranks.index(dist.get_rank())
        self.params = [p for p in part.parameters() if p.requires_grad]
        self.owner = partition(self.params, len(self.ranks))

    def owned(self) -> list[nn.Parameter]:
        return [p for p, o in zip(self.params, self.owner, strict=True) if o == self.me]

    def state_bytes_share(self) -> float:
        """Share of this part's parameter elements whose optimizer state this rank holds."""
        total = sum(local_tensor(p).numel() for p in self.params)
        mine = sum(local_tensor(p).numel() for p in self.owned())
        return mine / max(total, 1)

    @torch.no_grad()
    def broadcast_updated(self) -> None:
        """Every owner sends its updated parameters to the group (one flat bucket each)."""
        for k, src in enumerate(self.ranks):
            mine = [local_tensor(p) for p, o in zip(self.params, self.owner, strict=True) if o == k]
            if not mine:
                continue
            flat = torch.cat([t.reshape(-1) for t in mine])
            dist.broadcast(flat, src=src, group=self.group)
            if k != self.me:
                offset = 0
                for t in mine:
                    t.copy_(flat[offset:offset + t.numel()].view_as(t))
                    offset += t.numel()
