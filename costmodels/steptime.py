"""Step time, throughput, MFU and peak memory per GPU for a table of cases.

Physics first, few free parameters (`costmodels.profile.Profile`):
  compute     each layer GEMM on a roofline: 2mnk / (peak x gemm_eff) + bytes / HBM bandwidth
              (Williams et al. 2009), for forward and the two backward GEMMs; FlashAttention
              forward + 2.5x forward backward (Dao 2023, Sec. 3.1); elementwise kernels as HBM
              traffic proportional to the layer's activation bytes; a per-layer launch cost.
  TP          2 all-reduces forward, 2 backward per layer (Shoeybi et al. 2019, Sec. 3;
              with SP an all-gather + reduce-scatter pair of the same volume, Korthikanti 2022).
  CP          K/V ring passes overlapped with attention (Liu et al. 2023, Ring Attention).
  PP          bubble (p - 1) / (v m) of the ideal (Narayanan et al. 2021, Sec. 2.2) over the
              stages without the output head, plus the p2p sends on the critical path.
  DP / ZeRO   gradient all-reduce or reduce-scatter + all-gather once per step; ZeRO-3 gathers
              parameters forward and backward every micro-batch (Rajbhandari et al. 2020);
              overlapped with backward (or all compute for ZeRO-3) to a fitted degree.
  optimizer   Adam reads and writes ~36 bytes per local parameter (fp32 master, m, v, grad).
"""

from __future__ import annotations

import numpy as np

from costmodels import comm, memory, pipeline
from costmodels.cases import GEN_ORDER, Cases
from costmodels.flops import attention_flops_per_token_fwd, model_flops_per_token
from costmodels.profile import Profile

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


def _gemm_time(m, n, k, peak, eff, hbm_bw, elem_bytes, bytes_factor):
    """Roofline time of one GEMM (m x k) @ (k x n)."""
    flops = 2.0 * m * n * k
    traffic = elem_bytes * (m * k + k * n + m * n)
    return flops / (peak * eff) + bytes_factor * traffic / hbm_bw


