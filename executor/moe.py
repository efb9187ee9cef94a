"""Mixture-of-experts feed-forward: a top-k router over `num_experts` SwiGLU / GELU experts,
optional shared experts, and expert parallelism by all-to-all token exchange.

Routing (Shazeer et al. 2017; Fedus et al. 2022 "Switch"; Lepikhin et al. 2021 "GShard"):
scores are softmax(logits) (Mixtral, Qwen) or sigmoid(logits) (DeepSeek-V3, Liu et al. 2024
§2.1.2); each token goes to its top-k experts, weighted by its scores (renormalised over the
k when `norm_topk`). With a capacity factor c > 0 an expert takes at most
ceil(c * tokens * k / experts) of a rank's tokens, in token order (GShard's position
policy); the rest are dropped (their slot contributes zero; the residual carries the token).
`force_balance` replaces the choice by a round-robin over the experts (what vendor
benchmarks run with Megatron-Core's --moe-router-force-load-balancing): loads are equal and
the router still gets gradients through the chosen experts' scores.

Losses: the load-balancing loss E * sum_e f_e * P_e (f_e: share of the routed slots that
chose e, P_e: mean score of e; Switch eq. 4) and the router z-loss mean(logsumexp(logits)^2)
(Zoph et al. 2022 "ST-MoE" eq. 5). They never enter the token loss: their gradient is
attached to the layer's output (forward: identity; backward: adds `loss_grad_scale` times
the loss's gradient), Megatron-Core's MoEAuxLossAutoScaler design, so they train through
pipeline stages and activation recompute unchanged.

Expert GEMMs: all local experts' tokens sorted by expert and multiplied in one grouped GEMM
(`torch._grouped_mm`, offsets = cumulative token counts) where it runs, else one matmul per
expert (`grouped_mm_fallback`; the two are tested equal).

Expert parallelism (`ExpertParallel`): rank r of an `ep` group holds experts
[r * E / ep, (r + 1) * E / ep); each rank sends each token to the ranks holding its chosen
experts with `all_to_all_single` (variable splits; Lepikhin et al. 2021 §2.2 dispatch /
combine), the experts run on what they received, and a second all-to-all brings the
outputs back. Tensor parallelism (expert-tensor-parallel = tp, Megatron-Core's default)
splits every expert's hidden units across the TP group like a dense MLP; the layer then
sees the whole token set on every TP rank and its output is a partial sum the TP hooks
reduce (`executor.parallel.ep`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from costmodels.specs import ModelSpec


def _local(t: torch.Tensor, partial_grad: bool = False) -> torch.Tensor:
    """The local shard of a DTensor parameter (expert / tensor parallel), or the tensor.
    `partial_grad`: a replicated weight used on the whole token set of every TP rank whose
    output feeds a partial sum; its local gradient is declared Partial, so the gradient is
    all-reduced over TP when it is brought back to the weight's placement."""
    if not hasattr(t, "to_local"):
        return t
    if partial_grad:
        from torch.distributed.tensor import Partial

        return t.to_local(grad_placements=(Partial(),))
    return t.to_local()


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on `t` runs in under the active autocast (raw matmuls below are
    cast by hand: `torch._grouped_mm` has no autocast rule)."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


@torch.no_grad()
def _init_normal(module: nn.Module, std: float = 0.02) -> None:
    """N(0, std) for the stacked weights (the model's `init_weights` sets them properly)."""
    for p in module.parameters(recurse=False):
        if p.device.type != "meta":
            p.normal_(0.0, std)


