"""Megatron-LM: the `pretrain_gpt.py` argument list (Megatron-Core 0.19.x) of a plan, or the
one-line reason Megatron cannot run it exactly."""

from __future__ import annotations

import shlex

from costmodels.errors import MeshplanError
from costmodels.specs import ModelSpec
from costmodels.stack_contracts import stack_unsupported
from planner.emit.common import file_header, fmt_num
from planner.planfile import Plan

MEGATRON_FILE = "megatron_args.txt"
MEGATRON_CORE_VERSION = "0.19.x"  # whose parse_args / validate_args the tests run the flags through


def pipeline_layout_string(layers: int, pp: int, vpp: int) -> str:
    """Megatron-Core `--pipeline-model-parallel-layout` for an uneven interleaved split:
    pp x vpp chunks in schedule order (virtual stage k runs on pipeline rank k mod pp), the
    first `layers mod chunks` chunks one layer longer."""
    chunks = pp * vpp
    base, extra = divmod(layers, chunks)
    parts = ["t" * (base + (1 if k < extra else 0)) for k in range(chunks)]
    parts[0] = "E" + parts[0]
    parts[-1] = parts[-1] + "L"
    return "|".join(parts)


def megatron_layout_string(plan: Plan) -> str | None:
    """Megatron-Core's explicit pipeline layout for uneven stages or chunks (virtual stages
    in schedule order separated by "|", E = embedding, t = decoder layer, L = loss), or None
    where --num-layers-per-virtual-pipeline-stage says it."""
    lay, layers = plan.layout, plan.model_spec().layers
    if lay.pp > 1 and layers % (lay.pp * lay.vpp):
        return pipeline_layout_string(layers, lay.pp, lay.vpp)
    return None


def megatron_unsupported(plan: Plan) -> str | None:
    """Why Megatron-LM cannot run this plan exactly (`costmodels.stack_contracts`), or None."""
    return stack_unsupported("megatron-core", plan.model_spec(), plan.layout_spec())


def moe_megatron_args(spec: ModelSpec, plan: Plan) -> list[str]:
    """Megatron-Core's MoE flags for the plan's experts, routing, losses and EP degree
    (grouped GEMMs, all-to-all dispatch: what the cost model prices for Megatron stacks)."""
    tr = plan.train
    a = ["--num-experts", str(spec.num_experts), "--moe-router-topk", str(spec.experts_topk),
         "--expert-model-parallel-size", str(plan.layout.ep),
         "--moe-ffn-hidden-size", str(spec.expert_ffn),
         "--moe-grouped-gemm", "--moe-token-dispatcher-type", "alltoall",
         "--moe-router-score-function", spec.router_score,
         "--moe-aux-loss-coeff", fmt_num(tr.moe_aux_loss_coef)]
    if spec.router_score == "softmax" and not spec.norm_topk:
        a.append("--moe-router-pre-softmax")  # softmax over all experts, top-k not renormalised
    if tr.moe_z_loss_coef:
        a += ["--moe-z-loss-coeff", fmt_num(tr.moe_z_loss_coef)]
    if spec.capacity_factor:
        a += ["--moe-expert-capacity-factor", fmt_num(spec.capacity_factor),
              "--moe-token-drop-policy", "position"]
    if spec.shared_ffn:
        a += ["--moe-shared-expert-intermediate-size", str(spec.shared_ffn)]
        if spec.shared_expert_gate:
            a.append("--moe-shared-expert-gate")
    if spec.dense_layers or spec.moe_layer_freq > 1:
        pattern = [1 if spec.is_moe_layer(i) else 0 for i in range(spec.layers)]
        a += ["--moe-layer-freq", _run_length(pattern)]
    if tr.moe_force_balance:
        a.append("--moe-router-force-load-balancing")
    return a


def _run_length(pattern: list[int]) -> str:
    """A 0/1 list as the Python expression Megatron's --moe-layer-freq evaluates."""
    runs: list[tuple[int, int]] = []
    for v in pattern:
        if runs and runs[-1][0] == v:
            runs[-1] = (v, runs[-1][1] + 1)
        else:
            runs.append((v, 1))
    return "(" + "+".join(f"[{v}]*{n}" for v, n in runs) + ")"


