"""The columns every step-time term reads, computed once per case table: the layout, the
model's shapes, the chip's rates, the stack's switches, and the GEMM-rate model they share.
Each term of `costmodels.steptime` takes a `StepCase` and returns arrays, one per case."""

from __future__ import annotations

import numpy as np

from costmodels.cases import GEN_ORDER, Cases, loss_chunks_column
from costmodels.gemm import gemm_time
from costmodels.profile import Profile
from costmodels.stacks import ATTENTION_IMPLS, ATTENTION_UTILISATION

PAD_ELEMENTS = {"fp8": 16.0, "fp4": 32.0}  # cuBLASLt FP8 / NVFP4 dimension multiples


class StepCase:
    """One case table's shared columns (arrays over the cases)."""

    def __init__(self, c: Cases, prof: Profile) -> None:
        self.c, self.prof = c, prof
        f64 = self.f64
        tp, pp, dp, cp, vpp = f64("tp"), f64("pp"), f64("dp"), f64("cp"), f64("vpp")
        self.tp, self.pp, self.dp, self.cp, self.vpp = tp, pp, dp, cp, vpp
        self.ep = self.col("ep", 1.0)
        self.micro, self.gbs, self.seq = f64("micro"), f64("gbs"), f64("seq")
        self.h, self.ffn, self.kv, self.vocab, self.layers = (
            f64("hidden"), f64("ffn"), f64("kv_dim"), f64("vocab"), f64("layers"))
        self.heads, self.mats, self.act_exp = f64("heads"), f64("mlp_mats"), f64("active_experts")
        self.experts = f64("experts")
        self.recompute = np.asarray(c["recompute"])
        self.sharding = sharding = np.asarray(c["sharding"])
        self.sp = np.asarray(c["sp"], dtype=bool)
        self.swiglu = np.asarray(c["swiglu"], dtype=bool)
        self.ab = f64("act_bytes")
        self.hbm_bw, self.elem_bw = f64("hbm_bw"), f64("elem_bw")
        self.peak_gemm, self.peak_bf16 = f64("peak_gemm"), f64("peak_bf16")
        self.gen_idx = gen_idx = np.asarray(c["gen_idx"], dtype=int)
        self.gen_eff = np.array([prof.gemm_eff.get(g, 0.6) for g in GEN_ORDER])[gen_idx]
        # On a CPU host gloo's collectives run on the cores that compute (no copy engines or
        # spare SMs to hide them behind), so nothing overlaps: every collective is exposed.
        self.on_cpu = on_cpu = gen_idx == GEN_ORDER.index("cpu")
        self.dp_overlap = np.where(on_cpu, 0.0, prof.dp_overlap)
        self.world = tp * pp * dp * cp
        dp_shard = f64("dp_shard") if "dp_shard" in c else np.zeros_like(tp)
        self.shard_n = np.where((dp_shard > 0) & (sharding > 0), dp_shard, dp) * cp  # ZeRO sharding group
        self.rep_n = dp * cp / self.shard_n  # replicas of each shard (HSDP)
        self.m = np.maximum(self.gbs / (self.micro * dp), 1.0)  # micro-batches per step per pipeline
        self.tok = self.micro * self.seq / cp  # tokens per micro-batch on one GPU's sequence shard
        # The slowest stage sets the pace: uneven splits give some stages ceil(L / (p v)) layers
        # per chunk (Megatron's uneven pipeline split).
        self.layers_stage = np.ceil(self.layers / (pp * vpp)) * vpp
        self.rc_frac = recompute_fraction(c, self.layers_stage)
        self.loss_chunks = loss_chunks_column(c).astype(np.float64)
        self.stack = stack_columns_of(c, len(tp))
        prec = np.asarray(c["precision_idx"], dtype=int) if "precision_idx" in c else np.zeros(len(tp), int)
        self.low_prec = low_prec = self.peak_gemm > self.peak_bf16 * 1.01  # FP8 / FP4 GEMMs
        self.pad_to = np.where(low_prec, np.where(prec == 4, PAD_ELEMENTS["fp4"], PAD_ELEMENTS["fp8"]), 1.0)
        self.sms = f64("sms") if "sms" in c else np.zeros_like(tp)
        # FP8 / FP4 GEMMs sustain the same share of their own peak as 16-bit ones (casts charged
        # in the elementwise term)
        self.gemm_bytes = np.where(low_prec, np.where(prec == 4, 0.5, 1.0), self.ab)
        self.bw_elem = elem_bw_eff(self.elem_bw, on_cpu, prof)
        self.moe_frac = self.col("moe_frac", 0.0)
        self.q_dim = self.col("q_dim", self.h)
        self.ffn_active = self.col("ffn_active", self.ffn * self.act_exp)  # MLP width a token's elementwise ops see

    def f64(self, k: str) -> np.ndarray:
        return np.asarray(self.c[k], dtype=np.float64)

    def col(self, k: str, default: float | np.ndarray) -> np.ndarray:
        """Column `k`, or `default` broadcast where the table has none."""
        if k in self.c:
            return self.f64(k)
        return np.broadcast_to(np.asarray(default, dtype=np.float64), np.shape(self.c["tp"]))

    def link(self, op: str, bw: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bandwidth and latency of one collective kind on a group's link: the link's figures
        scaled by what `meshplan bench` measured for that collective (1x / the link's by
        default)."""
        rel = np.asarray(self.c.get(f"{op}_bw_rel", 1.0), dtype=np.float64)
        op_lat = np.asarray(self.c.get(f"{op}_lat", -1.0), dtype=np.float64)
        return bw * rel, np.where(op_lat >= 0, op_lat, lat)

    # GEMMs at the shape-dependent rate (`costmodels.gemm`); backward runs two GEMMs per
    # forward one (Narayanan et al. 2021, Sec. 5.1): dX = dY W^T (m x k from m x n) and
    # dW = X^T dY (k x n).
    def gemm(self, mm, nn, kk):
        return gemm_time(mm, nn, kk, self.peak_gemm, self.gen_eff, self.hbm_bw, self.gemm_bytes,
                         self.sms, self.pad_to)

    def fwd_bwd(self, mm, nn, kk):
        return self.gemm(mm, nn, kk) + self.gemm(mm, kk, nn) + self.gemm(kk, nn, mm)

    def wgrad(self, mm, nn, kk):
        """The weight-gradient GEMM of `fwd_bwd` alone."""
        return self.gemm(kk, nn, mm)


def attention_utilisation(attn_impl: np.ndarray, gen_idx: np.ndarray) -> np.ndarray:
    """Sourced forward utilisation of each case's attention kernel (`costmodels.stacks`)."""
    table = np.ones((len(ATTENTION_IMPLS), len(GEN_ORDER)))
    for i, impl in enumerate(ATTENTION_IMPLS):
        for j, gen in enumerate(GEN_ORDER):
            table[i, j] = ATTENTION_UTILISATION[impl][gen] if impl in ATTENTION_UTILISATION else 1.0
    return table[attn_impl, gen_idx]


def elem_bw_eff(elem_bw: np.ndarray, on_cpu: np.ndarray, prof: Profile) -> np.ndarray:
    """Bandwidth streaming elementwise kernels achieve: a fitted share of HBM bandwidth on
    accelerators; on a CPU host `meshplan bench` measured the achieved rate itself."""
    return elem_bw * np.where(on_cpu, 1.0, prof.elementwise_eff)


def stack_columns_of(c: Cases, n: int) -> dict[str, np.ndarray]:
    """The stack's columns (`costmodels.stacks.stack_columns`), the default stack's where a
    case table has none."""
    from costmodels.stacks import DEFAULT_STACK, stack_columns

    out = {}
    for k, v in stack_columns(DEFAULT_STACK).items():
        col = np.asarray(c[k]) if k in c else np.full(n, v)
        out[k] = col.astype(bool) if isinstance(v, bool) else col.astype(np.float64)
    return out


def recompute_fraction(c: Cases, layers_stage: np.ndarray) -> np.ndarray:
    """Share of a stage's layers that full recompute applies to (the first
    `recompute_layers` of each rank, Megatron's block method); 0 in the column means all."""
    rl = np.asarray(c["recompute_layers"], dtype=np.float64) if "recompute_layers" in c else np.zeros_like(layers_stage)
    return np.where(rl > 0, np.minimum(rl / layers_stage, 1.0), 1.0)

