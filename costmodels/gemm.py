"""Time of one GEMM on a tensor-core accelerator: peak x efficiency that depends on shape.

  tile / wave quantisation  an (m x n) output is cut into ceil(m/Tm) ceil(n/Tn) tiles that
                            run in waves of one tile per SM; the last wave is partly idle
                            and edge tiles are padded, so the useful share of the launched
                            work is m n / (waves x SMs x Tm x Tn) (NVIDIA "Matrix
                            Multiplication Background" guide, "Wave quantization")
  roofline                  a skinny GEMM is bound by its operand traffic: bytes / HBM
                            bandwidth (Williams et al. 2009)
  low precision             FP8 / FP4 operands run on their own (higher) peak; dimensions
                            are padded to multiples of 16 (FP8) / 32 (FP4) elements (cuBLASLt
                            FP8 requirements; NVFP4 16-element blocks x 2 elements per byte)

All functions broadcast over numpy arrays.
"""

from __future__ import annotations

import numpy as np

ArrayLike = float | np.ndarray

# CUTLASS / cuBLAS's large bf16 tile on Ampere, Hopper and Blackwell (128 x 256 per CTA).
TILE_M, TILE_N = 128.0, 256.0


def wave_efficiency(m: ArrayLike, n: ArrayLike, sms: ArrayLike, groups: ArrayLike = 1.0) -> ArrayLike:
    """Useful share of the tiles `groups` (m x n) outputs launch together on `sms` SMs (1
    where sms = 0, e.g. a CPU)."""
    sms = np.asarray(sms, dtype=np.float64)
    safe = np.maximum(sms, 1.0)
    tiles = groups * np.ceil(m / TILE_M) * np.ceil(n / TILE_N)
    waves = np.ceil(tiles / safe)
    eff = (groups * np.asarray(m, dtype=np.float64) * n) / np.maximum(waves * safe * TILE_M * TILE_N, 1.0)
    return np.where(sms > 0, np.minimum(eff, 1.0), 1.0)


def pad(x: ArrayLike, multiple: ArrayLike) -> ArrayLike:
    return np.ceil(np.asarray(x, dtype=np.float64) / multiple) * multiple


def gemm_time(
    m: ArrayLike, n: ArrayLike, k: ArrayLike, peak: ArrayLike, eff: ArrayLike, hbm_bw: ArrayLike,
    elem_bytes: ArrayLike, sms: ArrayLike, pad_to: ArrayLike = 1.0,
) -> ArrayLike:
    """Seconds for (m x k) @ (k x n): max(compute at a shape-dependent rate, operand bytes
    over HBM). `eff` is the generation's sustained fraction of peak for a large square GEMM;
    `pad_to` the element multiple low-precision kernels need."""
    mp, np_, kp = pad(m, pad_to), pad(n, pad_to), pad(k, pad_to)
    rate = peak * eff * wave_efficiency(mp, np_, sms)
    compute = 2.0 * mp * np_ * kp / rate
    traffic = elem_bytes * (m * k + k * n) + 2.0 * m * n  # 16-bit output
    return np.maximum(compute, traffic / hbm_bw)


def grouped_gemm_time(
    groups: ArrayLike, m: ArrayLike, n: ArrayLike, k: ArrayLike, peak: ArrayLike, eff: ArrayLike,
    hbm_bw: ArrayLike, elem_bytes: ArrayLike, sms: ArrayLike, pad_to: ArrayLike = 1.0,
) -> ArrayLike:
    """Seconds for `groups` GEMMs (m x k) @ (k x n) with their own weights in one grouped
    kernel (MoE experts: CUTLASS grouped GEMM, Megatron-Core's --moe-grouped-gemm,
    torch._grouped_mm): the tiles of every group share the waves, and each group reads its
    own weights, so few tokens per expert make the kernel weight-bandwidth bound."""
    mp, np_, kp = pad(m, pad_to), pad(n, pad_to), pad(k, pad_to)
    rate = peak * eff * wave_efficiency(mp, np_, sms, groups)
    compute = 2.0 * groups * mp * np_ * kp / rate
    traffic = groups * (elem_bytes * (m * k + k * n) + 2.0 * m * n)
    return np.where(groups * m > 0, np.maximum(compute, traffic / hbm_bw), 0.0)
