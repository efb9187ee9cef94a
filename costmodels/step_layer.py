"""Per-layer, per-micro-batch step-time terms on one rank: the layer's GEMMs, attention as the
stack runs it, elementwise traffic and FP8 casts, kernel gaps and host dispatch, recompute,
and the tensor-parallel and context-parallel collectives; the output head; the pipeline's
boundary send. Each takes a `StepCase` and returns arrays over the cases."""

from __future__ import annotations

from typing import Any

import numpy as np

from costmodels import comm, layer_ops, memory
from costmodels.flops import attention_flops_per_token_fwd
from costmodels.gemm import gemm_time
from costmodels.stacks import ATTENTION_IMPLS
from costmodels.step_case import StepCase, attention_utilisation
from costmodels.step_moe import moe_layer

# Vocab-parallel cross entropy (Megatron's, torch's loss_parallel) is unfused: max, subtract,
# exp, sum, log, target gather forward and exp, scale, subtract backward touch the logits 13
# times against 5 for a fused log-softmax forward + backward (Shoeybi et al. 2019, Sec. 3).
VOCAB_PARALLEL_CE_PASSES = 13 / 5
FLASH_BWD_OVER_FWD = 2.5  # FlashAttention-2 backward recomputes QK^T: 5 matmuls vs 2 (Dao 2023, Sec. 3.1.2)
# Unfused attention over materialised scores, bytes per score element forward: write the
# scores, fused scale-mask-softmax reads and writes them, AV reads the probabilities
# (Megatron's FusedScaleMaskSoftmax); dropout adds a read, a write and a 1-byte mask.
MATH_SCORE_BYTES_FWD = 4 * 2.0
MATH_DROPOUT_BYTES_FWD = 2 * 2.0 + 1.0
TP_OVERLAP_CHUNKS = 4.0  # Transformer Engine userbuffers' default split of a pipelined collective


def layer_gemms(x: StepCase) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """GEMM time of a layer forward (`fwd`), forward + backward (`all`) and the
    weight-gradient GEMMs alone (`w`: what zero-bubble schedules defer into the bubble); and
    the MoE layer's terms (`step_moe.moe_layer`)."""
    gemm, fwd_bwd, wgrad, tok, h, tp = x.gemm, x.fwd_bwd, x.wgrad, x.tok, x.h, x.tp
    qkv_n, o_k = (x.q_dim + 2 * x.kv) / tp, x.q_dim / tp
    attn_fwd = gemm(tok, qkv_n, h) + gemm(tok, h, o_k)
    attn = fwd_bwd(tok, qkv_n, h) + fwd_bwd(tok, h, o_k)
    # MLP of a dense layer (also the dense layers of an MoE model).
    dense_ffn = x.col("dense_ffn", x.ffn)
    up, down = (x.mats - 1) * dense_ffn / tp, dense_ffn / tp
    dense_fwd = gemm(tok, up, h) + gemm(tok, h, down)
    dense = fwd_bwd(tok, up, h) + fwd_bwd(tok, h, down)
    moe = moe_layer(x)
    mf = x.moe_frac
    return {
        "fwd": attn_fwd + mf * moe["gemm_fwd"] + (1 - mf) * dense_fwd,
        "all": attn + mf * moe["gemm"] + (1 - mf) * dense,
        "w": wgrad(tok, qkv_n, h) + wgrad(tok, h, o_k) + mf * moe["gemm_w"]
        + (1 - mf) * (wgrad(tok, up, h) + wgrad(tok, h, down)),
    }, moe


def attention_fwd(x: StepCase) -> np.ndarray:
    """Attention forward as the stack runs it: a fused kernel at its sourced utilisation, or
    QK^T and AV over the full (masked) s x s scores as batched GEMMs at the GEMM rate plus
    the softmax (and dropout) passes over b x heads x s x s scores in HBM."""
    stack, tok, tp, seq = x.stack, x.tok, x.tp, x.seq
    attn_impl = stack["attn_impl"].astype(int)
    math_attn = attn_impl == ATTENTION_IMPLS.index("math")
    util = attention_utilisation(attn_impl, x.gen_idx)
    attn_rate = x.peak_bf16 * np.where(x.on_cpu, x.gen_eff, util * x.prof.attn_eff)
    t_flash_fwd = attention_flops_per_token_fwd(seq, x.h, True) * tok / tp / attn_rate
    scores = tok * (seq / x.cp) * x.heads / tp
    score_bytes = MATH_SCORE_BYTES_FWD + np.where(stack["dropout"], MATH_DROPOUT_BYTES_FWD, 0.0)
    t_math_fwd = attention_flops_per_token_fwd(seq, x.h, False) * tok / tp / (x.peak_bf16 * x.gen_eff) \
        + scores * score_bytes / x.bw_elem
    return np.where(math_attn, t_math_fwd, t_flash_fwd)


