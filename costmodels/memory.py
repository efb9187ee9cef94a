"""Memory per GPU: model states as each ZeRO stage shards them, activations per layer
(Korthikanti et al. 2022), in-flight micro-batches per pipeline schedule, logits and
communication buffers. All functions broadcast over numpy arrays. Bytes throughout.

Codes used in arrays: sharding 0 none, 1 zero1, 2 zero2, 3 zero3;
recompute 0 none, 1 selective, 2 full.
"""

from __future__ import annotations

import numpy as np

ArrayLike = float | np.ndarray


# --------------------------------------------------------------------------- model states


def model_state_bytes(
    params: ArrayLike, shard_degree: ArrayLike, stage: ArrayLike,
    weight_bytes: ArrayLike = 2.0, grad_bytes: ArrayLike = 2.0, optim_bytes: ArrayLike = 12.0,
) -> dict[str, ArrayLike]:
    """Weights, gradients and optimizer state per GPU.

    Mixed-precision Adam keeps 16-bit weights and gradients plus fp32 master weights,
    momentum and variance (K = 12 bytes/param): stage 1 shards the optimizer state, stage 2
    also the gradients, stage 3 also the weights (Rajbhandari et al. 2020, Sec. 5, Fig. 1).
    """
    n = np.maximum(shard_degree, 1)
    stage = np.asarray(stage)
    weights = np.where(stage >= 3, weight_bytes * params / n, weight_bytes * params)
    grads = np.where(stage >= 2, grad_bytes * params / n, grad_bytes * params)
    optim = np.where(stage >= 1, optim_bytes * params / n, optim_bytes * params)
    return {"weights": weights, "gradients": grads, "optimizer": optim}


# --------------------------------------------------------------------------- activations


def korthikanti_layer_activation_bytes(
    s: ArrayLike, b: ArrayLike, h: ArrayLike, a: ArrayLike, t: ArrayLike,
    sequence_parallel: bool | np.ndarray, recompute: np.ndarray | int,
) -> ArrayLike:
    """Activation memory of one GPT layer exactly as in Korthikanti et al. 2022, Table 2
    (16-bit activations, dropout, MHA, FFN = 4h, explicit attention scores):
      no parallelism        sbh(34 + 5as/h)
      tensor parallel       sbh(10 + 24/t + 5as/(ht))
      + sequence parallel   sbh(34/t + 5as/(ht))
      + selective recompute sbh(34/t)      (with SP; 10 + 24/t without)
      full recompute        2sbh           (2sbh/t with SP)
    """
    recompute = np.asarray(recompute)
    sp = np.asarray(sequence_parallel, dtype=bool)
    scores = 5 * a * s / (h * t)
    linear = np.where(sp, 34 / t, 10 + 24 / t)
    none = s * b * h * (linear + scores)
    selective = s * b * h * linear
    full = np.where(sp, 2 * s * b * h / t, 2 * s * b * h)
    return np.where(recompute == 2, full, np.where(recompute == 1, selective, none))


def layer_activation_bytes(
    s: ArrayLike, b: ArrayLike, h: ArrayLike, heads: ArrayLike, kv_dim: ArrayLike,
    ffn: ArrayLike, swiglu: bool | np.ndarray, t: ArrayLike, cp: ArrayLike,
    sequence_parallel: bool | np.ndarray, recompute: np.ndarray | int,
    flash: bool | np.ndarray = True, dropout: bool | np.ndarray = False,
    act_bytes: ArrayLike = 2.0,
) -> ArrayLike:
    """Korthikanti's per-layer accounting generalised to GQA, SwiGLU, any FFN width,
    FlashAttention (no s^2 score tensors stored) and context parallelism (s/cp tokens).

    Per token, in units of `act_bytes` (Korthikanti et al. 2022, Sec. 4.1 term by term):
      replicated across TP unless SP: two norm inputs (2h), QKV input (h), MLP input (h)
      [+ two dropout masks, h/act_bytes bytes each, when dropout is on]
      split by TP: Q (h), K and V (2 kv), attention output / proj input (h),
                   MLP intermediates: GELU 2f (input, output), SwiGLU 3f (w1, w3, product)
      scores (no flash): softmax 1 x heads x s, dropout (mask + output) 1.5 x heads x s
    Reduces to Table 2's 34 sbh + 5 a s^2 b for GPT (kv = h, f = 4h, dropout, no flash).
    """
    recompute = np.asarray(recompute)
    sp = np.asarray(sequence_parallel, dtype=bool)
    tokens = s * b / cp
    mask = np.where(dropout, 1.0 / act_bytes, 0.0)
    replicated = (4 * h + 2 * mask * h)  # norm inputs, QKV input, MLP input (+ masks)
    split = h + 2 * kv_dim + h + np.where(swiglu, 3 * ffn, 2 * ffn)
    scores = np.where(flash, 0.0, heads * (s / cp) * (1 + np.where(dropout, 1.5, 0.0)))
    per_token = np.where(sp, replicated / t, replicated) + (split + scores) / t
    none = tokens * act_bytes * per_token
    selective = tokens * act_bytes * (np.where(sp, replicated / t, replicated) + split / t)
    full = tokens * act_bytes * np.where(sp, h / t, h)  # the layer input only
    return np.where(recompute == 2, full, np.where(recompute == 1, selective, none))


