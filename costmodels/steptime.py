"""Step time, throughput, MFU and peak memory per GPU for a table of cases.

Physics first, few free parameters (`costmodels.profile.Profile`):
  compute     each layer GEMM at a shape-dependent rate (`costmodels.gemm`: wave quantisation
              on the chip's SMs, low-precision padding, roofline), forward and the two backward
              GEMMs; attention as the stack runs it (`costmodels.stacks`: FlashAttention-2,
              FlashAttention-3 / cuDNN, or the unfused path over materialised scores),
              backward 2.5x forward (Dao 2023, Sec. 3.1); elementwise kernels as the HBM
              traffic the stack's kernels move (`costmodels.layer_ops`), FP8 casts; a GPU
              floor per kernel launched, and the host's per-op time when it outruns the GPU.
  TP          2 all-reduces forward, 2 backward per layer (Shoeybi et al. 2019, Sec. 3;
              with SP an all-gather + reduce-scatter pair of the same volume, Korthikanti 2022),
              hidden behind the GEMMs (all but the first of 4 chunks) only where the stack
              overlaps them.
  CP          K/V ring passes overlapped with attention (Liu et al. 2023, Ring Attention).
  PP          the schedule's bubble (`costmodels.pipeline.bubble_time`: 1F1B family (p - 1)
              (F + B + W) / v, Narayanan et al. 2021 Sec. 2.2; zero bubble Qi et al. 2023) on
              the stages without the output head, plus the p2p sends on the critical path.
  DP / ZeRO   gradient all-reduce or reduce-scatter + all-gather once per step; ZeRO-3 gathers
              parameters forward and backward every micro-batch (Rajbhandari et al. 2020);
              overlapped with backward (or all compute for ZeRO-3) to a fitted degree.
  optimizer   Adam reads and writes ~36 bytes per local parameter (fp32 master, m, v, grad).
"""

from __future__ import annotations

import numpy as np

from costmodels import comm, layer_ops, memory, pipeline
from costmodels.cases import GEN_ORDER, Cases
from costmodels.flops import attention_flops_per_token_fwd, model_flops_per_token
from costmodels.gemm import gemm_time, grouped_gemm_time
from costmodels.profile import Profile
from costmodels.stacks import ATTENTION_IMPLS, ATTENTION_UTILISATION

# Adam's HBM traffic per local parameter: read + write fp32 master, m, v (24) + read the fp32
# grad (4) + write the 16-bit weight (2) = 30 B; the model uses 36 B, an allowance (not a
# measurement) for the gradient-norm and zeroing passes over the gradients.
ADAM_BYTES_PER_PARAM = 36.0
DP_BUCKET_BYTES = 50e6  # gradient bucket: DDP's 25 MB default .. Megatron's 40M-param buffers
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
PAD_ELEMENTS = {"fp8": 16.0, "fp4": 32.0}  # cuBLASLt FP8 / NVFP4 dimension multiples
# Synchronising calls per MoE layer and micro-batch under expert parallelism: the token
# counts exchange, dispatch and combine forward, their two adjoints backward.
MOE_A2A_CALLS = 5.0


def _attention_utilisation(attn_impl: np.ndarray, gen_idx: np.ndarray) -> np.ndarray:
    """Sourced forward utilisation of each case's attention kernel (`costmodels.stacks`)."""
    table = np.ones((len(ATTENTION_IMPLS), len(GEN_ORDER)))
    for i, impl in enumerate(ATTENTION_IMPLS):
        for j, gen in enumerate(GEN_ORDER):
            table[i, j] = ATTENTION_UTILISATION[impl][gen] if impl in ATTENTION_UTILISATION else 1.0
    return table[attn_impl, gen_idx]