def elementwise(x: StepCase) -> tuple[np.ndarray, np.ndarray]:
    """Elementwise kernels (and FP8 casts) as HBM traffic: forward, and forward + backward.
    An MoE layer quantises its routed copies, k per token, at the experts' inputs and output
    gradients, and the weights of its local experts."""
    tp, h, kv, f = x.tp, x.h, x.kv, x.ffn_active
    elems = layer_ops.elementwise_elements_fwd(h, kv, f, x.swiglu, tp, x.sp, x.stack["fused"], x.stack["dropout"])
    t_fwd = x.tok * elems * x.ab / x.bw_elem
    routed_extra_h = x.moe_frac * (x.act_exp - 1) * 2 * h
    weights = x.f64("params_layer_dense") + x.col("params_layer_expert", 0.0) / x.ep
    fp8_bytes = np.where(x.low_prec, x.tok * (layer_ops.fp8_cast_bytes_fwd(h, kv, f, x.mats, tp)
                                              + 3.0 * routed_extra_h)
                         + layer_ops.fp8_weight_cast_bytes(weights, tp), 0.0)
    return t_fwd, (1 + layer_ops.BACKWARD_OVER_FORWARD) * t_fwd + fp8_bytes / x.bw_elem


def layer_time(x: StepCase) -> dict[str, Any]:
    """A layer per micro-batch: GEMMs, attention, elementwise, recompute and kernel gaps
    (`layer`), its shares in the F / B / W steps, and the host's dispatch time (`host`)."""
    prof, recompute, rc_frac, stack = x.prof, x.recompute, x.rc_frac, x.stack
    g, moe = layer_gemms(x)
    t_attn_fwd = attention_fwd(x)
    t_attn = (1 + FLASH_BWD_OVER_FWD) * t_attn_fwd
    t_elem_fwd, t_elem = elementwise(x)
    # Kernel floor: each launch leaves the GPU idle for a gap (accelerators; a CPU runs its
    # ops back to back and pays their dispatch instead).
    kern_fwd = layer_ops.kernels_per_layer_fwd(stack["fused"], x.tp, x.low_prec)
    kernels = kern_fwd * (1 + layer_ops.BACKWARD_OVER_FORWARD) + np.where(recompute == 2, rc_frac, 0.0) * kern_fwd
    t_gaps = np.where(x.on_cpu, 0.0, kernels * prof.kernel_gap_s)
    recompute_fwd = np.where(
        recompute == 2, rc_frac * (g["fwd"] + t_attn_fwd + t_elem_fwd),
        np.where(recompute == 1, np.where(stack["op_level_sac"], 0.5 * g["fwd"] + t_attn_fwd, t_attn_fwd), 0.0),
    )
    work = np.maximum(g["all"] + t_attn + t_elem + recompute_fwd, 1e-30)
    cpu_layer = np.where(x.on_cpu, prof.layer_overhead_s, 0.0) * np.where(recompute == 2, 1 + 0.5 * rc_frac, 1.0)
    return {
        "layer": g["all"] + t_attn + t_elem + recompute_fwd + t_gaps + cpu_layer,
        "gemm": g["all"], "attn_fwd": t_attn_fwd, "moe": moe,
        # Shares of a layer's work in forward and in the weight-gradient step; the rest (input
        # gradients, recompute) is the input-gradient step (Qi et al. 2023, Sec. 2: F, B, W).
        "fwd_share": (g["fwd"] + t_attn_fwd + t_elem_fwd) / work, "wgrad_share": g["w"] / work,
        # Host time: each kernel is one op the host dispatches (autograd included); CUDA
        # graphs replay without it. The host runs ahead of the GPU, so it only costs time
        # where it is the slower of the two.
        "host": np.where(stack["cuda_graphs"], 0.0, kernels * prof.host_op_s),
    }


