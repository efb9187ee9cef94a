"""Once-per-step terms of a rank holding `params_local` parameters: data-parallel gradient
sync (DDP all-reduce, ZeRO reduce-scatter + all-gather, HSDP's replica all-reduce, ZeRO-3's
per-layer gathers; Rajbhandari et al. 2020), what of it the backward does not hide, the
optimizer step, a CPU host's per-call synchronisation, and the model-state memory."""

from __future__ import annotations

import numpy as np

from costmodels import comm
from costmodels.step_case import StepCase
from costmodels.step_memory import memory_terms

# Adam's HBM traffic per local parameter: read + write fp32 master, m, v (24) + read the fp32
# grad (4) + write the 16-bit weight (2) = 30 B; the model uses 36 B, an allowance (not a
# measurement) for the gradient-norm and zeroing passes over the gradients.
ADAM_BYTES_PER_PARAM = 36.0
DP_BUCKET_BYTES = 50e6  # gradient bucket: DDP's 25 MB default .. Megatron's 40M-param buffers
# Synchronising calls per MoE layer and micro-batch under expert parallelism: the token
# counts exchange, dispatch and combine forward, their two adjoints backward.
MOE_A2A_CALLS = 5.0
STATE_KEYS = ("_mem_weights", "_mem_gradients", "_mem_optimizer", "_mem_buffers")


def _grad_comm_bytes(x: StepCase) -> np.ndarray:
    return np.where(x.ab > 2, 4.0, 2.0)  # gradients reduced in the compute dtype


def _per_msg(fn, nbytes, n, bw, lat, msgs):
    """Collectives issued per bucket (DDP / Megatron buffers) or per layer (FSDP units) pay
    the alpha term per message: n_msgs x collective(bytes / n_msgs)."""
    return msgs * fn(nbytes / msgs, n, bw, lat)


def dp_sync(x: StepCase, params: np.ndarray, group: np.ndarray, shards: np.ndarray,
            reps: np.ndarray) -> np.ndarray:
    """Gradient sync of `params` over `group` replicas, ZeRO-sharded over `shards` of them
    (HSDP: all-reduced across the `reps` groups of shards)."""
    link_eff, sharding, ab, m = x.prof.link_eff, x.sharding, x.ab, x.m
    dp_bw = np.minimum(x.f64("dp_bw"), np.where(x.cp > 1, x.f64("cp_bw"), np.inf)) * link_eff
    sh_bw, sh_lat = x.f64("shard_bw") * link_eff, x.f64("shard_lat")
    rep_bw, rep_lat = x.f64("rep_bw") * link_eff, x.f64("rep_lat")
    ag_bw, ag_lat = x.link("allgather", sh_bw, sh_lat)
    rs_bw, rs_lat = x.link("reduce_scatter", sh_bw, sh_lat)
    n_lay = np.maximum(x.layers_stage, 1.0)
    grad_bytes = params * _grad_comm_bytes(x)
    n_bkt = np.maximum(1.0, np.ceil(grad_bytes / DP_BUCKET_BYTES))
    t_rep = np.where(reps > 1, _per_msg(comm.allreduce_time, grad_bytes / shards, reps, rep_bw, rep_lat, n_bkt), 0.0)
    t_plain = _per_msg(comm.allreduce_time, grad_bytes, group, dp_bw, x.f64("dp_lat"), n_bkt)
    t_sharded_step = (
        _per_msg(comm.reduce_scatter_time, grad_bytes, shards, rs_bw, rs_lat, n_bkt)
        + _per_msg(comm.allgather_time, params * ab, shards, ag_bw, ag_lat, n_bkt) + t_rep
    )
    t_step = np.where((sharding >= 2) | ((sharding == 1) & (reps > 1)), t_sharded_step, t_plain)
    # ZeRO-3: all-gather each layer's weights in forward and again in backward,
    # reduce-scatter its grads, every micro-batch (Rajbhandari et al. 2020, Sec. 7.2.2).
    t_z3 = m * (
        2 * _per_msg(comm.allgather_time, params * ab, shards, ag_bw, ag_lat, n_lay)
        + _per_msg(comm.reduce_scatter_time, grad_bytes, shards, rs_bw, rs_lat, n_lay)
    ) + t_rep
    return np.where(group > 1, np.where(sharding == 3, t_z3, t_step), 0.0)


