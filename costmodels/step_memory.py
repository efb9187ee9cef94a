"""Peak memory per GPU from the step-time model's case table: model states as the stack
holds them, a layer's activations under its recompute policy, the embedding output, the
logits and buffers (`memory_terms`), then the schedule's in-flight micro-batches on the
first and the last pipeline rank (`memory_totals`)."""

from __future__ import annotations

import numpy as np

from costmodels import memory, pipeline
from costmodels.cases import Cases, loss_chunks_column
from costmodels.profile import Profile
from costmodels.stacks import ATTENTION_IMPLS
from costmodels.step_case import stack_columns_of


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
    stack = stack_columns_of(c, len(tp))
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
        "_mem_logits": memory.logits_bytes(tok, f64("vocab"), tp, ab, stack["eager_cross_entropy"],
                                           loss_chunks_column(c)),
        "_mem_factor": np.full(len(tp), prof.memory_factor),
        "_mem_constant": np.full(len(tp), prof.memory_constant_gb * 1e9),
        "_mem_log_first_rank": stack["mem_log_first_rank"], "_mem_log_unit_gb": stack["mem_log_unit_gb"],
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
        # the figure the stack's own memory log prints (`costmodels.stacks.Stack.memory_log_rank`)
        "peak_memory_as_logged": np.where(t["_mem_log_first_rank"], first_gb, total / 1e9) / t["_mem_log_unit_gb"],
    }