def _op_link(c: Cases, op: str, bw: np.ndarray, lat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bandwidth and latency of one collective kind on a group's link: the link's figures
    scaled by what `meshplan bench` measured for that collective (1x / the link's by default)."""
    rel = np.asarray(c.get(f"{op}_bw_rel", 1.0), dtype=np.float64)
    op_lat = np.asarray(c.get(f"{op}_lat", -1.0), dtype=np.float64)
    return bw * rel, np.where(op_lat >= 0, op_lat, lat)


def evaluate(c: Cases, prof: Profile) -> dict[str, np.ndarray]:
    """Predict step-time breakdown, throughput, MFU and memory breakdown for every case."""
    f64 = lambda k: np.asarray(c[k], dtype=np.float64)  # noqa: E731
    tp, pp, dp, cp, vpp = f64("tp"), f64("pp"), f64("dp"), f64("cp"), f64("vpp")
    ep = f64("ep") if "ep" in c else np.ones_like(tp)
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
    tp_overlap = np.where(on_cpu, 0.0, prof.tp_overlap)
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
    gb = prof.gemm_bytes_factor

    # ---- compute per layer per micro-batch (forward), then x3 for fwd + bwd GEMMs
    t_qkv = _gemm_time(tok, (h + 2 * kv) / tp, h, peak_gemm, gen_eff, hbm_bw, ab, gb)
    t_o = _gemm_time(tok, h, h / tp, peak_gemm, gen_eff, hbm_bw, ab, gb)
    # MoE: each token visits top-k experts of `ffn` width (Fedus et al. 2022): k x the FLOPs.
    t_up = _gemm_time(tok * act_exp, (mats - 1) * ffn / tp, h, peak_gemm, gen_eff, hbm_bw, ab, gb)
    t_down = _gemm_time(tok * act_exp, h, ffn / tp, peak_gemm, gen_eff, hbm_bw, ab, gb)
    t_gemm_fwd = t_qkv + t_o + t_up + t_down
    attn_flops_fwd = attention_flops_per_token_fwd(seq, h, True) * tok / tp
    t_attn_fwd = attn_flops_fwd / (peak_bf16 * gen_eff * prof.attn_eff)
    act_none = memory.layer_activation_bytes(
        seq, micro, h, heads, kv, ffn * act_exp, swiglu, tp, cp, sp, 0, flash=True, act_bytes=ab
    )
    t_elem = prof.elementwise_factor * act_none / elem_bw  # forward + backward traffic
    recompute_fwd = np.where(
        recompute == 2, rc_frac * (t_gemm_fwd + t_attn_fwd + t_elem / 3),
        np.where(recompute == 1, t_attn_fwd, 0.0),
    )
    t_layer = 3 * t_gemm_fwd + (1 + FLASH_BWD_OVER_FWD) * t_attn_fwd + t_elem + recompute_fwd
    t_layer = t_layer + prof.layer_overhead_s * np.where(recompute == 2, 1 + 0.5 * rc_frac, 1.0)
    t_layer = t_layer + np.where(on_cpu & (tp > 1), prof.tp_layer_overhead_s, 0.0)

    # ---- tensor parallel collectives per layer per micro-batch
    tp_bw = f64("tp_bw") * prof.link_eff
    n_tp = 4 + np.where(recompute == 2, 2 * rc_frac, 0)
    act_bytes = tok * h * ab
    # SP replaces each all-reduce by an all-gather + reduce-scatter pair (Korthikanti 2022).
    t_sp_pair = (comm.allgather_time(act_bytes, tp, *_op_link(c, "tp_allgather", tp_bw, f64("tp_lat")))
                 + comm.reduce_scatter_time(act_bytes, tp, *_op_link(c, "tp_reduce_scatter", tp_bw, f64("tp_lat"))))
    t_ar = comm.allreduce_time(act_bytes, tp, *_op_link(c, "tp_allreduce", tp_bw, f64("tp_lat")))
    t_tp_one = np.where(sp, t_sp_pair, t_ar)
    t_tp = n_tp * t_tp_one * (1 - tp_overlap)
    t_tp = np.where(tp > 1, t_tp, 0.0)

    # ---- context parallel: K/V ring, fwd (cp-1) passes, bwd sends K/V and dK/dV back
    cp_bw = f64("cp_bw") * prof.link_eff
    kv_bytes = tok * 2 * kv / tp * ab
    t_cp_raw = 3 * (cp - 1) * comm.p2p_time(kv_bytes, *_op_link(c, "p2p", cp_bw, f64("cp_lat")))
    t_cp = np.where(cp > 1, np.maximum(0.0, t_cp_raw - (1 + FLASH_BWD_OVER_FWD) * t_attn_fwd), 0.0)

    # ---- the logits GEMM (+ cross entropy traffic) on the last stage
    t_logits = 3 * _gemm_time(tok, vocab / tp, h, peak_gemm, gen_eff, hbm_bw, ab, gb)
    ce_passes = np.where(tp > 1, VOCAB_PARALLEL_CE_PASSES, 1.0)
    t_logits = t_logits + 2 * ce_passes * memory.logits_bytes(tok, vocab, tp) / elem_bw

    stage_mb = layers_stage * (t_layer + t_tp + t_cp) + t_logits
    compute = m * stage_mb

    # ---- pipeline bubble and p2p on the critical path
    # The critical path of a synchronous pipeline is sum_i t_i + (m - 1) max_i t_i over stage
    # times t_i: fill and drain run on the other stages, which hold layers but not the output
    # head, so the bubble is (p - 1) / (v m) of the ideal *without* the logits.
    bubble = np.where(pp > 1, pipeline.bubble_over_ideal(pp, m, vpp) * (m * (stage_mb - t_logits)), 0.0)
    p2p_bytes = tok * h * ab / np.where(sp, tp, 1.0)
    pp_link = _op_link(c, "p2p", f64("pp_bw") * prof.link_eff, f64("pp_lat"))
    t_p2p = np.where(pp > 1, 2 * (pp - 1) * comm.p2p_time(p2p_bytes, *pp_link), 0.0)

    # ---- data parallel / ZeRO
    dense_local = f64("params_layer_dense") * layers_stage / tp
    expert_local = f64("params_layer_expert") * layers_stage / (tp * ep)
    embed_local = (f64("params_embed") + f64("params_output")) / tp / np.where(pp > 1, 2.0, 1.0)
    params_local = dense_local + expert_local + embed_local  # the heavier of first/last stage
    replicas = dp * cp
    grad_comm_bytes = np.where(ab > 2, 4.0, 2.0)  # gradients reduced in the compute dtype
    dp_bw = np.minimum(f64("dp_bw"), np.where(cp > 1, f64("cp_bw"), np.inf)) * prof.link_eff
    dp_lat = f64("dp_lat")
    sh_bw, sh_lat = f64("shard_bw") * prof.link_eff, f64("shard_lat")
    rep_bw, rep_lat = f64("rep_bw") * prof.link_eff, f64("rep_lat")
    grad_bytes = params_local * grad_comm_bytes
    # Collectives are issued per bucket (DDP / Megatron buffers) or per layer (FSDP units),
    # so the alpha term is paid per message: time = n_msgs x collective(bytes / n_msgs).
    n_bkt = np.maximum(1.0, np.ceil(grad_bytes / DP_BUCKET_BYTES))
    n_lay = np.maximum(layers_stage, 1.0)

    def per_msg(fn, nbytes, n, bw, lat, msgs):
        return msgs * fn(nbytes / msgs, n, bw, lat)

    # HSDP: the shard of gradients is all-reduced across replicas once per step.
    t_rep = np.where(rep_n > 1, per_msg(comm.allreduce_time, grad_bytes / shard_n, rep_n, rep_bw, rep_lat, n_bkt), 0.0)
    t_plain = per_msg(comm.allreduce_time, grad_bytes, replicas, dp_bw, dp_lat, n_bkt)
    ag_bw, ag_lat = _op_link(c, "allgather", sh_bw, sh_lat)
    rs_bw, rs_lat = _op_link(c, "reduce_scatter", sh_bw, sh_lat)
    t_sharded_step = (
        per_msg(comm.reduce_scatter_time, grad_bytes, shard_n, rs_bw, rs_lat, n_bkt)
        + per_msg(comm.allgather_time, params_local * ab, shard_n, ag_bw, ag_lat, n_bkt) + t_rep
    )
    t_dp_step = np.where((sharding >= 2) | ((sharding == 1) & (rep_n > 1)), t_sharded_step, t_plain)
    # ZeRO-3: all-gather each layer's weights in forward and again in backward, reduce-scatter
    # its grads, every micro-batch (Rajbhandari et al. 2020, Sec. 7.2.2: 1.5x DP volume).
    t_z3 = m * (
        2 * per_msg(comm.allgather_time, params_local * ab, shard_n, ag_bw, ag_lat, n_lay)
        + per_msg(comm.reduce_scatter_time, grad_bytes, shard_n, rs_bw, rs_lat, n_lay)
    ) + t_rep
    t_dp = np.where(replicas > 1, np.where(sharding == 3, t_z3, t_dp_step), 0.0)
    window = np.where(sharding == 3, compute, (2.0 / 3.0) * stage_mb)
    first_bucket = t_dp / np.maximum(layers_stage * np.where(sharding == 3, 3 * m, 1), 1)
    dp_exposed = np.maximum(0.0, t_dp - dp_overlap * window) + np.where(replicas > 1, first_bucket, 0.0)
    dp_exposed = np.minimum(dp_exposed, t_dp)

    # ---- optimizer step over the local shard
    opt_shard = np.where(sharding >= 1, shard_n, 1.0)
    t_opt = ADAM_BYTES_PER_PARAM * params_local / opt_shard / hbm_bw

    step = compute + bubble + t_p2p + dp_exposed + t_opt + prof.step_overhead_s
    # Synchronous steps wait for the slowest node: with per-node jitter of relative size
    # sigma, the expected maximum over N nodes is ~ sigma sqrt(2 ln N) (Gumbel / extreme
    # value of Gaussians; the straggler effect of Dubey et al. 2024, Sec. 3.3.4).
    nodes = np.maximum(world / np.maximum(f64("gpus_per_node"), 1.0), 1.0)
    t_sync = step * prof.sync_jitter * np.sqrt(2 * np.log(nodes))
    step = step + t_sync
    tokens_step = gbs * seq
    tps_gpu = tokens_step / step / world

    fpt = model_flops_per_token(layers, h, ffn, kv, mats, vocab, seq, act_exp, True)
    mfu = fpt * tps_gpu / f64("peak_mfu")

    mem = memory_breakdown(c, prof, params_local, m, shard_n, layers_stage, rc_frac)
    out = {
        "step_time_s": step,
        "compute_s": m * layers_stage * t_layer + m * t_logits,
        "tp_comm_s": m * layers_stage * t_tp,
        "cp_comm_s": m * layers_stage * t_cp,
        "pp_bubble_s": bubble,
        "pp_p2p_s": t_p2p,
        "dp_comm_s": t_dp,
        "dp_exposed_s": dp_exposed,
        "optimizer_s": t_opt,
        "sync_s": t_sync,
        "tokens_per_sec_per_gpu": tps_gpu,
        "mfu": mfu,
        "flops_per_token": fpt,
        "micro_batches": m,
        "params_local": params_local,
        "experts_per_rank": experts / ep,
    }
    out.update(mem)
    return out


def _recompute_fraction(c: Cases, layers_stage: np.ndarray) -> np.ndarray:
    """Share of a stage's layers that full recompute applies to (Megatron's uniform
    --recompute-num-layers); 0 in the column means all."""
    rl = np.asarray(c["recompute_layers"], dtype=np.float64) if "recompute_layers" in c else np.zeros_like(layers_stage)
    return np.where(rl > 0, np.minimum(rl / layers_stage, 1.0), 1.0)


def memory_breakdown(
    c: Cases, prof: Profile, params_local: np.ndarray, m: np.ndarray, shard_n: np.ndarray,
    layers_stage: np.ndarray, rc_frac: np.ndarray,
) -> dict[str, np.ndarray]:
    """Peak bytes per GPU on the busier of the first and last pipeline stage."""
    f64 = lambda k: np.asarray(c[k], dtype=np.float64)  # noqa: E731
    tp, pp, dp, cp, vpp = f64("tp"), f64("pp"), f64("dp"), f64("cp"), f64("vpp")
    micro, seq, h = f64("micro"), f64("seq"), f64("hidden")
    ab = f64("act_bytes")
    fp32 = ab > 2
    sharding = np.asarray(c["sharding"])
    sp = np.asarray(c["sp"], dtype=bool)
    recompute = np.asarray(c["recompute"])
    # Mixed precision: 16-bit weights, fp32 main gradients (Megatron's main_grad, FSDP2's
    # fp32 reduce), fp32 master + Adam m, v = 12 B; pure fp32: 4 + 4 + 8.
    wb = np.where(fp32, 4.0, 2.0)
    gbytes = 4.0
    ob = np.where(fp32, 8.0, 12.0)
    states = memory.model_state_bytes(params_local, shard_n, sharding, wb, gbytes, ob)
    act_args = (seq, micro, h, f64("heads"), f64("kv_dim"), f64("ffn") * f64("active_experts"),
                np.asarray(c["swiglu"], dtype=bool), tp, cp, sp)
    act_layer = memory.layer_activation_bytes(*act_args, recompute, flash=True, act_bytes=ab)
    act_none = memory.layer_activation_bytes(*act_args, 0, flash=True, act_bytes=ab)
    # Partial full recompute: recomputed layers keep their input only, the rest everything.
    act_layer = np.where(recompute == 2, rc_frac * act_layer + (1 - rc_frac) * act_none, act_layer)
    inflight = pipeline.activation_multiplier(pp, vpp, m, np.asarray(c["schedule"]))
    tok = micro * seq / cp
    first = act_layer * layers_stage * inflight + memory.embedding_output_bytes(tok, h, tp, sp)
    last = act_layer * layers_stage + memory.logits_bytes(tok, f64("vocab"), tp)
    # Full recompute still materialises one layer's full activations during its backward.
    working = np.where(recompute == 2, act_none, 0.0)
    activations = np.maximum(first, np.where(pp > 1, last, first + memory.logits_bytes(tok, f64("vocab"), tp))) + working
    layer_params = params_local / np.maximum(layers_stage, 1)
    gather = np.where(sharding == 3, memory.zero3_gather_bytes(layer_params, 2.0), 0.0)
    buffers = gather + np.where((dp * cp) > 1, 2 * 25e6 * 2, 0.0)  # two 25 MB DDP/NCCL buckets, bf16
    tensors = states["weights"] + states["gradients"] + states["optimizer"] + activations + buffers
    total = tensors * prof.memory_factor + prof.memory_constant_gb * 1e9
    return {
        "mem_weights_gb": states["weights"] / 1e9,
        "mem_gradients_gb": states["gradients"] / 1e9,
        "mem_optimizer_gb": states["optimizer"] / 1e9,
        "mem_activations_gb": activations / 1e9,
        "mem_buffers_gb": buffers / 1e9,
        "mem_overhead_gb": (total - tensors) / 1e9,
        "peak_memory_gb": total / 1e9,
        "hbm_gb": f64("hbm_bytes") / 1e9,
    }