def dp_exposed(x: StepCase, t_dp: np.ndarray, compute: np.ndarray, stage_mb: np.ndarray) -> np.ndarray:
    """What of the gradient sync the overlap window does not hide: ZeRO-3 gathers ahead of
    every layer (all compute); otherwise the gradient reduce runs under the last
    micro-batch's backward and a sharded optimizer's all-gather under the next step's
    first forward. The first bucket waits for its gradients either way."""
    sharding, replicas = x.sharding, x.dp * x.cp
    window = np.where(sharding == 3, compute, stage_mb)
    window = np.where(x.stack["grad_overlap"], window, 0.0)
    first_bucket = t_dp / np.maximum(x.layers_stage * np.where(sharding == 3, 3 * x.m, 1), 1)
    exposed = np.maximum(0.0, t_dp - x.dp_overlap * window) + np.where(replicas > 1, first_bucket, 0.0)
    return np.minimum(exposed, t_dp)


def cpu_sync_calls(x: StepCase, params_local: np.ndarray, n_tp: np.ndarray) -> np.ndarray:
    """On a CPU host every collective is a meeting point of ranks that share the cores: the
    first to arrive waits for the last, and gloo does its work on a compute core. A fitted
    cost per meeting, charged per meeting each layout holds per step: TP n_tp per layer per
    micro-batch (SP's all-gather follows its reduce-scatter with only a norm between them, no
    work for the ranks to drift apart over, so the pair is one meeting, as TP's all-reduce is);
    ZeRO-3 2 gathers + 1 reduce-scatter per layer per micro-batch; ZeRO-1/2 a gather and a
    reduce-scatter per layer; DDP one all-reduce per bucket. Pipeline sends are not charged:
    the schedule already prices each stage's wait for its neighbour (`pp_idle_s`)."""
    m, ls, sharding = x.m, x.layers_stage, x.sharding
    n_lay = np.maximum(ls, 1.0)
    n_bkt = np.maximum(1.0, np.ceil(params_local * _grad_comm_bytes(x) / DP_BUCKET_BYTES))
    calls = np.where(x.tp > 1, m * ls * n_tp, 0.0)
    calls = calls + np.where(x.dp * x.cp > 1, np.where(
        sharding == 3, 3 * m * n_lay, np.where(sharding >= 1, 2 * n_lay, n_bkt)), 0.0)
    calls = calls + np.where(x.ep > 1, m * ls * x.moe_frac * MOE_A2A_CALLS, 0.0)
    return np.where(x.on_cpu, calls * x.prof.cpu_sync_call_s, 0.0)


def states_terms(x: StepCase, params_local: np.ndarray, expert_local: np.ndarray, compute: np.ndarray,
                 stage_mb: np.ndarray, n_tp: np.ndarray) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Gradient sync, optimizer and model-state memory of a rank holding `params_local`."""
    replicas = x.dp * x.cp
    # Experts are replicated over dp x cp / ep ranks (expert data parallelism) and their
    # ZeRO states sharded over those (Megatron-Core's expert distributed optimizer).
    edp = np.maximum(replicas / x.ep, 1.0)
    t_dp = dp_sync(x, params_local - expert_local, replicas, x.shard_n, x.rep_n) \
        + np.where(expert_local > 0, dp_sync(x, expert_local, edp, edp, np.ones_like(edp)), 0.0)
    exposed = dp_exposed(x, t_dp, compute, stage_mb)
    # The optimizer step over the local shard: Adam streams its states like any elementwise
    # kernel. On a CPU host it updates them in place, at the in-place streaming rate the bench
    # measured (its per-tensor temporaries come back from the allocator's free lists, never
    # page-faulted in as fresh activations are): the tiny model's 7.1M parameters x 36 B at
    # 36 GB/s is 7.1 ms, and its runs log 7-9 ms for the optimizer phase.
    opt_shard = np.where(x.sharding >= 1, x.shard_n, 1.0)
    exp_shard = np.where(x.sharding >= 1, edp, 1.0)
    bw_opt = np.where(x.on_cpu, x.hbm_bw, x.bw_elem)
    t_opt = ADAM_BYTES_PER_PARAM * ((params_local - expert_local) / opt_shard + expert_local / exp_shard) / bw_opt
    t_sync_calls = cpu_sync_calls(x, params_local, n_tp)
    mem = memory_terms(x.c, x.prof, params_local, x.shard_n, x.layers_stage, x.rc_frac, expert_local, exp_shard)
    return {"rest": exposed + t_opt + np.where(x.on_cpu, x.prof.step_overhead_s, 0.0) + t_sync_calls,
            "dp_comm_s": t_dp, "dp_exposed_s": exposed, "optimizer_s": t_opt,
            "params_local": params_local, **{k: mem[k] for k in STATE_KEYS}}, mem
