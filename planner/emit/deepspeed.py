"""DeepSpeed: a JSON whose batch fields satisfy DeepSpeed's own check train_batch_size =
micro x accumulation x data-parallel world size (ZeRO over dp; no HSDP: MiCS was removed)."""

from __future__ import annotations

import json
from typing import Any

from costmodels.errors import MeshplanError
from costmodels.specs import ZERO_STAGE
from planner.emit.common import on_cpu
from planner.planfile import Plan

DEEPSPEED_FILE = "deepspeed_config.json"
DEEPSPEED_MOE_REFUSAL = (
    "model: mixture-of-experts layers are DeepSpeed model code (deepspeed.moe.layer.MoE with "
    "its ep_size), not config keys; launch this plan with torchrun (meshplan's executor) or "
    "Megatron (megatron_args.txt)")


def deepspeed_unsupported(plan: Plan) -> str | None:
    """Why a DeepSpeed JSON cannot describe this plan exactly, or None."""
    lay = plan.layout
    if plan.model_spec().is_moe:
        return DEEPSPEED_MOE_REFUSAL
    if lay.dp_shard and lay.dp_shard < lay.dp:
        # MiCS (mics_shard_size) was removed from DeepSpeed; ZeRO++'s hpZ keeps a secondary
        # weight copy per node but still shards gradients and optimizer state over all of dp.
        return (f"layout.dp_shard={lay.dp_shard}: DeepSpeed shards ZeRO state over all of dp "
                "(its MiCS sub-group sharding was removed); set layout.dp_shard=0 for DeepSpeed")
    return None


def deepspeed_config(plan: Plan, include_scheduler: bool = True) -> dict[str, Any]:
    """DeepSpeed JSON for the plan's layout and optimizer.

    DeepSpeed's world size is the data-parallel size (its `mpu` hides TP/PP), so
    train_batch_size = layout.global_batch_size = micro x accumulation x dp.

    Scheduler (for launching with DeepSpeed directly): cosine -> WarmupCosineLR, constant ->
    WarmupLR, both with linear warmup over the plan's warmup steps. These built-ins only
    approximate the plan's curve (`costmodels.lr_schedule`): DeepSpeed's linear warmup takes
    its first two updates at LR 0 and its cosine runs over all `total_num_steps`, so values
    differ by up to a few % mid-run (measured against `lr_curve`). WSD has no DeepSpeed
    built-in, so its block is omitted. The meshplan executor should call this with
    `include_scheduler=False` and hand its own `costmodels.lr_schedule` scheduler to
    `deepspeed.initialize(lr_scheduler=...)`, which reproduces the plan's curve exactly.
    """
    lay, tr = plan.layout, plan.train
    if lay.global_batch_size % (lay.micro_batch_size * lay.dp):
        raise MeshplanError(
            f"layout.global_batch_size={lay.global_batch_size} is not a multiple of "
            f"micro_batch_size x dp = {lay.micro_batch_size * lay.dp}; fix the plan's batch"
        )
    reason = deepspeed_unsupported(plan)
    if reason is not None:
        raise MeshplanError(reason)
    stage = ZERO_STAGE[lay.sharding]
    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(overlap_comm=not on_cpu(plan), contiguous_gradients=True)
    if stage >= 2:
        zero.update(reduce_scatter=True)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True)
    cfg: dict[str, Any] = {
        "train_batch_size": lay.global_batch_size,
        "train_micro_batch_size_per_gpu": lay.micro_batch_size,
        "gradient_accumulation_steps": lay.grad_accum,
        "gradient_clipping": tr.grad_clip,
        "steps_per_print": tr.log_every,
        "zero_optimization": zero,
        # fp8 trains with bf16 master/compute outside the FP8 GEMMs (Transformer Engine).
        "bf16": {"enabled": tr.precision in ("bf16", "fp8")},
        "fp16": {"enabled": tr.precision == "fp16"},
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": tr.lr,
                "betas": [tr.beta1, tr.beta2],
                "eps": tr.eps,
                "weight_decay": tr.weight_decay,
                **({"torch_adam": True} if on_cpu(plan) else {}),
            },
        },
        "wall_clock_breakdown": False,
    }
    warmup = max(1, tr.resolved_warmup_steps)
    if not include_scheduler:
        return cfg
    if tr.schedule == "cosine":
        cfg["scheduler"] = {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": tr.max_steps,
                "warmup_num_steps": warmup,
                "warmup_min_ratio": 0.0,
                "warmup_type": "linear",
                "cos_min_ratio": tr.resolved_min_lr / tr.lr,
            },
        }
    elif tr.schedule == "constant":
        cfg["scheduler"] = {
            "type": "WarmupLR",
            "params": {
                "warmup_min_lr": 0.0,
                "warmup_max_lr": tr.lr,
                "warmup_num_steps": warmup,
                "warmup_type": "linear",
            },
        }
    return cfg




def deepspeed_file(plan: Plan) -> str:
    """deepspeed_config.json's text: the config, or the one-line reason it cannot be one."""
    reason = deepspeed_unsupported(plan)
    cfg: dict[str, Any] = {"not_emitted": reason} if reason else deepspeed_config(plan)
    return json.dumps(cfg, indent=2) + "\n"
