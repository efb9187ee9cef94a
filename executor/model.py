"""LLaMA-style transformer built from a `costmodels.specs.ModelSpec`.

RMSNorm (Zhang & Sennrich 2019) or LayerNorm, rotary position embeddings (Su et al. 2021),
SwiGLU (Shazeer 2020) or GELU MLP, grouped-query attention (Ainslie et al. 2023), optional
biases, per-head q/k RMSNorm (Qwen3) and tied embeddings; mixture-of-experts feed-forward
layers (`executor.moe`) where the spec has experts. Causal for CLM/FIM, bidirectional for MLM.

Module names follow the torchtitan convention so tensor/pipeline-parallel plans can
address them: `tok_embeddings`, `layers["0"..]`, each with `attention_norm`,
`attention.{wq,wk,wv,wo}`, `ffn_norm`, `feed_forward.{w1,w2,w3}` (an MoE layer's
`feed_forward.{gate, experts.{w1,w2,w3}, shared_experts.*}`); then `norm`, `output`.
A pipeline stage may set `tok_embeddings`, `norm` or `output` to None and delete layers:
the forward then takes / returns hidden states. Attention reads its local head count from
the weight shapes, so tensor-parallel sharded projections work unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from costmodels.errors import MeshplanError
from costmodels.specs import ModelSpec
from executor.attention import AttnContext, attend, make_context
from executor.loss import chunked_loss_sum
from executor.moe import MoEFeedForward


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * g (Zhang & Sennrich 2019, eq. 4)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).type_as(x)


def make_norm(spec: ModelSpec) -> nn.Module:
    if spec.norm == "rmsnorm":
        return RMSNorm(spec.hidden, spec.norm_eps)
    return nn.LayerNorm(spec.hidden, eps=spec.norm_eps)  # weight + bias (Ba et al. 2016)


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of angle pos * theta^(-2i/d) for i < d/2 (Su et al. 2021, RoFormer eq. 15)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
                  / head_dim)
    )
    angles = position_ids.float().unsqueeze(-1) * inv_freq  # [B, T, D/2]
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: pairs (i, i + D/2)
    return angles.cos().unsqueeze(2), angles.sin().unsqueeze(2)  # [B, T, 1, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each (x_i, x_{i+D/2}) pair by its angle (RoFormer eq. 34, half-split layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat([-x2, x1], dim=-1)
    xf = x.float()
    return (xf * cos + rotated.float() * sin).type_as(x)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.head_dim = spec.head_dim
        self.recompute_core = False  # selective recomputation (Korthikanti et al. 2022 §4.2)
        self.core_calls = 0  # attention-core executions, recomputations included
        self.compiled_block = False  # inside a compiled block (`TransformerBlock.compile_body`)
        qkv_bias = spec.bias or spec.qkv_bias
        self.wq = nn.Linear(spec.hidden, spec.q_dim, bias=qkv_bias)
        self.wk = nn.Linear(spec.hidden, spec.kv_dim, bias=qkv_bias)
        self.wv = nn.Linear(spec.hidden, spec.kv_dim, bias=qkv_bias)
        self.wo = nn.Linear(spec.q_dim, spec.hidden, bias=spec.bias)
        # Qwen3: RMSNorm over each query / key head before RoPE
        self.q_norm = RMSNorm(spec.head_dim, spec.norm_eps) if spec.qk_norm else None
        self.k_norm = RMSNorm(spec.head_dim, spec.norm_eps) if spec.qk_norm else None

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext
    ) -> torch.Tensor:
        b, t, _ = x.shape
        # Local head counts come from the (possibly TP-sharded) weights: view with -1.
        q = self.wq(x).view(b, t, -1, self.head_dim)
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attend(q, k, v, ctx) if self.core_inline(ctx) else self._attend(q, k, v, ctx)
        return self.wo(out.reshape(b, t, -1))

    def core_inline(self, ctx: AttnContext) -> bool:
        """In a compiled block, SDPA over the block-diagonal mask is traced into the block's
        graph (one graph a block, as torchtitan compiles it); the varlen kernels, the
        context-parallel K/V exchange and the selective-recompute checkpoint run eager
        between two graphs (`_attend`). The block counts an inline core's calls."""
        return (self.compiled_block and ctx.backend == "sdpa" and not self.recompute_core
                and getattr(ctx, "attend", None) is None)

    # Eager inside a compiled block (`train.compile`), where `core_inline` is False: the
    # attention backends, the context-parallel K/V exchange and the selective-recompute
    # checkpoint run as they do uncompiled.
    @torch.compiler.disable
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        if self.recompute_core and torch.is_grad_enabled():
            return checkpoint(self._core, q, k, v, ctx, use_reentrant=False)
        return self._core(q, k, v, ctx)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        self.core_calls += 1
        return attend(q, k, v, ctx)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x) (Shazeer 2020, eq. 6); GELU: w2(gelu(w1 x))."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.swiglu = spec.mlp == "swiglu"
        self.w1 = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias)
        self.w2 = nn.Linear(spec.ffn_hidden, spec.hidden, bias=spec.bias)
        self.w3 = nn.Linear(spec.hidden, spec.ffn_hidden, bias=spec.bias) if self.swiglu else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w3 is not None:
            return self.w2(F.silu(self.w1(x)) * self.w3(x))
        return self.w2(F.gelu(self.w1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm residual block (Xiong et al. 2020): h = x + attn(norm(x)); h + ffn(norm(h))."""

    def __init__(self, spec: ModelSpec, moe: bool = False) -> None:
        super().__init__()
        self.attention_norm = make_norm(spec)
        self.attention = Attention(spec)
        self.ffn_norm = make_norm(spec)
        self.feed_forward: nn.Module = MoEFeedForward(spec) if moe else FeedForward(spec)
        self.recompute_full = False  # re-run the whole block in the backward (Chen et al. 2016)
        self.forward_calls = 0  # block executions, recomputations included
        self.compiled: Callable[..., torch.Tensor] | None = None  # `compile_body`

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext
    ) -> torch.Tensor:
        self.forward_calls += 1  # counted outside the compiled body
        if self.compiled is not None and self.attention.core_inline(ctx):
            self.attention.core_calls += 1  # the core traced into the body runs once per call
        return (self.compiled or self._residuals)(x, cos, sin, ctx)

    def _residuals(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, ctx: AttnContext
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, ctx)
        return h + self.feed_forward(self.ffn_norm(h))

    def compile_body(self) -> None:
        """`train.compile`: torch.compile this block's norms, projections, RoPE, MLP and
        residuals (torchtitan compiles per block: every block of one shape reuses the graph);
        SDPA attention is traced in, other attention runs eager between two graphs
        (`Attention.core_inline`)."""
        self.attention.compiled_block = True
        self.compiled = torch.compile(self._residuals)


class Transformer(nn.Module):
    def __init__(self, spec: ModelSpec, causal: bool = True, attention_backend: str = "sdpa"):
        super().__init__()
        self.spec = spec
        self.causal = causal
        self.attention_backend = attention_backend
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(spec.vocab, spec.hidden)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(spec, spec.is_moe_layer(i))
                                     for i in range(spec.layers)})
        self.norm: nn.Module | None = make_norm(spec)
        self.output: nn.Linear | None = nn.Linear(spec.hidden, spec.vocab, bias=False)
        if spec.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight  # Press & Wolf 2017
        self.loss_chunks = 1  # `layout.loss_chunks`: forward(labels=...) in this many chunks

    @torch.no_grad()
    def init_weights(self, seed: int, std: float = 0.02) -> None:
        """N(0, 0.02) everywhere, residual projections scaled by 1/sqrt(2L) (GPT-2,
        Radford et al. 2019 §2.3); norms to 1, biases to 0. Deterministic in `seed`."""
        gen = torch.Generator().manual_seed(seed)
        resid_std = std / math.sqrt(2 * self.spec.layers)
        for name, p in self.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            is_norm = "norm" in name
            if is_norm:
                p.fill_(1.0 if leaf == "weight" else 0.0)
            elif leaf == "bias":
                p.zero_()
            else:
                resid = name.endswith(("wo.weight", "w2.weight", "experts.w2", "shared_experts.w2"))
                p.copy_(torch.randn(p.shape, generator=gen) * (resid_std if resid else std))

    def set_recompute(self, mode: str, layers: int = 0) -> int:
        """Activation recomputation: "full" re-runs whole blocks in the backward pass (Chen et
        al. 2016), the first `layers` blocks this module holds (0 = all; Megatron's
        --recompute-num-layers); "selective" re-runs only the attention core of every block
        (Korthikanti et al. 2022 §4.2). Returns the number of blocks recomputed."""
        if mode not in ("none", "selective", "full"):
            raise MeshplanError(f"layout.recompute={mode!r}: must be none, selective or full")
        blocks = list(self.layers.values())
        n_full = (layers or len(blocks)) if mode == "full" else 0
        for i, layer in enumerate(blocks):
            layer.recompute_full = i < n_full
            layer.attention.recompute_core = mode == "selective"
        return min(n_full, len(blocks)) if mode == "full" else (len(blocks) if mode == "selective" else 0)

    def block_calls(self) -> tuple[int, int]:
        """(block forwards, attention-core forwards) executed so far, recomputations included."""
        blocks = list(self.layers.values())
        return sum(b.forward_calls for b in blocks), sum(b.attention.core_calls for b in blocks)

    def attention_context(self, doc_ids: torch.Tensor) -> AttnContext:
        return make_context(doc_ids, self.causal, self.attention_backend)

    def forward(
        self,
        x: torch.Tensor,
        position_ids: torch.Tensor,
        doc_ids: torch.Tensor,
        ctx: AttnContext | None = None,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`x`: token ids [B, T] on the first stage, else hidden states [B, T, H].
        Returns logits [B, T, V] on the last stage, else hidden states; with `labels` (on
        the last stage), the token loss sum over `loss_chunks` chunks of the sequence
        (`executor.loss.chunked_loss_sum`: the logits never exist whole)."""
        h = self.tok_embeddings(x) if self.tok_embeddings is not None else x
        if ctx is None:
            ctx = self.attention_context(doc_ids)
        cos, sin = rope_cos_sin(position_ids, self.spec.head_dim, self.spec.rope_theta)
        grad = torch.is_grad_enabled()
        for layer in self.layers.values():
            if grad and layer.recompute_full:
                h = checkpoint(layer, h, cos, sin, ctx, use_reentrant=False)
            else:
                h = layer(h, cos, sin, ctx)
        if self.norm is not None:
            h = self.norm(h)
        if labels is not None:
            if self.output is None:
                raise MeshplanError("labels passed to a model part without the output head")
            return chunked_loss_sum(h, self.output, labels, self.loss_chunks)
        if self.output is not None:
            h = self.output(h)
        return h


def build_model(
    spec: ModelSpec,
    objective: str = "clm",
    attention_backend: str = "sdpa",
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Transformer:
    """The executor's model for a plan: bidirectional for MLM, causal otherwise."""
    model = Transformer(spec, causal=objective != "mlm", attention_backend=attention_backend)
    model.init_weights(seed)
    if device is not None:
        model.to(device)
    return model


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied weights counted once), as `ModelSpec.param_count()` does."""
    return sum(p.numel() for p in model.parameters())
