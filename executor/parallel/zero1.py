"""ZeRO stage 1: the optimizer state partitioned, gradients and parameters whole
(Rajbhandari et al. 2020 §5.1, P_os).

The parameters this rank holds (local shards of DTensors) are laid end to end and cut into
equal element ranges, one per rank of the shard group — the partition of Megatron-LM's
distributed optimizer, so each rank keeps AdamW state for 1/N of the elements whatever the
tensor sizes. The optimizer steps flat views of those ranges in place (detached views share
the parameters' storage); gradients are reduced in full beforehand (DDP or the strategy's
flat all-reduce), so the global norm is the one-process norm; after the step one all-gather
of the updated ranges gives every rank the whole updated parameters.

Checkpoints stay DCP's: `consolidated` assembles a plain AdamW over the module's real
parameters (every element's state lives on one rank; a sum over the group fills the rest),
which DCP saves and reshards like any other; `load_consolidated` cuts a loaded one back into
this rank's ranges.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from executor.parallel.tp import local_tensor
from executor.strategy import build_optimizer

STATE_KEYS = ("exp_avg", "exp_avg_sq")  # AdamW's per-element state


class Zero1Partition:
    """One model part's parameters cut into equal element ranges over a shard group."""

    def __init__(self, part: nn.Module, group: Any) -> None:
        self.part = part
        self.group = group
        n = dist.get_world_size(group)
        me = dist.get_rank(group)
        self.params = [p for p in part.parameters() if p.requires_grad]
        with torch.no_grad():
            self.locals = [local_tensor(p.detach()).detach() for p in self.params]
        total = sum(t.numel() for t in self.locals)
        self.shard = math.ceil(total / n)
        lo, hi = me * self.shard, min(total, (me + 1) * self.shard)
        # (parameter index, start, end) of every piece of [lo, hi), and its flat view
        self.pieces: list[tuple[int, int, int]] = []
        start = 0
        for i, t in enumerate(self.locals):
            a, b = max(lo, start), min(hi, start + t.numel())
            if a < b:
                self.pieces.append((i, a - start, b - start))
            start += t.numel()
        self.views = [self.locals[i].view(-1)[a:b] for i, a, b in self.pieces]
        self.total = total

    def optimizer(self, train: Any, device: torch.device) -> torch.optim.AdamW:
        """AdamW over this rank's ranges; a range decays when its parameter does."""
        decay = [self.params[i].ndim >= 2 for i, _, _ in self.pieces]
        return build_optimizer(self.part, train, device, self.views, decay)

    def attach_grads(self) -> None:
        """Point each range's .grad at the matching range of its (reduced) gradient."""
        for (i, a, b), v in zip(self.pieces, self.views, strict=True):
            g = self.params[i].grad
            v.grad = None if g is None else local_tensor(g).reshape(-1)[a:b]

    @torch.no_grad()
    def all_gather_updated(self) -> None:
        """Every rank's updated range to every rank: one all-gather of the flat buffer."""
        n = dist.get_world_size(self.group)
        mine = torch.zeros(self.shard, dtype=self.locals[0].dtype, device=self.locals[0].device)
        if self.views:
            flat = torch.cat(self.views)
            mine[: flat.numel()] = flat
        out = torch.empty(self.shard * n, dtype=mine.dtype, device=mine.device)
        dist.all_gather_into_tensor(out, mine, group=self.group)
        offset = 0
        for t in self.locals:
            t.view(-1).copy_(out[offset:offset + t.numel()])
            offset += t.numel()

    # ------------------------------------------------------------------ checkpoints
    @torch.no_grad()
    def consolidated(self, opt: torch.optim.Optimizer, train: Any, device: torch.device) -> torch.optim.AdamW:
        """A plain AdamW over the part's parameters holding the whole state (for DCP)."""
        from torch.distributed.tensor import DTensor

        full = build_optimizer(self.part, train, device)
        for g in full.param_groups:  # every group runs the plan's one LR curve
            g["lr"] = opt.param_groups[0]["lr"]
        step = next((st["step"] for st in opt.state.values() if "step" in st), None)
        have = step is not None
        flags = torch.tensor([float(have), float(step) if have else 0.0], dtype=torch.float64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.group)
        if flags[0] == 0:  # no step taken yet: nothing to save beyond the empty state
            return full
        by_param: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for (i, a, b), v in zip(self.pieces, self.views, strict=True):
            by_param.setdefault(i, []).append((a, b, v))
        for i, p in enumerate(self.params):
            st: dict[str, Any] = {"step": torch.tensor(float(flags[1]))}
            for key in STATE_KEYS:
                buf = torch.zeros(self.locals[i].numel(), dtype=self.locals[i].dtype, device=self.locals[i].device)
                for a, b, v in by_param.get(i, []):
                    buf[a:b] = opt.state[v][key]
                dist.all_reduce(buf, group=self.group)  # each element lives on one rank
                local = buf.view_as(self.locals[i])
                st[key] = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape,
                                             stride=p.stride()) if isinstance(p, DTensor) else local
            full.state[p] = st
        return full

    @torch.no_grad()
    def load_consolidated(self, opt: torch.optim.Optimizer, full: torch.optim.Optimizer) -> None:
        """This rank's ranges of a loaded whole state."""
        opt.state.clear()
        for (i, a, b), v in zip(self.pieces, self.views, strict=True):
            st = full.state.get(self.params[i])
            if not st:
                continue
            # on the parameter's device: the fused kernel (CUDA, CPU) keeps `step` there
            opt.state[v] = {"step": st["step"].detach().clone().to(v.device, torch.float32),
                            **{k: local_tensor(st[k]).reshape(-1)[a:b].clone() for k in STATE_KEYS}}