def grouped_mm_fallback(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [sum(counts), K] grouped by expert, w [E, K, N] -> [sum(counts), N]: one matmul per
    expert over its rows."""
    outs = [chunk @ w[e] for e, chunk in enumerate(torch.split(x, counts)) if counts[e]]
    if not outs:
        # no token for any local expert: a 0-row product keeps x and w in the graph, so this
        # rank still runs the backward all-to-alls its ep peers wait for and gets zero grads
        return x @ w[0]
    return torch.cat(outs)


def _grouped_mm_runs(x: torch.Tensor, w: torch.Tensor) -> bool:
    """`torch._grouped_mm` needs 16-byte aligned rows (and, on CUDA, bf16 on sm90+)."""
    if not hasattr(torch, "_grouped_mm") or x.shape[0] == 0:
        return False
    if (x.shape[-1] * x.element_size()) % 16 or (w.shape[-1] * w.element_size()) % 16:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
    return x.device.type == "cpu" and x.dtype == torch.float32


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Grouped GEMM of expert-sorted rows `x` with per-expert weights `w` [E, K, N]."""
    if _grouped_mm_runs(x, w):
        offs = torch.tensor(counts, device=x.device).cumsum(0).to(torch.int32)
        return torch._grouped_mm(x, w, offs=offs)
    return grouped_mm_fallback(x, w, counts)


class GroupedExperts(nn.Module):
    """`experts` MLPs as stacked weights: w1, w3 [E, H, F] and w2 [E, F, H] (SwiGLU:
    w2(silu(x w1) * x w3), Shazeer 2020; GELU: w2(gelu(x w1)))."""

    def __init__(self, experts: int, hidden: int, ffn: int, swiglu: bool) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(experts, hidden, ffn))
        self.w2 = nn.Parameter(torch.empty(experts, ffn, hidden))
        self.w3 = nn.Parameter(torch.empty(experts, hidden, ffn)) if swiglu else None
        _init_normal(self)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        dt = _compute_dtype(x)
        w1, w2 = _local(self.w1).to(dt), _local(self.w2).to(dt)
        x = x.to(dt)
        h = grouped_mm(x, w1, counts)
        if self.w3 is not None:
            h = F.silu(h) * grouped_mm(x, _local(self.w3).to(dt), counts)
        else:
            h = F.gelu(h)
        return grouped_mm(h, w2, counts)


