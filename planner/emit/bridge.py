"""Megatron-Bridge / NeMo 2 recipe overrides for a plan (`megatron_bridge_overrides.txt`).

A team that trains with a Megatron-Bridge recipe (`pretrain_config()` of its model) pastes
these as Hydra-style overrides (`python pretrain.py $(grep -v '^#' FILE)`): the recipe
keeps the model's architecture, tokenizer and data; the plan sets the parallel layout,
batch, recompute, optimizer, LR schedule and checkpoint interval. Keys are
`ConfigContainer` sections: `model` (a GPTModelProvider, i.e. Megatron-Core's
TransformerConfig), `train`, `optimizer` (Megatron-Core's OptimizerConfig), `scheduler`,
`ddp` (Megatron-Core's DistributedDataParallelConfig), `dist`, `checkpoint`, `logger`,
`rng`, `mixed_precision`. Bridge runs Megatron-Core, so a plan Megatron-LM cannot run is
refused with the same reason (`planner.emit.megatron.megatron_unsupported`).
"""

from __future__ import annotations

from typing import Any

from costmodels.specs import ModelSpec
from planner.planfile import Plan

BRIDGE_FILE = "megatron_bridge_overrides.txt"
BRIDGE_VERSION = "0.6.x"  # Megatron-Bridge, on Megatron-Core 0.19


def _value(v: Any) -> str:
    """A Hydra override value: null / true / false, numbers, and quoted strings where the
    grammar would read them otherwise (Megatron's layout string holds '|')."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        text = f"{v:.12g}"
        return text if any(c in text for c in ".e") else text + ".0"  # a float, not an int
    if isinstance(v, str) and not v.replace("_", "").replace("-", "").isalnum():
        return "'" + v.replace("'", "\\'") + "'"
    return str(v)


def bridge_overrides(plan: Plan, layout_string: str | None) -> list[tuple[str, Any]]:
    """(key, value) pairs in recipe order. `layout_string`: Megatron-Core's explicit
    pipeline layout for an uneven interleaved split (`planner.emit.megatron.pipeline_layout_string`)."""
    spec: ModelSpec = plan.model_spec()
    lay, tr = plan.layout, plan.train
    o: list[tuple[str, Any]] = [
        ("model.tensor_model_parallel_size", lay.tp),
        ("model.pipeline_model_parallel_size", lay.pp),
        ("model.virtual_pipeline_model_parallel_size", lay.vpp if lay.vpp > 1 else None),
        ("model.context_parallel_size", lay.cp),
        ("model.sequence_parallel", bool(lay.sequence_parallel and lay.tp > 1)),
        ("model.seq_length", spec.seq_len),
    ]
    if layout_string:
        o.append(("model.pipeline_model_parallel_layout", layout_string))
    if spec.is_moe:
        o.append(("model.expert_model_parallel_size", lay.ep))
    if lay.recompute == "selective":
        o += [("model.recompute_granularity", "selective")]
    elif lay.recompute == "full":
        per_chunk = lay.recompute_layers // lay.vpp if lay.recompute_layers else 1
        o += [("model.recompute_granularity", "full"),
              ("model.recompute_method", "block" if lay.recompute_layers else "uniform"),
              ("model.recompute_num_layers", per_chunk)]
    else:
        o.append(("model.recompute_granularity", None))
    distributed_optimizer = lay.sharding in ("zero1", "zero2")
    o.append(("ddp.use_distributed_optimizer", distributed_optimizer))
    o.append(("optimizer.use_distributed_optimizer", distributed_optimizer))
    if distributed_optimizer and lay.dp_shard and lay.dp_shard < lay.dp:
        o.append(("ddp.num_distributed_optimizer_instances", lay.dp // lay.dp_shard))
    if lay.sharding == "zero3":
        o += [("dist.use_torch_fsdp2", True), ("model.gradient_accumulation_fusion", False),
              ("checkpoint.ckpt_format", "torch_dist")]
    o += [
        ("train.micro_batch_size", lay.micro_batch_size),
        ("train.global_batch_size", lay.global_batch_size),
        ("train.train_iters", tr.max_steps),
        ("optimizer.lr", tr.lr), ("optimizer.min_lr", tr.resolved_min_lr),
        ("optimizer.weight_decay", tr.weight_decay),
        ("optimizer.adam_beta1", tr.beta1), ("optimizer.adam_beta2", tr.beta2),
        ("optimizer.adam_eps", tr.eps), ("optimizer.clip_grad", tr.grad_clip),
        ("scheduler.lr_warmup_iters", tr.resolved_warmup_steps),
        ("scheduler.lr_decay_iters", tr.max_steps),
    ]
    if tr.schedule == "wsd":
        decay = max(0, min(int(round(tr.wsd_decay_frac * tr.max_steps)),
                           tr.max_steps - tr.resolved_warmup_steps))
        o += [("scheduler.lr_decay_style", "WSD"), ("scheduler.lr_wsd_decay_style", "linear"),
              ("scheduler.lr_wsd_decay_iters", decay)]
    else:
        o.append(("scheduler.lr_decay_style", tr.schedule))
    precision = {"bf16": "bf16_mixed", "fp16": "fp16_mixed", "fp8": "bf16_with_fp8_delayed_scaling_mixed",
                 "fp32": None}[tr.precision]
    o += [("mixed_precision", precision), ("rng.seed", tr.seed),
          ("logger.log_interval", tr.log_every)]
    if plan.checkpoint.every:
        o.append(("checkpoint.save_interval", plan.checkpoint.every))
    return o


def bridge_overrides_text(plan: Plan, header: list[str], refusal: str | None,
                          layout_string: str | None) -> str:
    lines = [*header, f"# Megatron-Bridge {BRIDGE_VERSION} recipe overrides: python pretrain.py "
             "$(grep -v '^#' megatron_bridge_overrides.txt); the recipe keeps the model, "
             "tokenizer and data"]
    if refusal is not None:
        return "\n".join([*lines, f"# not emitted: {refusal}"]) + "\n"
    body = [f"{k}={_value(v)}" for k, v in bridge_overrides(plan, layout_string)]
    return "\n".join([*lines, *body]) + "\n"