def eager_extra_activation_bytes(
    s: ArrayLike, b: ArrayLike, h: ArrayLike, ffn: ArrayLike, t: ArrayLike, cp: ArrayLike,
    sequence_parallel: bool | np.ndarray, act_bytes: ArrayLike = 2.0,
) -> ArrayLike:
    """Per layer, what an eager (unfused) stack saves beyond `layer_activation_bytes`: the two
    norm outputs autograd keeps as the next matmul's input (2h, split only under SP) and the
    activation function's output (f, split by TP)."""
    tokens = s * b / cp
    norms = np.where(np.asarray(sequence_parallel, dtype=bool), 2 * h / t, 2 * h)
    return tokens * act_bytes * (norms + ffn / t)


def op_level_sac_activation_bytes(
    s: ArrayLike, b: ArrayLike, h: ArrayLike, heads: ArrayLike, kv_dim: ArrayLike,
    ffn: ArrayLike, swiglu: bool | np.ndarray, t: ArrayLike, cp: ArrayLike, mlp_mats: ArrayLike,
    act_bytes: ArrayLike = 2.0,
) -> ArrayLike:
    """Op-level selective activation checkpointing (torchtitan's "selective" AC with the
    "op" policy): the layer input and the attention output are kept, and the outputs of every
    other matmul (Q, K, V, O, the MLP's up / gate and down projections); the rest is
    recomputed in backward. Per token: 2h + (h + 2 kv + h + (mats - 1) f + h) / 2."""
    tokens = s * b / cp
    mm_outputs = h + 2 * kv_dim + h + (mlp_mats - 1) * ffn + h
    return tokens * act_bytes * (2 * h + 0.5 * mm_outputs) / t


def logits_bytes(tokens: ArrayLike, vocab: ArrayLike, t: ArrayLike, act_bytes: ArrayLike = 2.0,
                 eager_ce: bool | np.ndarray = False, chunks: ArrayLike = 1) -> ArrayLike:
    """Last stage at the loss, vocab split across TP. Per logit element a fused /
    vocab-parallel cross entropy holds the logits (act_bytes) and one fp32 buffer it
    computes the gradient in place (2 + 4 in bf16; Shoeybi et al. 2019, Sec. 3). Eager
    `F.cross_entropy` on upcast logits holds, at the peak of backward, the fp32 log-softmax
    output it saved, that output's gradient and the fp32 gradient of the logits: 4 + 4 + 4
    = 12 in any precision (nothing saves the logits, or in 16-bit their fp32 copy, past
    forward). A loss in `chunks` sequence chunks, each recomputed in backward, holds one."""
    per_logit = np.where(eager_ce, 12.0, act_bytes + 4.0)
    return tokens * vocab * per_logit / (t * np.asarray(chunks, dtype=np.float64))


def embedding_output_bytes(tokens: ArrayLike, h: ArrayLike, t: ArrayLike, sp: bool | np.ndarray) -> ArrayLike:
    """First stage: the embedding output kept for backward (2 bytes/elem, split under SP)."""
    return tokens * h * 2 / np.where(sp, t, 1)


def zero3_gather_bytes(layer_params: ArrayLike, weight_bytes: ArrayLike = 2.0, prefetch: int = 2) -> ArrayLike:
    """ZeRO-3 / FSDP materialises full 16-bit parameters of the current and the prefetched
    layer (FSDP2 default prefetch; Rajbhandari et al. 2020, Sec. 5.3)."""
    return prefetch * layer_params * weight_bytes