def tp_comm(x: StepCase, t_gemm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Exposed tensor-parallel collective time per layer per micro-batch, and the calls."""
    tp, sp = x.tp, x.sp
    tp_bw, tp_lat = x.f64("tp_bw") * x.prof.link_eff, x.f64("tp_lat")
    # Per layer: 2 forward + 2 backward; full recompute re-runs 2 (reentrant) or, stopping
    # early, 1 all-reduce / 2 all-gathers + 1 reduce-scatter (1.5 SP pairs).
    rerun = np.where(x.stack["recompute_early_stop"], np.where(sp, 1.5, 1.0), 2.0)
    n_tp = 4 + np.where(x.recompute == 2, rerun * x.rc_frac, 0)
    act_bytes = x.tok * x.h * x.ab
    # SP replaces each all-reduce by an all-gather + reduce-scatter pair (Korthikanti 2022).
    t_sp_pair = (comm.allgather_time(act_bytes, tp, *x.link("tp_allgather", tp_bw, tp_lat))
                 + comm.reduce_scatter_time(act_bytes, tp, *x.link("tp_reduce_scatter", tp_bw, tp_lat)))
    t_ar = comm.allreduce_time(act_bytes, tp, *x.link("tp_allreduce", tp_bw, tp_lat))
    t_tp = n_tp * np.where(sp, t_sp_pair, t_ar)
    # Stacks that overlap TP communication (Megatron-Core / TE userbuffers) split each
    # collective into chunks pipelined with the GEMM that consumes or produces it: what shows
    # is the first chunk, or the part the layer's GEMMs are too short to cover.
    hidden_tp = np.maximum(t_tp - t_gemm, t_tp / TP_OVERLAP_CHUNKS)
    # (Megatron-Core's --tp-comm-overlap needs sequence parallelism)
    t_tp = np.where(x.stack["tp_comm_overlap"] & sp & ~x.on_cpu, hidden_tp, t_tp)
    return np.where(tp > 1, t_tp, 0.0), n_tp


def cp_comm(x: StepCase, t_attn_fwd: np.ndarray) -> np.ndarray:
    """Context parallelism's K/V exchange per layer per micro-batch, (cp - 1) passes forward
    and K/V plus dK/dV backward, hidden behind attention where it is long enough (Liu et al.
    2023, Ring Attention; an all-gather of K/V moves the same bytes)."""
    cp = x.cp
    kv_bytes = x.tok * 2 * x.kv / x.tp * x.ab
    link = x.link("p2p", x.f64("cp_bw") * x.prof.link_eff, x.f64("cp_lat"))
    t_raw = 3 * (cp - 1) * comm.p2p_time(kv_bytes, *link)
    return np.where(cp > 1, np.maximum(0.0, t_raw - (1 + FLASH_BWD_OVER_FWD) * t_attn_fwd), 0.0)


def logits(x: StepCase) -> np.ndarray:
    """The output GEMM forward + backward and the cross entropy's logits traffic per
    micro-batch on the last stage (16 bits even in FP8 recipes: TE keeps it out of FP8)."""
    tok, h, v, ab, sms = x.tok, x.h, x.vocab / x.tp, x.ab, x.sms
    peak, eff, hbm = x.peak_bf16, x.gen_eff, x.hbm_bw
    fwd = gemm_time(tok, v, h, peak, eff, hbm, ab, sms)
    # a chunked loss re-runs each chunk's output GEMM and cross-entropy forward in backward
    # (`Layout.loss_chunks`): one more GEMM, half a cross-entropy pass more
    t = (fwd * np.where(x.loss_chunks > 1, 2.0, 1.0) + gemm_time(tok, h, v, peak, eff, hbm, ab, sms)
         + gemm_time(h, v, tok, peak, eff, hbm, ab, sms))
    ce_passes = np.where(x.tp > 1, VOCAB_PARALLEL_CE_PASSES, 1.0) + np.where(x.loss_chunks > 1, 0.5, 0.0)
    return t + 2 * ce_passes * memory.logits_bytes(tok, x.vocab, x.tp) / x.bw_elem


def pp_send(x: StepCase) -> np.ndarray:
    """One micro-batch's boundary activations sent to the next stage (the schedule's bubble,
    critical-path hops and idle follow in `costmodels.steptime`)."""
    p2p_bytes = x.tok * x.h * x.ab / np.where(x.sp, x.tp, 1.0)
    return np.asarray(comm.p2p_time(p2p_bytes, *x.link("p2p", x.f64("pp_bw") * x.prof.link_eff, x.f64("pp_lat"))))