def megatron_args(plan: Plan) -> list[str]:
    """Megatron-LM `pretrain_gpt.py` arguments (parallelism, model, batch, optimizer, LR).

    Data and tokenizer arguments (`--data-path`, `--tokenizer-type`, ...) depend on the
    user's prepared corpus and are left to the user. A plan Megatron cannot run exactly is
    refused (`megatron_unsupported`), never emitted approximately.
    """
    reason = megatron_unsupported(plan)
    if reason is not None:
        raise MeshplanError(reason)
    spec: ModelSpec = plan.model_spec()
    a = _parallel_args(plan, spec)
    if spec.is_moe:
        a += moe_megatron_args(spec, plan)
    return a + _value_args(plan, spec) + _model_args(plan, spec) + _training_args(plan)


def _parallel_args(plan: Plan, spec: ModelSpec) -> list[str]:
    """Tensor / pipeline / context parallelism, recompute and optimizer sharding."""
    lay = plan.layout
    a: list[str] = [
        "--tensor-model-parallel-size", str(lay.tp),
        "--pipeline-model-parallel-size", str(lay.pp),
        "--context-parallel-size", str(lay.cp),
    ]
    layout_string = megatron_layout_string(plan)
    if layout_string:
        a += ["--pipeline-model-parallel-layout", layout_string]
    elif lay.vpp > 1:
        a += ["--num-layers-per-virtual-pipeline-stage", str(spec.layers // (lay.pp * lay.vpp))]
    if lay.sequence_parallel and lay.tp > 1:
        a.append("--sequence-parallel")
    if lay.recompute == "selective":
        a += ["--recompute-granularity", "selective"]
    elif lay.recompute == "full" and lay.recompute_layers:
        # Recompute only the first N layers of each stage, keep the rest (Megatron "block",
        # counted per virtual chunk).
        a += ["--recompute-granularity", "full", "--recompute-method", "block",
              "--recompute-num-layers", str(lay.recompute_layers // lay.vpp)]  # per chunk
    elif lay.recompute == "full":
        a += ["--recompute-granularity", "full", "--recompute-method", "uniform",
              "--recompute-num-layers", "1"]
    if lay.sharding in ("zero1", "zero2"):
        a.append("--use-distributed-optimizer")  # shards optimizer state + grads over DP
        if lay.dp_shard and lay.dp_shard < lay.dp:
            # HSDP-style: optimizer sharded within groups, replicated across them.
            a += ["--num-distributed-optimizer-instances", str(lay.dp // lay.dp_shard)]
    elif lay.sharding == "zero3":
        # Fully sharded parameters (Megatron-Core's FSDP2 path). Its validate_args requires
        # no gradient-accumulation fusion and the torch_dist checkpoint format; the launcher
        # must not set CUDA_DEVICE_MAX_CONNECTIONS=1 (FSDP2 overlaps on several streams).
        a += ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion", "--ckpt-format", "torch_dist"]
    return a


# Megatron-LM flags that carry one plan value each, by the plan object holding it (the
# switches and the conditional flags follow in `_model_args` / `_training_args`).
_VALUE_FLAGS: dict[str, dict[str, str]] = {
    "layout": {"--micro-batch-size": "micro_batch_size", "--global-batch-size": "global_batch_size"},
    "model": {"--seq-length": "seq_len", "--max-position-embeddings": "seq_len", "--num-layers": "layers",
              "--hidden-size": "hidden", "--ffn-hidden-size": "ffn_hidden", "--num-attention-heads": "heads"},
    "train": {"--train-iters": "max_steps", "--lr": "lr", "--min-lr": "resolved_min_lr",
              "--lr-warmup-iters": "resolved_warmup_steps", "--lr-decay-iters": "max_steps",
              "--weight-decay": "weight_decay", "--adam-beta1": "beta1", "--adam-beta2": "beta2",
              "--adam-eps": "eps", "--clip-grad": "grad_clip", "--seed": "seed", "--log-interval": "log_every"},
}


def _value_args(plan: Plan, spec: ModelSpec) -> list[str]:
    """`_VALUE_FLAGS` with their values (floats in `fmt_num`'s shortest exact form)."""
    holders = {"layout": plan.layout, "model": spec, "train": plan.train}
    a: list[str] = []
    for holder, flags in _VALUE_FLAGS.items():
        for flag, field in flags.items():
            v = getattr(holders[holder], field)
            a += [flag, fmt_num(v) if isinstance(v, float) else str(v)]
    return a


def _model_args(plan: Plan, spec: ModelSpec) -> list[str]:
    """The architecture's switches and conditional flags."""
    a: list[str] = []
    if spec.kv_heads != spec.heads:
        a += ["--group-query-attention", "--num-query-groups", str(spec.kv_heads)]
    if spec.attn_head_dim:
        a += ["--kv-channels", str(spec.head_dim)]
    if spec.qk_norm:
        a.append("--qk-layernorm")
    if spec.qkv_bias and not spec.bias:
        a.append("--add-qkv-bias")
    if spec.mlp == "swiglu":
        a.append("--swiglu")
    a += ["--normalization", "RMSNorm" if spec.norm == "rmsnorm" else "LayerNorm",
          "--norm-epsilon", fmt_num(spec.norm_eps),
          "--position-embedding-type", "rope", "--rotary-base", str(int(spec.rope_theta))]
    if not spec.tied_embeddings:
        a.append("--untie-embeddings-and-output-weights")
    if not spec.bias:
        a.append("--disable-bias-linear")
    return a


def _training_args(plan: Plan) -> list[str]:
    """Precision, the LR decay style and checkpoints."""
    tr = plan.train
    a: list[str] = []
    if tr.precision == "bf16":
        a.append("--bf16")
    elif tr.precision == "fp16":
        a.append("--fp16")
    elif tr.precision == "fp8":
        a += ["--bf16", "--fp8-format", "hybrid"]
    warmup = tr.resolved_warmup_steps
    if tr.schedule == "wsd":
        decay = max(0, min(int(round(tr.wsd_decay_frac * tr.max_steps)), tr.max_steps - warmup))
        a += ["--lr-decay-style", "WSD", "--lr-wsd-decay-style", "linear",
              "--lr-wsd-decay-iters", str(decay)]
    else:
        a += ["--lr-decay-style", tr.schedule]  # "cosine" / "constant"
    if plan.checkpoint.every:
        a += ["--save-interval", str(plan.checkpoint.every)]
    return a


def megatron_env(plan: Plan) -> dict[str, str]:
    """Environment Megatron-Core's validate_args requires of this layout: tensor or context
    parallelism without FSDP orders its communication kernels on one CUDA connection."""
    lay = plan.layout
    if (lay.tp > 1 or lay.cp > 1) and lay.sharding != "zero3":
        return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    return {}


def megatron_args_text(plan: Plan) -> str:
    """One flag per line with its value; use `pretrain_gpt.py $(grep -v "^#" megatron_args.txt)`.
    A plan Megatron cannot run gets a header and the one-line reason instead of flags."""
    header = file_header(plan, f"Megatron-LM arguments for pretrain_gpt.py (Megatron-Core {MEGATRON_CORE_VERSION})")
    header += [f"# env: {k}={v}" for k, v in megatron_env(plan).items()]
    if plan.layout.sharding == "zero3":
        header.append("# FSDP2: launch without CUDA_DEVICE_MAX_CONNECTIONS=1")
    reason = megatron_unsupported(plan)
    if reason is not None:
        return "\n".join([*header, f"# not emitted: {reason}"]) + "\n"
    args = megatron_args(plan)
    lines: list[str] = []
    for tok in args:
        if tok.startswith("--"):
            lines.append(tok)
        else:
            lines[-1] += " " + shlex.quote(tok)
    return "\n".join([*header, *lines]) + "\n"
