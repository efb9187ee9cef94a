"""FLOP counts per token.

One MFU definition for all of meshplan (documented in README, "Counting FLOPs"):
  MFU = model FLOPs per token x tokens/s per GPU / dense peak of the run's precision,
where model FLOPs count every matmul of forward + backward (3 x forward), causal attention
at half the full score matrix, the logits GEMM, and no recomputation. Hardware FLOPs
(HFU-like) add the forward work repeated by activation recomputation.

Every function takes scalars or numpy arrays (broadcasting), so the planner evaluates a
whole candidate table in one call.
"""

from __future__ import annotations

import numpy as np

from costmodels.specs import ModelSpec

ArrayLike = float | np.ndarray


def matmul_params_per_layer(
    hidden: ArrayLike, ffn: ArrayLike, kv_dim: ArrayLike, mlp_matrices: ArrayLike,
    active_experts: ArrayLike = 1, q_dim: ArrayLike | None = None,
) -> ArrayLike:
    """Weights that take part in a GEMM per token in one layer (norms and biases excluded).
    `q_dim`: heads x head_dim when it differs from hidden (Qwen3)."""
    q = hidden if q_dim is None else q_dim
    attn = 2 * hidden * q + 2 * hidden * kv_dim  # wq, wo + wk, wv (GQA)
    mlp = mlp_matrices * hidden * ffn * active_experts
    return attn + mlp


def attention_flops_per_token_fwd(
    seq: ArrayLike, hidden: ArrayLike, causal: bool | np.ndarray = True
) -> ArrayLike:
    """Score (QK^T) and context (AV) matmuls, per token per layer, forward.

    2 GEMMs x 2 FLOP/MAC x seq x hidden (Narayanan et al. 2021, Sec. 5.1 / Appendix); a
    causal mask needs only half the score matrix (FlashAttention-2, Dao 2023, Sec. 3.1).
    """
    full = 4.0 * seq * hidden
    return np.where(causal, 0.5, 1.0) * full


def model_flops_per_token(
    layers: ArrayLike, hidden: ArrayLike, ffn: ArrayLike, kv_dim: ArrayLike,
    mlp_matrices: ArrayLike, vocab: ArrayLike, seq: ArrayLike,
    active_experts: ArrayLike = 1, causal: bool | np.ndarray = True,
    q_dim: ArrayLike | None = None,
) -> ArrayLike:
    """Training FLOPs per token: 3 x (2 x GEMM weights + attention + logits) (Kaplan 2020 Table 1
    generalised; equals 6N + attention for dense models). MoE: `ffn` x `active_experts` is the
    MLP width each token's GEMMs see (top-k routed experts + shared ones; the router's
    hidden x experts GEMM is left out, as Megatron-Core's count does)."""
    q = hidden if q_dim is None else q_dim
    per_layer = 2 * matmul_params_per_layer(hidden, ffn, kv_dim, mlp_matrices, active_experts, q)
    per_layer = per_layer + attention_flops_per_token_fwd(seq, q, causal)
    logits = 2 * hidden * vocab
    return 3.0 * (layers * per_layer + logits)


def active_mlp_width(model: ModelSpec) -> float:
    """MLP width a token's GEMMs see, averaged over layers: an MoE layer's top-k routed
    experts plus its shared experts, a dense layer's MLP."""
    if not model.is_moe:
        return float(model.ffn_hidden)
    moe = model.experts_topk * model.expert_ffn + model.shared_ffn
    return (model.moe_layers * moe + (model.layers - model.moe_layers) * model.ffn_hidden) / model.layers


def model_flops_per_token_spec(model: ModelSpec, seq: int | None = None, causal: bool = True) -> float:
    return float(
        model_flops_per_token(
            model.layers, model.hidden, active_mlp_width(model), model.kv_dim, model.mlp_matrices,
            model.vocab, seq or model.seq_len, 1, causal, q_dim=model.q_dim,
        )
    )


def megatron_flops_per_token(
    layers: ArrayLike, hidden: ArrayLike, seq: ArrayLike, vocab: ArrayLike, full_recompute: bool
) -> ArrayLike:
    """Megatron-LM's count for GPT (MHA, FFN = 4h, full-attention scores), per token.

    Narayanan et al. 2021, Sec. 5.1, eq. (3): F = 96 B s l h^2 (1 + s/6h + V/16lh) with full
    recomputation (4 passes); without it, 72 B s l h^2 (1 + s/6h + V/12lh) (3 passes; the
    logits are never recomputed, hence the different V term).
    """
    if full_recompute:
        return 96.0 * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (16 * layers * hidden))
    return 72.0 * layers * hidden**2 * (1 + seq / (6 * hidden) + vocab / (12 * layers * hidden))


def mfu(tokens_per_sec_per_gpu: ArrayLike, flops_per_token: ArrayLike, peak_flops: ArrayLike) -> ArrayLike:
    """Model FLOPs utilisation (PaLM, Chowdhery et al. 2022, App. B)."""
    return tokens_per_sec_per_gpu * flops_per_token / peak_flops