def _op_link(c: Cases, op: str, bw: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bandwidth and latency of one collective kind on a group's link: the link's figures
    scaled by what `meshplan bench` measured for that collective (1x / the link's by default)."""
    rel = np.asarray(c.get(f"{op}_bw_rel", 1.0), dtype=np.float64)
    op_lat = np.asarray(c.get(f"{op}_lat", -1.0), dtype=np.float64)
    return bw * rel, np.where(op_lat >= 0, op_lat, lat)


def evaluate(c: Cases, prof: Profile) -> dict[str, np.ndarray]:
    """Predict step-time breakdown, throughput, MFU and memory breakdown for every case."""
    return _with_schedule(_schedule_free(c, prof), np.asarray(c["schedule"]))


def evaluate_schedules(c: Cases, prof: Profile, rows: np.ndarray, schedule: np.ndarray) -> dict[str, np.ndarray]:
    """`evaluate` of case `rows[i]` under pipeline schedule `schedule[i]` (effective codes,
    `costmodels.pipeline`): the schedule-free terms are computed once per case, so a search
    trying several schedules per layout pays for its GEMM model once."""
    free = _schedule_free(c, prof)
    return _with_schedule({k: v[rows] for k, v in free.items()}, np.asarray(schedule))


def _schedule_free(c: Cases, prof: Profile) -> dict[str, np.ndarray]:
    """Every term that does not depend on the pipeline schedule, per case."""
    f64 = lambda k: np.asarray(c[k], dtype=np.float64)  # noqa: E731
    tp, pp, dp, cp, vpp = f64("tp"), f64("pp"), f64("dp"), f64("cp"), f64("vpp")

    def col(k: str, default: float | np.ndarray) -> np.ndarray:
        return f64(k) if k in c else np.broadcast_to(np.asarray(default, dtype=np.float64), tp.shape)

    ep = col("ep", 1.0)
    micro, gbs, seq = f64("micro"), f64("gbs"), f64("seq")
    h, ffn, kv, vocab, layers = f64("hidden"), f64("ffn"), f64("kv_dim"), f64("vocab"), f64("layers")
    heads, mats, act_exp = f64("heads"), f64("mlp_mats"), f64("active_experts")
    experts = f64("experts")
    recompute = np.asarray(c["recompute"])
    sharding = np.asarray(c["sharding"])
    sp = np.asarray(c["sp"], dtype=bool)
    swiglu = np.asarray(c["swiglu"], dtype=bool)
    ab = f64("act_bytes")
    hbm_bw = f64("hbm_bw")
    elem_bw = f64("elem_bw")
    peak_gemm, peak_bf16 = f64("peak_gemm"), f64("peak_bf16")
    gen_idx = np.asarray(c["gen_idx"], dtype=int)
    gen_eff = np.array([prof.gemm_eff.get(g, 0.6) for g in GEN_ORDER])[gen_idx]
    # On a CPU host gloo's collectives run on the cores that compute (no copy engines or
    # spare SMs to hide them behind), so nothing overlaps: every collective is exposed.
    on_cpu = gen_idx == GEN_ORDER.index("cpu")
    dp_overlap = np.where(on_cpu, 0.0, prof.dp_overlap)

    world = tp * pp * dp * cp
    dp_shard = f64("dp_shard") if "dp_shard" in c else np.zeros_like(tp)
    shard_n = np.where((dp_shard > 0) & (sharding > 0), dp_shard, dp) * cp  # ZeRO sharding group
    rep_n = dp * cp / shard_n  # replicas of each shard (HSDP)
    m = np.maximum(gbs / (micro * dp), 1.0)  # micro-batches per step per pipeline
    tok = micro * seq / cp  # tokens per micro-batch on one GPU's sequence shard
    # The slowest stage sets the pace: uneven splits give some stages ceil(L / (p v)) layers
    # per chunk (Megatron's uneven pipeline split).
    layers_stage = np.ceil(layers / (pp * vpp)) * vpp
    rc_frac = _recompute_fraction(c, layers_stage)
    stack = _stack_columns(c, len(tp))
    prec = np.asarray(c["precision_idx"], dtype=int) if "precision_idx" in c else np.zeros(len(tp), int)
    low_prec = f64("peak_gemm") > f64("peak_bf16") * 1.01  # FP8 / FP4 GEMMs
    pad_to = np.where(low_prec, np.where(prec == 4, PAD_ELEMENTS["fp4"], PAD_ELEMENTS["fp8"]), 1.0)
    sms = f64("sms") if "sms" in c else np.zeros_like(tp)
    # FP8 / FP4 GEMMs sustain the same share of their own peak as 16-bit ones (casts charged below)
    gemm_bytes = np.where(low_prec, np.where(prec == 4, 0.5, 1.0), ab)

    def gemm(mm, nn, kk):
        return gemm_time(mm, nn, kk, peak_gemm, gen_eff, hbm_bw, gemm_bytes, sms, pad_to)

    # ---- compute per layer per micro-batch (forward); backward runs two GEMMs per forward one
    # (Narayanan et al. 2021, Sec. 5.1): dX = dY W^T (m x k from m x n) and dW = X^T dY (k x n).
    def fwd_bwd(mm, nn, kk):
        return gemm(mm, nn, kk) + gemm(mm, kk, nn) + gemm(kk, nn, mm)

    def wgrad(mm, nn, kk):  # the weight-gradient GEMM of fwd_bwd alone
        return gemm(kk, nn, mm)

    qd = col("q_dim", h)
    qkv_n, o_k = (qd + 2 * kv) / tp, qd / tp
    t_attn_gemm_fwd = gemm(tok, qkv_n, h) + gemm(tok, h, o_k)
    t_attn_gemm = fwd_bwd(tok, qkv_n, h) + fwd_bwd(tok, h, o_k)
    # MLP of a dense layer (also the dense layers of an MoE model).
    dense_ffn = col("dense_ffn", ffn)
    t_dense_fwd = gemm(tok, (mats - 1) * dense_ffn / tp, h) + gemm(tok, h, dense_ffn / tp)
    t_dense = fwd_bwd(tok, (mats - 1) * dense_ffn / tp, h) + fwd_bwd(tok, h, dense_ffn / tp)
    moe = _moe_layer(c, prof, tok, h, ffn, mats, tp, ep, experts, act_exp, gemm, fwd_bwd, wgrad, peak_gemm,
                     gen_eff, hbm_bw, gemm_bytes, sms, pad_to, ab, elem_bw_eff(elem_bw, on_cpu, prof))
    moe_frac = col("moe_frac", 0.0)
    t_gemm_fwd = t_attn_gemm_fwd + moe_frac * moe["gemm_fwd"] + (1 - moe_frac) * t_dense_fwd
    t_gemm = t_attn_gemm + moe_frac * moe["gemm"] + (1 - moe_frac) * t_dense
    # Weight-gradient GEMMs alone: what zero-bubble schedules defer into the bubble.
    t_gemm_w = wgrad(tok, qkv_n, h) + wgrad(tok, h, o_k) + moe_frac * moe["gemm_w"] + (1 - moe_frac) * (
        wgrad(tok, (mats - 1) * dense_ffn / tp, h) + wgrad(tok, h, dense_ffn / tp))

    # Attention as the stack runs it.
    attn_impl = stack["attn_impl"].astype(int)
    math_attn = attn_impl == ATTENTION_IMPLS.index("math")
    util = _attention_utilisation(attn_impl, gen_idx)
    attn_rate = peak_bf16 * np.where(on_cpu, gen_eff, util * prof.attn_eff)
    t_flash_fwd = attention_flops_per_token_fwd(seq, h, True) * tok / tp / attn_rate
    # Unfused: QK^T and AV over the full (masked) s x s scores as batched GEMMs at the GEMM
    # rate, plus the softmax (and dropout) passes over b x heads x s x s scores in HBM.
    scores = tok * (seq / cp) * heads / tp
    score_bytes = MATH_SCORE_BYTES_FWD + np.where(stack["dropout"], MATH_DROPOUT_BYTES_FWD, 0.0)
    t_math_fwd = attention_flops_per_token_fwd(seq, h, False) * tok / tp / (peak_bf16 * gen_eff) \
        + scores * score_bytes / elem_bw_eff(elem_bw, on_cpu, prof)
    t_attn_fwd = np.where(math_attn, t_math_fwd, t_flash_fwd)
    t_attn = (1 + FLASH_BWD_OVER_FWD) * t_attn_fwd

    # Elementwise kernels (and FP8 casts) as HBM traffic, forward + backward.
    ffn_active = col("ffn_active", ffn * act_exp)  # MLP width a token's elementwise ops see
    elems = layer_ops.elementwise_elements_fwd(h, kv, ffn_active, swiglu, tp, sp, stack["fused"], stack["dropout"])
    elem_fwd_bytes = tok * elems * ab
    # (an MoE layer quantises its routed copies, k per token, at the experts' inputs and
    # output gradients, and the weights of its local experts)
    routed_extra_h = moe_frac * (act_exp - 1) * 2 * h
    fp8_bytes = np.where(low_prec, tok * (layer_ops.fp8_cast_bytes_fwd(h, kv, ffn_active, mats, tp)
                                          + 3.0 * routed_extra_h)
                         + layer_ops.fp8_weight_cast_bytes(f64("params_layer_dense") + col("params_layer_expert", 0.0) / ep, tp), 0.0)
    bw_elem = elem_bw_eff(elem_bw, on_cpu, prof)
    t_elem_fwd = elem_fwd_bytes / bw_elem
    t_elem = (1 + layer_ops.BACKWARD_OVER_FORWARD) * t_elem_fwd + fp8_bytes / bw_elem

    # Kernel floor: each launch leaves the GPU idle for a gap (accelerators; a CPU runs its
    # ops back to back and pays their dispatch instead, below).
    kern_fwd = layer_ops.kernels_per_layer_fwd(stack["fused"], tp, low_prec)
    rc_kernels = np.where(recompute == 2, rc_frac, 0.0) * kern_fwd
    kernels = kern_fwd * (1 + layer_ops.BACKWARD_OVER_FORWARD) + rc_kernels
    t_gaps = np.where(on_cpu, 0.0, kernels * prof.kernel_gap_s)

    recompute_fwd = np.where(
        recompute == 2, rc_frac * (t_gemm_fwd + t_attn_fwd + t_elem_fwd),
        np.where(recompute == 1, np.where(stack["op_level_sac"], 0.5 * t_gemm_fwd + t_attn_fwd, t_attn_fwd), 0.0),
    )
    t_layer = t_gemm + t_attn + t_elem + recompute_fwd + t_gaps
    # Shares of a layer's work in forward and in the weight-gradient step; the rest (input
    # gradients, recompute) is the input-gradient step (Qi et al. 2023, Sec. 2: F, B, W).
    work = np.maximum(t_gemm + t_attn + t_elem + recompute_fwd, 1e-30)
    fwd_share = (t_gemm_fwd + t_attn_fwd + t_elem_fwd) / work
    wgrad_share = t_gemm_w / work
    t_layer = t_layer + np.where(on_cpu, prof.layer_overhead_s, 0.0) * np.where(recompute == 2, 1 + 0.5 * rc_frac, 1.0)
    # Host time per layer per micro-batch: each kernel is one op the host dispatches
    # (autograd included); CUDA graphs replay without it. The host runs ahead of the GPU, so
    # it only costs time where it is the slower of the two (below).
    host_layer = np.where(stack["cuda_graphs"], 0.0, kernels * prof.host_op_s)

    # ---- tensor parallel collectives per layer per micro-batch
    tp_bw = f64("tp_bw") * prof.link_eff
    # Per layer: 2 forward + 2 backward; full recompute re-runs 2 (reentrant) or, stopping
    # early, 1 all-reduce / 2 all-gathers + 1 reduce-scatter (1.5 SP pairs).
    rerun = np.where(stack["recompute_early_stop"], np.where(sp, 1.5, 1.0), 2.0)
    n_tp = 4 + np.where(recompute == 2, rerun * rc_frac, 0)
    act_bytes = tok * h * ab
    # SP replaces each all-reduce by an all-gather + reduce-scatter pair (Korthikanti 2022).
    t_sp_pair = (comm.allgather_time(act_bytes, tp, *_op_link(c, "tp_allgather", tp_bw, f64("tp_lat")))
                 + comm.reduce_scatter_time(act_bytes, tp, *_op_link(c, "tp_reduce_scatter", tp_bw, f64("tp_lat"))))
    t_ar = comm.allreduce_time(act_bytes, tp, *_op_link(c, "tp_allreduce", tp_bw, f64("tp_lat")))
    t_tp_one = np.where(sp, t_sp_pair, t_ar)
    t_tp = n_tp * t_tp_one
    # Stacks that overlap TP communication (Megatron-Core / TE userbuffers) split each
    # collective into chunks pipelined with the GEMM that consumes or produces it: what shows
    # is the first chunk, or the part the layer's GEMMs are too short to cover.
    hidden_tp = np.maximum(t_tp - t_gemm, t_tp / TP_OVERLAP_CHUNKS)
    # (Megatron-Core's --tp-comm-overlap needs sequence parallelism)
    t_tp = np.where(stack["tp_comm_overlap"] & sp & ~on_cpu, hidden_tp, t_tp)
    t_tp = np.where(tp > 1, t_tp, 0.0)

    # ---- context parallel: K/V ring, fwd (cp-1) passes, bwd sends K/V and dK/dV back
    cp_bw = f64("cp_bw") * prof.link_eff
    kv_bytes = tok * 2 * kv / tp * ab
    t_cp_raw = 3 * (cp - 1) * comm.p2p_time(kv_bytes, *_op_link(c, "p2p", cp_bw, f64("cp_lat")))
    t_cp = np.where(cp > 1, np.maximum(0.0, t_cp_raw - (1 + FLASH_BWD_OVER_FWD) * t_attn_fwd), 0.0)

    # ---- the logits GEMM (+ cross entropy traffic) on the last stage
    # (the output layer runs in 16 bits even in FP8 recipes: TE keeps it out of FP8)
    t_logits = (gemm_time(tok, vocab / tp, h, peak_bf16, gen_eff, hbm_bw, ab, sms)
                + gemm_time(tok, h, vocab / tp, peak_bf16, gen_eff, hbm_bw, ab, sms)
                + gemm_time(h, vocab / tp, tok, peak_bf16, gen_eff, hbm_bw, ab, sms))
    ce_passes = np.where(tp > 1, VOCAB_PARALLEL_CE_PASSES, 1.0)
    t_logits = t_logits + 2 * ce_passes * memory.logits_bytes(tok, vocab, tp) / bw_elem

    # MoE layers' token exchange (and, for stacks that dispatch sequence shards, the expert
    # TP group's gathers of the dispatched tokens), re-run by full recompute; exposed: the
    # experts need the tokens they exchange.
    moe_comm = moe_frac * (moe["a2a"] * (1 + np.where(recompute == 2, 0.5 * rc_frac, 0.0)) + moe["tp"])
    stage_mb = layers_stage * (t_layer + t_tp + t_cp + moe_comm) + t_logits
    # Host-bound regime: when the host dispatches slower than the GPU computes, the GPU waits
    # for it (small models, small micro-batches, many ranks per host).
    # On a CPU host the host is the device: dispatch and compute take turns, so they add.
    stage_mb = np.where(on_cpu, stage_mb + layers_stage * host_layer, np.maximum(stage_mb, layers_stage * host_layer))
    compute = m * stage_mb

    # ---- pipeline: the p2p send of one micro-batch's boundary activations (the schedule's
    # bubble, critical-path hops and idle follow in `_with_schedule`)
    p2p_bytes = tok * h * ab / np.where(sp, tp, 1.0)
    pp_link = _op_link(c, "p2p", f64("pp_bw") * prof.link_eff, f64("pp_lat"))
    p2p_one = comm.p2p_time(p2p_bytes, *pp_link)

    # ---- data parallel / ZeRO
    dense_local = f64("params_layer_dense") * layers_stage / tp
    expert_local = f64("params_layer_expert") * layers_stage / (tp * ep)
    embed_all = (f64("params_embed") + f64("params_output")) / tp

    def states_terms(params_local: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Gradient sync, optimizer and model-state memory of a rank holding `params_local`."""
        replicas = dp * cp
        grad_comm_bytes = np.where(ab > 2, 4.0, 2.0)  # gradients reduced in the compute dtype
        dp_bw = np.minimum(f64("dp_bw"), np.where(cp > 1, f64("cp_bw"), np.inf)) * prof.link_eff
        dp_lat = f64("dp_lat")
        sh_bw, sh_lat = f64("shard_bw") * prof.link_eff, f64("shard_lat")
        rep_bw, rep_lat = f64("rep_bw") * prof.link_eff, f64("rep_lat")
        n_lay = np.maximum(layers_stage, 1.0)

        def per_msg(fn, nbytes, n, bw, lat, msgs):
            return msgs * fn(nbytes / msgs, n, bw, lat)

        ag_bw, ag_lat = _op_link(c, "allgather", sh_bw, sh_lat)
        rs_bw, rs_lat = _op_link(c, "reduce_scatter", sh_bw, sh_lat)

        def dp_time(params, group, shards, reps):
            """Gradient sync of `params` over `group` replicas, ZeRO-sharded over `shards` of
            them (HSDP: all-reduced across the `reps` groups of shards)."""
            grad_bytes = params * grad_comm_bytes
            # Collectives are issued per bucket (DDP / Megatron buffers) or per layer (FSDP
            # units), so the alpha term is paid per message: n_msgs x collective(bytes / n_msgs).
            n_bkt = np.maximum(1.0, np.ceil(grad_bytes / DP_BUCKET_BYTES))
            t_rep = np.where(reps > 1, per_msg(comm.allreduce_time, grad_bytes / shards, reps, rep_bw, rep_lat, n_bkt), 0.0)
            t_plain = per_msg(comm.allreduce_time, grad_bytes, group, dp_bw, dp_lat, n_bkt)
            t_sharded_step = (
                per_msg(comm.reduce_scatter_time, grad_bytes, shards, rs_bw, rs_lat, n_bkt)
                + per_msg(comm.allgather_time, params * ab, shards, ag_bw, ag_lat, n_bkt) + t_rep
            )
            t_step = np.where((sharding >= 2) | ((sharding == 1) & (reps > 1)), t_sharded_step, t_plain)
            # ZeRO-3: all-gather each layer's weights in forward and again in backward,
            # reduce-scatter its grads, every micro-batch (Rajbhandari et al. 2020, Sec. 7.2.2).
            t_z3 = m * (
                2 * per_msg(comm.allgather_time, params * ab, shards, ag_bw, ag_lat, n_lay)
                + per_msg(comm.reduce_scatter_time, grad_bytes, shards, rs_bw, rs_lat, n_lay)
            ) + t_rep
            return np.where(group > 1, np.where(sharding == 3, t_z3, t_step), 0.0)

        # Experts are replicated over dp x cp / ep ranks (expert data parallelism) and their
        # ZeRO states sharded over those (Megatron-Core's expert distributed optimizer).
        edp = np.maximum(replicas / ep, 1.0)
        t_dp = dp_time(params_local - expert_local, replicas, shard_n, rep_n) \
            + np.where(expert_local > 0, dp_time(expert_local, edp, edp, np.ones_like(edp)), 0.0)
        # Overlap window: ZeRO-3 gathers ahead of every layer (all compute); otherwise the
        # gradient reduce runs under the last micro-batch's backward and the parameter
        # all-gather of a sharded optimizer under the next step's first forward.
        window = np.where(sharding == 3, compute, stage_mb)
        window = np.where(stack["grad_overlap"], window, 0.0)
        first_bucket = t_dp / np.maximum(layers_stage * np.where(sharding == 3, 3 * m, 1), 1)
        dp_exposed = np.maximum(0.0, t_dp - dp_overlap * window) + np.where(replicas > 1, first_bucket, 0.0)
        dp_exposed = np.minimum(dp_exposed, t_dp)

        # ---- optimizer step over the local shard
        opt_shard = np.where(sharding >= 1, shard_n, 1.0)
        exp_shard = np.where(sharding >= 1, edp, 1.0)
        # Adam streams its states like any elementwise kernel (on a CPU host at the rate the bench
        # measured for out-of-place elementwise ops: its unfused per-tensor steps allocate
        # temporaries).
        t_opt = ADAM_BYTES_PER_PARAM * ((params_local - expert_local) / opt_shard + expert_local / exp_shard) / bw_elem

        # On a CPU host every collective is a meeting point of ranks that time-share the cores:
        # the first to arrive waits for the last, and gloo does its work on a compute core. A
        # fitted cost per synchronising call, charged per call each layout issues per step
        # (TP: n_tp per layer per micro-batch, x2 for SP's all-gather + reduce-scatter pairs;
        # ZeRO-3: 2 gathers + 1 reduce-scatter per layer per micro-batch; ZeRO-1/2: a gather and a
        # reduce-scatter per layer; DDP: one all-reduce per bucket; PP: a send and a receive per
        # micro-batch at each stage boundary).
        n_bkt = np.maximum(1.0, np.ceil(params_local * grad_comm_bytes / DP_BUCKET_BYTES))
        calls = np.where(tp > 1, m * layers_stage * n_tp * np.where(sp, 2.0, 1.0), 0.0)
        calls = calls + np.where(replicas > 1, np.where(
            sharding == 3, 3 * m * n_lay, np.where(sharding >= 1, 2 * n_lay, n_bkt)), 0.0)
        calls = calls + np.where(pp > 1, 2 * m, 0.0)
        calls = calls + np.where(ep > 1, m * layers_stage * moe_frac * MOE_A2A_CALLS, 0.0)
        t_sync_calls = np.where(on_cpu, calls * prof.cpu_sync_call_s, 0.0)
        mem = memory_terms(c, prof, params_local, shard_n, layers_stage, rc_frac, expert_local, exp_shard)
        return {"rest": dp_exposed + t_opt + np.where(on_cpu, prof.step_overhead_s, 0.0) + t_sync_calls,
                "dp_comm_s": t_dp, "dp_exposed_s": dp_exposed, "optimizer_s": t_opt,
                "params_local": params_local, **{k: mem[k] for k in STATE_KEYS}}, mem

    # A pipeline's first and last stage each hold one of the embedding and the output head
    # (the heavier stage sets the pace); a V placement holds both on its first rank.
    states, mem = states_terms(dense_local + expert_local + embed_all / np.where(pp > 1, 2.0, 1.0))
    states_v, _ = states_terms(dense_local + expert_local + embed_all)
    fpt = model_flops_per_token(layers, h, ffn_active, kv, mats, vocab, seq, 1.0, True, q_dim=qd)
    t_stage = stage_mb - t_logits
    return {
        # carried to `_with_schedule`
        "pp": pp, "vpp": vpp, "m": m, "layers_stage": layers_stage, "layers": layers,
        "compute": compute, "p2p_one": p2p_one, "t_logits": t_logits,
        "t_f": fwd_share * t_stage, "t_w": wgrad_share * t_stage, "t_stage": t_stage,
        **states, **{k + V_SUFFIX: v for k, v in states_v.items()},
        # Synchronous steps wait for the slowest node: with per-node jitter of relative size
        # sigma, the expected maximum over N nodes is ~ sigma sqrt(2 ln N) (Gumbel / extreme
        # value of Gaussians; the straggler effect of Dubey et al. 2024, Sec. 3.3.4).
        "jitter": prof.sync_jitter * np.sqrt(2 * np.log(np.maximum(world / np.maximum(f64("gpus_per_node"), 1.0), 1.0))),
        "tokens_gpu": gbs * seq / world, "flops_gpu": fpt / f64("peak_mfu"),
        **{k: v for k, v in mem.items() if k not in STATE_KEYS},
        # reported as they are
        "compute_s": m * layers_stage * t_layer + m * t_logits,
        "tp_comm_s": m * layers_stage * t_tp,
        "moe_comm_s": m * layers_stage * moe_comm,
        "cp_comm_s": m * layers_stage * t_cp,
        "pp_head_s": t_logits,  # the output head per micro-batch on the last stage
        # a CPU host's time-sharing: each rank's share of a core (figures above are at it)
        # and the ranks it runs at full speed at once (`costmodels.pipeline_sim`)
        "core_share": col("core_share", 1.0), "core_capacity": col("core_capacity", np.inf),
        "flops_per_token": fpt,
        "micro_batches": m,
        "experts_per_rank": experts / ep,
    }


CARRIED = ("pp", "vpp", "m", "layers_stage", "layers", "compute", "p2p_one", "t_logits", "t_f", "t_w",
           "t_stage", "rest", "jitter", "tokens_gpu", "flops_gpu")
# Terms of the rank holding the model's parameters, under the looped placement and (suffix) a V
STATE_KEYS = ("_mem_weights", "_mem_gradients", "_mem_optimizer", "_mem_buffers")
V_SUFFIX = "@v"
PLACED = ("rest", "dp_comm_s", "dp_exposed_s", "optimizer_s", "params_local", *STATE_KEYS)


def _with_schedule(free: dict[str, np.ndarray], schedule: np.ndarray) -> dict[str, np.ndarray]:
    """The schedule's terms on top of the schedule-free ones: the pipeline bubble, the p2p
    sends on the critical path, the idle a run measures, the step, and memory per rank."""
    pp, vpp, m, layers_stage = free["pp"], free["vpp"], free["m"], free["layers_stage"]
    v_shape = pipeline.first_rank_holds_last_stage(schedule) & (pp > 1)
    f = {k: v for k, v in free.items() if not k.endswith(V_SUFFIX)}
    f.update({k: np.where(v_shape, free[k + V_SUFFIX], free[k]) for k in PLACED})
    # Fill and drain run on the stages that hold layers but not the output head, so the
    # schedule's bubble (`costmodels.pipeline.bubble_time`) is priced on a rank's micro-batch
    # time without the logits, split into forward, input-gradient and weight-gradient steps.
    t_f, t_w, t_stage, t_logits = f["t_f"], f["t_w"], f["t_stage"], f["t_logits"]
    t_b = t_stage - t_f - t_w
    bubble = np.where(pp > 1, pipeline.bubble_time(schedule, pp, vpp, t_f, t_b, t_w, m), 0.0)
    t_p2p = np.where(pp > 1, pipeline.critical_p2p_hops(schedule, pp) * f["p2p_one"], 0.0)
    # What a rank idles in the pipeline per step, mean over ranks (the executor measures it):
    # the bubble, the sends on the critical path, and the pace of the slowest stage — the
    # output head on one rank, ceil-split layers on some — that the others wait for.
    layer_mb = t_stage / np.maximum(layers_stage, 1.0)
    pp_idle = np.where(pp > 1, bubble + t_p2p + m * ((layers_stage - f["layers"] / pp) * layer_mb
                                                     + t_logits * (pp - 1) / pp), 0.0)
    step = f["compute"] + bubble + t_p2p + f["rest"]
    t_sync = step * f["jitter"]
    step = step + t_sync
    tps_gpu = f["tokens_gpu"] / step
    out = {k: v for k, v in f.items() if k not in CARRIED and not k.startswith("_mem_")}
    # for simulating a run's pipeline (`executor.parallel.pp.PipelineStrategy.predicted_pipeline`)
    out["non_pipeline_s"], out["straggler_factor"], out["pp_send_s"] = f["rest"], f["jitter"], f["p2p_one"]
    out.update({
        "step_time_s": step, "pp_bubble_s": bubble, "pp_idle_s": pp_idle, "pp_p2p_s": t_p2p,
        "pp_fwd_s": t_f, "pp_bwd_input_s": t_b, "pp_bwd_weight_s": t_w, "sync_s": t_sync,
        "tokens_per_sec_per_gpu": tps_gpu, "mfu": f["flops_gpu"] * tps_gpu,
    })
    # the last rank of a V holds neither the embedding nor the head: states are affine in the
    # parameters held, so theirs are 2 x (half of both) - (both)
    last_states = {k: np.where(v_shape, 2 * free[k] - free[k + V_SUFFIX], free[k]) for k in STATE_KEYS}
    out.update(memory_totals(f, schedule, last_states))
    return out


def _moe_layer(c: Cases, prof: Profile, tok, h, ffn, mats, tp, ep, experts, k, gemm, fwd_bwd, wgrad,
               peak, eff, hbm_bw, gemm_bytes, sms, pad_to, ab, bw_elem) -> dict[str, np.ndarray]:
    """One MoE layer per micro-batch on one rank: GEMM time forward (`gemm_fwd`) and forward +
    backward (`gemm`: router, routed experts, shared experts, token permutation), the
    weight-gradient GEMMs alone (`gemm_w`), and the
    exposed token exchange (`a2a`) and expert-TP gathers (`tp`)."""
    n = np.shape(tok)
    col = lambda key, d: np.asarray(c[key], dtype=np.float64) if key in c else np.full(n, d)  # noqa: E731
    shared = col("shared_ffn", 0.0)
    imb = np.maximum(col("moe_imbalance", prof.moe_imbalance), 1.0)
    sp_dispatch = np.asarray(c.get("moe_dispatch_sp", np.zeros(n)), dtype=bool) & np.asarray(c["sp"], dtype=bool) & (tp > 1)
    # Routed experts: a rank's tok x k slots spread evenly over the E experts arrive
    # ep x tok x k / E at each of its E / ep experts (every TP rank holds a column slice of
    # each), the busiest rank `imb` times the mean: synchronous all-to-alls wait for it.
    local = experts / ep
    m_e = imb * tok * k * ep / experts
    up_n, down_k = (mats - 1) * ffn / tp, ffn / tp

    def grouped(mm, nn, kk):
        return grouped_gemm_time(local, mm, nn, kk, peak, eff * prof.grouped_gemm_eff, hbm_bw,
                                 gemm_bytes, sms, pad_to)

    routed_fwd = grouped(m_e, up_n, h) + grouped(m_e, h, down_k)
    # backward: dX = dY W^T and dW = X^T dY per expert (Narayanan et al. 2021, Sec. 5.1)
    routed = routed_fwd + grouped(m_e, h, up_n) + grouped(h, up_n, m_e) + grouped(m_e, down_k, h) + grouped(down_k, h, m_e)
    # the router runs on the tokens a rank routes (its sequence shard under SP dispatch)
    tok_route = np.where(sp_dispatch, tok / tp, tok)
    router_fwd = gemm(tok_route, experts, h)
    router = fwd_bwd(tok_route, experts, h)
    has_shared = shared > 0
    sh_up, sh_down = (mats - 1) * np.maximum(shared, 1.0) / tp, np.maximum(shared, 1.0) / tp
    shared_fwd = np.where(has_shared, gemm(tok, sh_up, h) + gemm(tok, h, sh_down), 0.0)
    shared_t = np.where(has_shared, fwd_bwd(tok, sh_up, h) + fwd_bwd(tok, h, sh_down), 0.0)
    # Permutation: gather each token's k copies in expert order and scatter-add them back
    # weighted, forward (read h, write k h; read k h, write h) and the same backward.
    perm_fwd = (2 + 2 * k) * tok_route * h * ab / bw_elem
    gemm_fwd = routed_fwd + router_fwd + shared_fwd + perm_fwd
    gemm_w = grouped(h, up_n, m_e) + grouped(down_k, h, m_e) + wgrad(tok_route, experts, h) + np.where(
        has_shared, wgrad(tok, sh_up, h) + wgrad(tok, h, sh_down), 0.0)
    total = routed + router + shared_t + 2 * perm_fwd
    # Dispatch + combine forward and their adjoints backward: 4 all-to-alls of the routed
    # copies over the ep group; each rank sends (n - 1) / n of its buffer, to its domain's
    # members over the scale-up fabric and to the rest through its own NIC, at once.
    payload = tok_route * k * h * ab
    n_ep = np.maximum(ep, 1.0)
    near = col("ep_local", 1.0)
    up_bw = col("ep_up_bw", np.inf) * 1e9 * prof.link_eff
    out_bw = col("ep_out_bw", np.inf) * 1e9 * prof.link_eff
    one = (n_ep - 1) * col("ep_lat", 0.0) + np.maximum((near - 1) / n_ep * payload / up_bw,
                                                       (n_ep - near) / n_ep * payload / out_bw)
    a2a = np.where(ep > 1, 4 * imb * one, 0.0)
    # SP dispatch: the expert-TP group gathers the dispatched copies before the experts and
    # reduce-scatters their outputs, forward and backward.
    tp_bw = col("tp_bw", np.inf) * prof.link_eff
    gathered = imb * tok * k * h * ab
    moe_tp = np.where(sp_dispatch, 2 * (comm.allgather_time(gathered, tp, tp_bw, col("tp_lat", 0.0))
                                        + comm.reduce_scatter_time(gathered, tp, tp_bw, col("tp_lat", 0.0))), 0.0)
    return {"gemm_fwd": gemm_fwd, "gemm": total, "gemm_w": gemm_w, "a2a": a2a, "tp": moe_tp}


def elem_bw_eff(elem_bw: np.ndarray, on_cpu: np.ndarray, prof: Profile) -> np.ndarray:
    """Bandwidth streaming elementwise kernels achieve: a fitted share of HBM bandwidth on
    accelerators; on a CPU host `meshplan bench` measured the achieved rate itself."""
    return elem_bw * np.where(on_cpu, 1.0, prof.elementwise_eff)


def _stack_columns(c: Cases, n: int) -> dict[str, np.ndarray]:
    """The stack's columns (`costmodels.stacks.stack_columns`), the default stack's where a
    case table has none."""
    from costmodels.stacks import DEFAULT_STACK, stack_columns

    out = {}
    for k, v in stack_columns(DEFAULT_STACK).items():
        col = np.asarray(c[k]) if k in c else np.full(n, v)
        out[k] = col.astype(bool) if isinstance(v, bool) else col.astype(np.float64)
    return out


def _recompute_fraction(c: Cases, layers_stage: np.ndarray) -> np.ndarray:
    """Share of a stage's layers that full recompute applies to (the first
    `recompute_layers` of each rank, Megatron's block method); 0 in the column means all."""
    rl = np.asarray(c["recompute_layers"], dtype=np.float64) if "recompute_layers" in c else np.zeros_like(layers_stage)
    return np.where(rl > 0, np.minimum(rl / layers_stage, 1.0), 1.0)


def memory_terms(
    c: Cases, prof: Profile, params_local: np.ndarray, shard_n: np.ndarray,
    layers_stage: np.ndarray, rc_frac: np.ndarray, expert_local: np.ndarray | float = 0.0,
    expert_shard: np.ndarray | float = 1.0,
) -> dict[str, np.ndarray]:
    """The schedule-free memory terms per GPU (MoE experts' states sharded over their own
    replicas, `expert_shard`): model states, a layer's activations, the embedding output,
    the logits and buffers; `memory_totals` adds the schedule's in-flight micro-batches."""
    f64 = lambda k: np.asarray(c[k], dtype=np.float64)  # noqa: E731
    tp, pp, dp, cp = f64("tp"), f64("pp"), f64("dp"), f64("cp")
    micro, seq, h = f64("micro"), f64("seq"), f64("hidden")
    ab = f64("act_bytes")
    fp32 = ab > 2
    sharding = np.asarray(c["sharding"])
    sp = np.asarray(c["sp"], dtype=bool)
    recompute = np.asarray(c["recompute"])
    # Model states as the stack holds them (`costmodels.stacks`): e.g. Megatron's distributed
    # optimizer 2 B bf16 weights + 4 B fp32 main grads + 12 B (fp32 master, m, v) sharded;
    # FSDP2 / FSDP1 fp32 sharded params (4 B) + fp32 grads + m, v (8 B). Pure fp32: 4 + 4 + 8.
    stack = _stack_columns(c, len(tp))
    wb = np.where(fp32, 4.0, stack["state_weight_bytes"])
    gbytes = np.where(fp32, 4.0, stack["state_grad_bytes"])
    ob = np.where(fp32, 8.0, stack["state_optim_bytes"])
    dense_states = memory.model_state_bytes(params_local - expert_local, shard_n, sharding, wb, gbytes, ob)
    expert_states = memory.model_state_bytes(expert_local, expert_shard, sharding, wb, gbytes, ob)
    states = {k: dense_states[k] + expert_states[k] for k in dense_states}
    states["gradients"] = states["gradients"] + np.where(fp32, 0.0, stack["grad_copy_bytes"]) * params_local / np.where(sharding >= 2, shard_n, 1.0)
    unsharded = stack["fsdp_unsharded_with_pp"] & (sharding == 3) & (pp > 1)
    states["weights"] = states["weights"] + np.where(unsharded, 2.0 * params_local, 0.0)
    states["gradients"] = states["gradients"] + np.where(unsharded, 4.0 * params_local, 0.0)
    ffn_active = f64("ffn_active") if "ffn_active" in c else f64("ffn") * f64("active_experts")
    act_args = (seq, micro, h, f64("heads"), f64("kv_dim"), ffn_active,
                np.asarray(c["swiglu"], dtype=bool), tp, cp, sp)
    flash = stack["attn_impl"] != ATTENTION_IMPLS.index("math")  # math attention stores its scores
    act_layer = memory.layer_activation_bytes(*act_args, recompute, flash=flash, act_bytes=ab,
                                              dropout=stack["dropout"])
    act_none = memory.layer_activation_bytes(*act_args, 0, flash=flash, act_bytes=ab, dropout=stack["dropout"])
    # Eager stacks also keep what a fused kernel recomputes or never writes: both norms'
    # outputs (the next matmul's saved input) and the activation's output (SiLU / GELU).
    eager_extra = memory.eager_extra_activation_bytes(seq, micro, h, ffn_active, tp, cp, sp, ab)
    eager = ~stack["fused"]
    act_none = act_none + np.where(eager, eager_extra, 0.0)
    act_layer = act_layer + np.where(eager & (recompute == 0), eager_extra, 0.0)
    sac = memory.op_level_sac_activation_bytes(*act_args[:9], f64("mlp_mats"), act_bytes=ab)
    act_layer = np.where((recompute == 1) & stack["op_level_sac"], sac, act_layer)
    # Partial full recompute: recomputed layers keep their input only, the rest everything.
    act_layer = np.where(recompute == 2, rc_frac * act_layer + (1 - rc_frac) * act_none, act_layer)
    tok = micro * seq / cp
    layer_params = params_local / np.maximum(layers_stage, 1)
    gather = np.where(sharding == 3, memory.zero3_gather_bytes(layer_params, 2.0), 0.0)
    buffers = gather + np.where((dp * cp) > 1, 2 * 25e6 * 2, 0.0)  # two 25 MB DDP/NCCL buckets, bf16
    return {
        "_mem_weights": states["weights"], "_mem_gradients": states["gradients"],
        "_mem_optimizer": states["optimizer"], "_mem_buffers": buffers,
        "_mem_layer_act": act_layer * layers_stage,
        # what full recompute rebuilds for one micro-batch through the rank's layers
        "_mem_rebuilt": np.where(recompute == 2, (act_none - act_layer) * layers_stage, 0.0),
        # Full recompute still materialises one layer's full activations during its backward.
        "_mem_working": np.where(recompute == 2, act_none, 0.0),
        "_mem_embed": memory.embedding_output_bytes(tok, h, tp, sp),
        "_mem_logits": memory.logits_bytes(tok, f64("vocab"), tp, stack["ce_bytes_per_logit"]),
        "_mem_factor": np.full(len(tp), prof.memory_factor),
        "_mem_constant": np.full(len(tp), prof.memory_constant_gb * 1e9),
        "hbm_gb": f64("hbm_bytes") / 1e9,
    }


def memory_totals(terms: dict[str, np.ndarray], schedule: np.ndarray,
                  last_states: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Peak bytes per GPU on the busier of the first and the last pipeline rank under the
    schedule's in-flight micro-batches (`costmodels.pipeline`); a V placement holds the
    embedding and the output head both on the first rank. `last_states`: the last rank's
    model-state terms where they differ from `terms`' (the heavier rank's)."""
    t = terms
    pp, vpp, m = t["pp"], t["vpp"], t["m"]
    logits, per_mb = t["_mem_logits"], t["_mem_layer_act"]
    v_shape = pipeline.first_rank_holds_last_stage(schedule) & (pp > 1)
    first = per_mb * pipeline.inflight_microbatches(schedule, pp, vpp, m, "first") \
        + t["_mem_embed"] + np.where(v_shape | (pp == 1), logits, 0.0)
    last = per_mb * pipeline.inflight_microbatches(schedule, pp, vpp, m, "last") + np.where(v_shape, 0.0, logits)
    # Zero-bubble schedules under full recompute: a micro-batch between its input- and its
    # weight-gradient step keeps what the recompute rebuilt until the weight step runs.
    rebuilt = t["_mem_rebuilt"]
    first = first + rebuilt * pipeline.pending_weight_grads(schedule, pp, vpp, m, "first")
    last = last + rebuilt * pipeline.pending_weight_grads(schedule, pp, vpp, m, "last")
    first_act = first + t["_mem_working"]
    last_act = np.where(pp > 1, last + t["_mem_working"], first_act)
    keys = ("_mem_weights", "_mem_gradients", "_mem_optimizer", "_mem_buffers")
    ls = last_states or t

    def rank_gb(parts: dict[str, np.ndarray], act: np.ndarray) -> np.ndarray:
        return ((sum(parts[k] for k in keys) + act) * t["_mem_factor"] + t["_mem_constant"]) / 1e9

    first_gb, last_gb = rank_gb(t, first_act), rank_gb(ls, last_act)
    # the breakdown is the busier rank's
    on_first = first_gb >= last_gb
    part = {k: np.where(on_first, t[k], ls[k]) for k in keys}
    activations = np.where(on_first, first_act, last_act)
    tensors = sum(part[k] for k in keys) + activations
    total = np.maximum(first_gb, last_gb) * 1e9
    return {
        "mem_weights_gb": part["_mem_weights"] / 1e9,
        "mem_gradients_gb": part["_mem_gradients"] / 1e9,
        "mem_optimizer_gb": part["_mem_optimizer"] / 1e9,
        "mem_activations_gb": activations / 1e9,
        "mem_buffers_gb": part["_mem_buffers"] / 1e9,
        "mem_overhead_gb": (total - tensors) / 1e9,
        "peak_memory_gb": total / 1e9,
        "mem_first_stage_gb": first_gb,
        "mem_last_stage_gb": last_gb,
    }
