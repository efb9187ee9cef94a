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

from costmodels import pipeline
from costmodels.cases import Cases
from costmodels.flops import model_flops_per_token
from costmodels.profile import Profile
from costmodels.step_case import StepCase
from costmodels.step_dp import STATE_KEYS, states_terms
from costmodels.step_layer import cp_comm, layer_time, logits, pp_send, tp_comm
from costmodels.step_memory import memory_totals


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
    """Every term that does not depend on the pipeline schedule, per case: the sum of the
    named terms of `costmodels.step_layer` (compute, TP, CP, MoE, the head, the pipeline
    send) and `costmodels.step_dp` (DP / ZeRO, optimizer, CPU synchronisation)."""
    x = StepCase(c, prof)
    m, layers_stage, pp, on_cpu = x.m, x.layers_stage, x.pp, x.on_cpu
    lt = layer_time(x)
    t_layer, moe = lt["layer"], lt["moe"]
    t_tp, n_tp = tp_comm(x, lt["gemm"])
    t_cp = cp_comm(x, lt["attn_fwd"])
    t_logits = logits(x)
    # MoE layers' token exchange (and, for stacks that dispatch sequence shards, the expert
    # TP group's gathers of the dispatched tokens), re-run by full recompute; exposed: the
    # experts need the tokens they exchange.
    moe_comm = x.moe_frac * (moe["a2a"] * (1 + np.where(x.recompute == 2, 0.5 * x.rc_frac, 0.0)) + moe["tp"])
    stage_mb = layers_stage * (t_layer + t_tp + t_cp + moe_comm) + t_logits
    # Host-bound regime: when the host dispatches slower than the GPU computes, the GPU waits
    # for it (small models, small micro-batches, many ranks per host).
    # On a CPU host the host is the device: dispatch and compute take turns, so they add.
    host = layers_stage * lt["host"]
    stage_mb = np.where(on_cpu, stage_mb + host, np.maximum(stage_mb, host))
    compute = m * stage_mb

    dense_local = x.f64("params_layer_dense") * layers_stage / x.tp
    expert_local = x.f64("params_layer_expert") * layers_stage / (x.tp * x.ep)
    embed_all = (x.f64("params_embed") + x.f64("params_output")) / x.tp
    # A pipeline's first and last stage each hold one of the embedding and the output head
    # (the heavier stage sets the pace); tied embeddings put a copy on each (Shoeybi et al.
    # 2019, Sec. 3; the all-reduce of the two copies' gradients is not priced); a V
    # placement holds both (one tied copy) on its first rank.
    end_stage = x.f64("params_embed") / x.tp
    held = dense_local + expert_local
    states, mem = states_terms(x, held + np.where(pp > 1, end_stage, embed_all), expert_local, compute,
                               stage_mb, n_tp)
    states_v, _ = states_terms(x, held + embed_all, expert_local, compute, stage_mb, n_tp)
    # the last rank of a V holds two middle stages: neither the embedding nor the head
    states_mid, _ = states_terms(x, held, expert_local, compute, stage_mb, n_tp)
    fpt = model_flops_per_token(x.layers, x.h, x.ffn_active, x.kv, x.mats, x.vocab, x.seq, 1.0, True,
                                q_dim=x.q_dim)
    t_stage = stage_mb - t_logits
    nodes = x.world / np.maximum(x.f64("gpus_per_node"), 1.0)
    return {
        # carried to `_with_schedule`
        "pp": pp, "vpp": x.vpp, "m": m, "layers_stage": layers_stage, "layers": x.layers,
        "compute": compute, "p2p_one": pp_send(x), "t_logits": t_logits,
        "t_f": lt["fwd_share"] * t_stage, "t_w": lt["wgrad_share"] * t_stage, "t_stage": t_stage,
        **states, **{k + V_SUFFIX: v for k, v in states_v.items()},
        **{k + MID_SUFFIX: states_mid[k] for k in STATE_KEYS},
        # Synchronous steps wait for the slowest node: with per-node jitter of relative size
        # sigma, the expected maximum over N nodes is ~ sigma sqrt(2 ln N) (Gumbel / extreme
        # value of Gaussians; the straggler effect of Dubey et al. 2024, Sec. 3.3.4).
        "jitter": prof.sync_jitter * np.sqrt(2 * np.log(np.maximum(nodes, 1.0))),
        "tokens_gpu": x.gbs * x.seq / x.world, "flops_gpu": fpt / x.f64("peak_mfu"),
        **{k: v for k, v in mem.items() if k not in STATE_KEYS},
        # reported as they are
        "compute_s": m * layers_stage * t_layer + m * t_logits,
        "tp_comm_s": m * layers_stage * t_tp,
        "moe_comm_s": m * layers_stage * moe_comm,
        "cp_comm_s": m * layers_stage * t_cp,
        "pp_head_s": t_logits,  # the output head per micro-batch on the last stage
        # a CPU host's time-sharing: each rank's share of a core (figures above are at it)
        # and the ranks it runs at full speed at once (`costmodels.pipeline_sim`)
        "core_share": x.col("core_share", 1.0), "core_capacity": x.col("core_capacity", np.inf),
        "flops_per_token": fpt,
        "micro_batches": m,
        "experts_per_rank": x.experts / x.ep,
    }


CARRIED = ("pp", "vpp", "m", "layers_stage", "layers", "compute", "p2p_one", "t_logits", "t_f", "t_w",
           "t_stage", "rest", "jitter", "tokens_gpu", "flops_gpu")
# Terms of the rank holding the model's parameters, under the looped placement and (suffix) a V
V_SUFFIX = "@v"
MID_SUFFIX = "@mid"  # model states of a V's last rank
PLACED = ("rest", "dp_comm_s", "dp_exposed_s", "optimizer_s", "params_local", *STATE_KEYS)


def _with_schedule(free: dict[str, np.ndarray], schedule: np.ndarray) -> dict[str, np.ndarray]:
    """The schedule's terms on top of the schedule-free ones: the pipeline bubble, the p2p
    sends on the critical path, the idle a run measures, the step, and memory per rank."""
    pp, vpp, m, layers_stage = free["pp"], free["vpp"], free["m"], free["layers_stage"]
    v_shape = pipeline.first_rank_holds_last_stage(schedule) & (pp > 1)
    f = {k: v for k, v in free.items() if not k.endswith((V_SUFFIX, MID_SUFFIX))}
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
    last_states = {k: np.where(v_shape, free[k + MID_SUFFIX], free[k]) for k in STATE_KEYS}
    out.update(memory_totals(f, schedule, last_states))
    return out

