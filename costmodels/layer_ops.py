"""What one transformer layer runs besides its GEMMs and attention, per micro-batch: the
memory-bound elementwise kernels (norms, RoPE, activation, residual adds, dropout, FP8
casts) as HBM traffic, and how many kernels it launches. Counts follow the kernels each
stack runs (`costmodels.stacks`): "fused" is Transformer Engine / Megatron-Core (norm fused
into the next GEMM's prologue, fused SwiGLU / bias-GELU, fused RoPE, fused bias-dropout-add);
"eager" is one PyTorch op per step of each formula.

Traffic is counted in elements read + written per token, forward; backward reads the saved
input and the incoming gradient and writes the outgoing one, ~2x forward (Korthikanti et al.
2022, Sec. 4 count the same tensors). All functions broadcast over numpy arrays.
"""

from __future__ import annotations

import numpy as np

ArrayLike = float | np.ndarray

# Forward elements read + written per token, by tensor width. Replicated across TP unless SP
# splits them (norms, residual adds); split by TP (RoPE on Q / K, the MLP activation).
#   fused  norm r+w 2h (x2 norms), residual add r2+w1 = 3h (x2); RoPE r+w on Q and K;
#          SwiGLU reads gate and up, writes the product (3f); bias-GELU r+w (2f)
#   eager  RMSNorm as cast, square, mean, rsqrt, scale, weight (~8h per norm); RoPE as
#          real / imaginary views and products (~4 passes); SiLU then multiply (5f); GELU 3f
#          (bias add, then the activation)
FUSED_REPLICATED_H = 10.0
EAGER_REPLICATED_H = 22.0
FUSED_ROPE_PASSES = 2.0
EAGER_ROPE_PASSES = 4.0
FUSED_SWIGLU_F, EAGER_SWIGLU_F = 3.0, 5.0
FUSED_GELU_F, EAGER_GELU_F = 2.0, 3.0
DROPOUT_H = 2 * 2.5  # two hidden dropouts: read + write + a 1-byte mask (0.5 of a 16-bit elem)
BACKWARD_OVER_FORWARD = 2.0

# Kernels per layer forward (GEMMs, attention and the elementwise ops above; TP
# collectives counted separately). Backward launches ~2x (two GEMMs per forward GEMM).
FUSED_KERNELS_FWD = 12.0
EAGER_KERNELS_FWD = 30.0
FP8_CAST_KERNELS_FWD = 4.0  # one quantise per GEMM input (QKV, proj, up, down)


def elementwise_elements_fwd(
    h: ArrayLike, kv: ArrayLike, ffn: ArrayLike, swiglu: ArrayLike, tp: ArrayLike, sp: ArrayLike,
    fused: ArrayLike, dropout: ArrayLike,
) -> ArrayLike:
    """Elements per token one layer's elementwise kernels move in the forward pass, on one
    TP rank."""
    fused = np.asarray(fused, dtype=bool)
    repl = np.where(fused, FUSED_REPLICATED_H, EAGER_REPLICATED_H) * h
    repl = repl + np.where(np.asarray(dropout, dtype=bool), DROPOUT_H * h, 0.0)
    repl = np.where(np.asarray(sp, dtype=bool), repl / tp, repl)
    rope = np.where(fused, FUSED_ROPE_PASSES, EAGER_ROPE_PASSES) * (h + kv)
    act = np.where(
        np.asarray(swiglu, dtype=bool), np.where(fused, FUSED_SWIGLU_F, EAGER_SWIGLU_F),
        np.where(fused, FUSED_GELU_F, EAGER_GELU_F),
    ) * ffn
    return repl + (rope + act) / tp


def fp8_cast_bytes_fwd(h: ArrayLike, kv: ArrayLike, ffn: ArrayLike, mats: ArrayLike, tp: ArrayLike) -> ArrayLike:
    """Bytes per token FP8 training adds per layer forward: each GEMM's activation input is
    quantised (read 2 B, write 1 B) - QKV and up inputs (h each), proj input (h / tp), down
    input (f / tp) - and each GEMM's output gradient likewise in backward (Micikevicius et
    al. 2022, FP8 formats: per-tensor scaled casts around every GEMM)."""
    fwd_inputs = 2 * h + (h + ffn) / tp
    bwd_grads = (h + 2 * kv) / tp + h + (mats - 1) * ffn / tp + h
    return 3.0 * (fwd_inputs + bwd_grads)


def fp8_weight_cast_bytes(params_layer: ArrayLike, tp: ArrayLike) -> ArrayLike:
    """Per layer per micro-batch: the layer's weights quantised for forward and, transposed,
    for backward (read 2 B, write 1 B each)."""
    return 2 * 3.0 * params_layer / tp


def kernels_per_layer_fwd(fused: ArrayLike, tp: ArrayLike, fp8: ArrayLike) -> ArrayLike:
    base = np.where(np.asarray(fused, dtype=bool), FUSED_KERNELS_FWD, EAGER_KERNELS_FWD)
    comm = np.where(tp > 1, 2.0, 0.0)
    return base + comm + np.where(np.asarray(fp8, dtype=bool), FP8_CAST_KERNELS_FWD, 0.0)