class SharedExperts(nn.Module):
    """The always-on expert(s) every token also visits (DeepSeekMoE, Dai et al. 2024 §3.2;
    Qwen-MoE), as one MLP of the shared experts' total width: w1, w3 [H, F], w2 [F, H];
    optionally scaled per token by sigmoid(x gate) (Qwen1.5/2-MoE's shared_expert_gate)."""

    def __init__(self, hidden: int, ffn: int, swiglu: bool, gated: bool) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.empty(hidden, ffn))
        self.w2 = nn.Parameter(torch.empty(ffn, hidden))
        self.w3 = nn.Parameter(torch.empty(hidden, ffn)) if swiglu else None
        self.gate = nn.Linear(hidden, 1, bias=False) if gated else None
        _init_normal(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = _compute_dtype(x)
        xd = x.to(dt)
        h = xd @ _local(self.w1).to(dt)
        h = F.silu(h) * (xd @ _local(self.w3).to(dt)) if self.w3 is not None else F.gelu(h)
        out = h @ _local(self.w2).to(dt)
        if self.gate is not None:
            # the gate is computed on the replicated input: its output scales a partial sum
            # under tensor parallelism, which stays a partial sum
            gate = F.linear(x, _local(self.gate.weight, partial_grad=True))
            out = out * torch.sigmoid(gate.to(out.dtype))
        return out


class _AttachLossGrad(torch.autograd.Function):
    """Identity on `out`; in backward, `scale` flows into `loss` (Megatron-Core's
    MoEAuxLossAutoScaler)."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        return grad, torch.full(ctx.loss_shape, ctx.scale, dtype=ctx.loss_dtype, device=grad.device), None


@dataclass
class ExpertParallel:
    """This rank's place in its expert-parallel group."""

    group: Any
    size: int
    rank: int


def _in_backward() -> bool:
    """True while autograd runs a backward (activation recompute re-running a forward)."""
    return torch._C._current_graph_task_id() != -1


class MoEFeedForward(nn.Module):
    """The MoE layer of one transformer block (see the module docstring)."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.num_experts, self.topk = spec.num_experts, spec.experts_topk
        self.score, self.norm_topk = spec.router_score, spec.norm_topk
        self.capacity_factor = spec.capacity_factor
        self.gate = nn.Linear(spec.hidden, spec.num_experts, bias=False)
        self.experts = GroupedExperts(spec.num_experts, spec.hidden, spec.expert_ffn, spec.mlp == "swiglu")
        self.shared_experts = (SharedExperts(spec.hidden, spec.shared_ffn, spec.mlp == "swiglu",
                                             spec.shared_expert_gate)
                               if spec.shared_ffn else None)
        # Set by the training loop / the parallelizer:
        self.force_balance = False
        self.aux_loss_coef = 0.0
        self.z_loss_coef = 0.0
        self.loss_grad_scale = 1.0  # the weight of this layer's losses in the step objective
        self.ep: ExpertParallel | None = None
        self.tp_size = 1  # TP ranks that route the same tokens (their router grads are summed)
        self.token_group: Any = None  # ranks whose tokens form one batch for the balance loss
        self.token_group_size = 1
        self.reset_stats()

    # ------------------------------------------------------------------ statistics
    def reset_stats(self) -> None:
        self.tokens_per_expert = torch.zeros(self.num_experts, dtype=torch.float64)
        self.dropped = 0.0
        self.routed = 0.0
        self.aux_sum = 0.0
        self.z_sum = 0.0
        self.calls = 0

    # ------------------------------------------------------------------ routing
    def route(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(weights [N, k], expert ids [N, k], scores [N, E]) of fp32 router logits."""
        scores = torch.sigmoid(logits) if self.score == "sigmoid" else torch.softmax(logits, dim=-1)
        n = logits.shape[0]
        if self.force_balance:
            slots = torch.arange(n * self.topk, device=logits.device).view(n, self.topk)
            idx = slots % self.num_experts
            weights = scores.gather(1, idx)
        else:
            weights, idx = torch.topk(scores, self.topk, dim=-1)
        if self.norm_topk or self.score == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return weights, idx, scores

    def _losses(self, logits: torch.Tensor, scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor | None:
        """coef_aux * balance loss + coef_z * z-loss of this rank's tokens: the balance
        loss's f is counted over the whole token group (context-parallel ranks share one
        micro-batch), P over this rank's tokens, so the group's mean of these terms is the
        loss of the whole micro-batch."""
        n = logits.shape[0]
        f = counts.to(torch.float32)
        total = float(n * self.topk)
        if self.token_group is not None:
            import torch.distributed as dist

            f = f.clone()
            dist.all_reduce(f, group=self.token_group)
            total *= self.token_group_size
        f = f / max(total, 1.0)
        probs = scores / scores.sum(-1, keepdim=True) if self.score == "sigmoid" else scores
        aux = self.num_experts * (f * probs.mean(0)).sum()
        z = torch.logsumexp(logits, dim=-1).pow(2).mean()
        if not _in_backward():
            self.aux_sum += float(aux.detach())
            self.z_sum += float(z.detach())
        if self.aux_loss_coef == 0.0 and self.z_loss_coef == 0.0:
            return None
        return self.aux_loss_coef * aux + self.z_loss_coef * z

    def _keep(self, flat_idx: torch.Tensor, n: int) -> torch.Tensor | None:
        """Mask of the routed slots within capacity (None: dropless)."""
        if self.capacity_factor <= 0:
            return None
        cap = math.ceil(self.capacity_factor * n * self.topk / self.num_experts)
        one_hot = F.one_hot(flat_idx, self.num_experts)
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # arrival order within its expert
        return position < cap

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta:  # a pipeline stage's shape inference: no routing, no collectives
            return torch.empty_like(x)
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        n = xf.shape[0]
        logits = F.linear(xf, _local(self.gate.weight, partial_grad=self.tp_size > 1)).float()
        weights, idx, scores = self.route(logits)
        flat_idx = idx.reshape(-1)
        keep = self._keep(flat_idx, n)
        slot_ids = torch.arange(n * self.topk, device=x.device)
        if keep is not None:
            slot_ids, flat_idx = slot_ids[keep], flat_idx[keep]
        order = torch.argsort(flat_idx, stable=True)
        slots = slot_ids[order]  # routed slots sorted by expert (token order within one)
        counts = torch.bincount(flat_idx, minlength=self.num_experts)
        loss = self._losses(logits, scores, torch.bincount(idx.reshape(-1), minlength=self.num_experts))
        if not _in_backward():
            self.tokens_per_expert += counts.detach().cpu().double()
            self.routed += float(n * self.topk)
            self.dropped += float(n * self.topk - slots.numel())
            self.calls += 1
        tokens = xf[slots // self.topk].to(_compute_dtype(xf))  # dispatched in the compute dtype
        if self.ep is None:
            out_sorted = self.experts(tokens, counts.tolist())
        else:
            out_sorted = self._expert_parallel(tokens, counts)
        y_slots = out_sorted.new_zeros(n * self.topk, shape[-1]).index_copy(0, slots, out_sorted)
        y = (y_slots.view(n, self.topk, -1) * weights.unsqueeze(-1).to(y_slots.dtype)).sum(1)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        y = y.to(x.dtype).view(shape)
        if loss is not None and torch.is_grad_enabled():
            # every TP rank computes the same loss and the router gradient is summed over TP
            y = _AttachLossGrad.apply(y, loss, self.loss_grad_scale / self.tp_size)
        return y

    def _expert_parallel(self, tokens: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Dispatch expert-sorted `tokens` to the ranks holding their experts, run the local
        experts, combine the outputs back in the same order."""
        import torch.distributed as dist
        from torch.distributed._functional_collectives import all_to_all_single_autograd

        ep = self.ep
        assert ep is not None
        local = self.num_experts // ep.size
        send = counts.view(ep.size, local)  # [destination rank, its local expert]
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send.contiguous(), group=ep.group)  # [source rank, my expert]
        in_splits = send.sum(1).tolist()
        out_splits = recv.sum(1).tolist()
        received = all_to_all_single_autograd(tokens, out_splits, in_splits, ep.group)
        # source-major -> expert-major: rows of my expert j from every source, in source order
        starts = torch.cat([recv.new_zeros(1), recv.reshape(-1).cumsum(0)[:-1]]).view(ep.size, local)
        perm = torch.cat([torch.arange(int(starts[s, j]), int(starts[s, j] + recv[s, j]))
                          for j in range(local) for s in range(ep.size)]) if received.shape[0] else \
            torch.zeros(0, dtype=torch.long)
        perm = perm.to(tokens.device)
        out = self.experts(received[perm], recv.sum(0).tolist())
        back = torch.empty_like(out).index_copy(0, perm, out) if out.shape[0] else out
        return all_to_all_single_autograd(back.contiguous(), in_splits, out_splits, ep.group)


# --------------------------------------------------------------------------- run settings


def moe_modules(parts: list[nn.Module]) -> dict[int, MoEFeedForward]:
    """The MoE feed-forwards of this rank's model parts, by global layer index."""
    out: dict[int, MoEFeedForward] = {}
    for part in parts:
        layers = getattr(part, "layers", None)
        for name, block in (layers.items() if layers is not None else []):
            ff = getattr(block, "feed_forward", None)
            if isinstance(ff, MoEFeedForward):
                out[int(name)] = ff
    return out


def configure_moe(parts: list[nn.Module], train: Any, loss_grad_scale: float,
                  token_group: Any = None, token_group_size: int = 1) -> int:
    """Set the plan's routing losses and forced balance on every MoE layer; returns how
    many there are. `loss_grad_scale` weighs one micro-batch's losses in the step objective
    (1 / micro-batches in the global batch, times the gradient replicas the reduction
    averages over, over the token group's ranks that each hold a part of the micro-batch)."""
    layers = moe_modules(parts)
    for m in layers.values():
        m.aux_loss_coef = float(train.moe_aux_loss_coef)
        m.z_loss_coef = float(train.moe_z_loss_coef)
        m.force_balance = bool(train.moe_force_balance)
        m.loss_grad_scale = loss_grad_scale
        m.token_group, m.token_group_size = token_group, token_group_size
    return len(layers)


STAT_FIELDS = ("routed", "dropped", "aux_sum", "z_sum", "calls")


def collect_stats(parts: list[nn.Module], layers: int, experts: int) -> torch.Tensor:
    """[layers, experts + 5] float64: each MoE layer's tokens per expert since the last
    reset, then `STAT_FIELDS`; zero rows for layers this rank does not hold. Resets them."""
    out = torch.zeros(layers, experts + len(STAT_FIELDS), dtype=torch.float64)
    for i, m in moe_modules(parts).items():
        out[i, :experts] = m.tokens_per_expert
        out[i, experts:] = torch.tensor([m.routed, m.dropped, m.aux_sum, m.z_sum, float(m.calls)],
                                        dtype=torch.float64)
        m.reset_stats()
    return out


def stats_metrics(stats: torch.Tensor, experts: int, replicas: int = 1) -> dict[str, Any]:
    """metrics.jsonl fields of summed `collect_stats` tables (`replicas`: ranks that routed
    the same tokens, the TP group): tokens per expert over all MoE layers, the load
    imbalance (max / mean load, averaged over the MoE layers), the dropped share of the
    routed slots and the mean balance / z losses per layer and micro-batch."""
    rows = stats[stats[:, experts + STAT_FIELDS.index("calls")] > 0]
    if rows.shape[0] == 0:
        return {}
    loads = rows[:, :experts] / replicas
    routed, dropped, aux, z, calls = (rows[:, experts + i] for i in range(len(STAT_FIELDS)))
    mean = loads.mean(1).clamp_min(1e-12)
    return {
        "moe_tokens_per_expert": [int(round(float(v))) for v in loads.sum(0)],
        "moe_imbalance": float((loads.max(1).values / mean).mean()),
        "moe_drop_frac": float(dropped.sum() / routed.sum().clamp_min(1.0)),
        "moe_aux_loss": float(aux.sum() / calls.sum()),
        "moe_z_loss": float(z.sum() / calls.sum()),
    }
