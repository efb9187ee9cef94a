"""A torchtitan job config (TOML) for a plan, for the torchtitan 0.2.x line.

torchtitan builds its model from a registered flavor (`--model.name llama3 --model.flavor
70B`), not from dimensions in the TOML, so a plan gets a torchtitan config only when its
model is one of the flavors below exactly; the parallelism, batch, optimizer, LR schedule,
activation checkpointing and checkpoint interval follow the plan:

* data parallelism: FSDP2 (`data_parallel_shard_degree`) for ZeRO-3, HSDP replicas
  (`data_parallel_replicate_degree`) when the plan shards within groups, ZeRO-2 as FSDP2
  that keeps parameters gathered from forward to backward (`fsdp_reshard_after_forward =
  "never"`: one all-gather and one reduce-scatter per step, full weights resident, as
  ZeRO-2); plain DDP replicas for no sharding. ZeRO-1 has no torchtitan form (refused).
* pipelines: the plan's schedule as the `torch.distributed.pipelining` class torchtitan
  looks up, and each stage's modules listed (`module_fqns_per_model_part`) so the split is
  the planner's (`costmodels.pipeline.stage_layer_counts`), embeddings on the first stage,
  norm and output head on the last.

`torchtitan_unsupported(plan)` says why a plan cannot be written, or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import tomli_w

from costmodels.errors import MeshplanError
from costmodels.pipeline import BY_NAME, stage_layer_counts, stages_per_rank
from costmodels.specs import ModelSpec
from planner.planfile import Plan

TORCHTITAN_VERSION = "0.2.2"  # the release whose ConfigManager the tests load this file with
TORCHTITAN_FILE = "torchtitan.toml"


@dataclass(frozen=True)
class Flavor:
    """One registered torchtitan model (torchtitan/models/<name>/__init__.py)."""

    name: str
    flavor: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn_hidden: int  # after torchtitan's SwiGLU sizing (2/3 x 4d x multiplier, rounded up)
    vocab: int
    rope_theta: float


# torchtitan 0.2.2 llama3_args (dim, n_layers, n_heads, n_kv_heads, ffn_dim_multiplier,
# multiple_of, rope_theta; vocab 128256, the Llama 3 tokenizer's); tests re-derive them
# from the installed torchtitan source.
FLAVORS: tuple[Flavor, ...] = (
    Flavor("llama3", "8B", 4096, 32, 32, 8, 14336, 128256, 500000.0),
    Flavor("llama3", "70B", 8192, 80, 64, 8, 28672, 128256, 500000.0),
    Flavor("llama3", "405B", 16384, 126, 128, 8, 53248, 128256, 500000.0),
)

def _torch_schedule(name: str) -> str:
    """torchtitan's `pipeline_parallel_schedule` for an effective schedule: the
    `torch.distributed.pipelining` class name without "Schedule"."""
    return BY_NAME[name].torch_class.removeprefix("Schedule")


def flavor_for(spec: ModelSpec) -> Flavor | None:
    for f in FLAVORS:
        if (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.ffn_hidden, spec.vocab) == (
                f.hidden, f.layers, f.heads, f.kv_heads, f.ffn_hidden, f.vocab) and (
                spec.rope_theta == f.rope_theta and spec.mlp == "swiglu" and spec.norm == "rmsnorm"
                and not spec.tied_embeddings and not spec.bias and not spec.qkv_bias
                and not spec.qk_norm and not spec.is_moe):
            return f
    return None


def torchtitan_unsupported(plan: Plan) -> str | None:
    """Why torchtitan cannot run this plan exactly, or None."""
    spec, lay = plan.model_spec(), plan.layout
    if flavor_for(spec) is None:
        known = ", ".join(f"{f.name} {f.flavor}" for f in FLAVORS)
        return (f"model {spec.name}: torchtitan builds registered flavors only ({known}); "
                "register one with these dimensions, or launch with meshplan's executor")
    if lay.sharding == "zero1":
        return ("layout.sharding=zero1: torchtitan shards with FSDP2 (zero2 / zero3 forms) or "
                "replicates (none); plan with --sharding none,zero2,zero3")
    if lay.engine != "torch":
        return "layout.engine=deepspeed: torchtitan is a torch-native trainer; use engine=torch"
    if lay.tp > 1 and not lay.sequence_parallel:
        return ("layout.sequence_parallel=false: torchtitan's tensor parallelism always shards "
                "norms over the sequence; set layout.sequence_parallel=true")
    if lay.loss_chunks > 1:
        return (f"layout.loss_chunks={lay.loss_chunks}: torchtitan computes the loss over whole "
                "micro-batches; set loss_chunks=1")
    if lay.recompute == "full" and lay.recompute_layers:
        return (f"layout.recompute_layers={lay.recompute_layers}: torchtitan recomputes every "
                "layer or every n-th (selective_ac_option), not the first N per stage; use "
                "recompute_layers=0")
    if lay.pp > 1 and plan.layout_spec().effective_schedule == "zbh1":
        # torchtitan runs single-stage classes (GPipe, 1F1B) with one stage per rank and the
        # multi-stage ones (ScheduleInterleavedZeroBubble among them) with >= 2 only.
        return ("layout.schedule=zbh1: torchtitan runs zero-bubble schedules with >= 2 stages "
                "per rank; use interleaved_zb (vpp >= 2) or zbv")
    return None


def _stage_modules(spec: ModelSpec, n_stages: int) -> list[list[str]]:
    """Module FQNs of each pipeline stage, in stage order (torchtitan's llama3 names)."""
    parts: list[list[str]] = []
    first = 0
    for s, count in enumerate(stage_layer_counts(spec.layers, n_stages)):
        mods = [f"layers.{i}" for i in range(first, first + count)]
        first += count
        if s == 0:
            mods.insert(0, "tok_embeddings")
        if s == n_stages - 1:
            mods += ["norm", "output"]
        parts.append(mods)
    return parts


def torchtitan_config(plan: Plan) -> dict[str, Any]:
    """The job config as a dict of TOML tables."""
    reason = torchtitan_unsupported(plan)
    if reason is not None:
        raise MeshplanError(reason)
    spec, lay, tr = plan.model_spec(), plan.layout, plan.train
    flavor = flavor_for(spec)
    assert flavor is not None
    if lay.sharding in ("zero2", "zero3"):
        shard = lay.dp_shard if lay.dp_shard and lay.dp_shard < lay.dp else lay.dp
        replicate = lay.dp // shard
    else:
        shard, replicate = 1, lay.dp
    parallel: dict[str, Any] = {
        "data_parallel_replicate_degree": replicate,
        "data_parallel_shard_degree": shard,
        "fsdp_reshard_after_forward": "never" if lay.sharding == "zero2" else "default",
        "tensor_parallel_degree": lay.tp,
        "context_parallel_degree": lay.cp,
        "pipeline_parallel_degree": lay.pp,
        "expert_parallel_degree": lay.ep,
    }
    # torchtitan's local batch is one data-parallel rank's share of the step; it runs
    # global / (local x dp) accumulation steps, and a pipeline splits the local batch
    # into micro-batches of pipeline_parallel_microbatch_size.
    local = lay.micro_batch_size * (lay.grad_accum if lay.pp > 1 else 1)
    if lay.pp > 1:
        sched = plan.layout_spec().effective_schedule
        n_stages = lay.pp * stages_per_rank(sched, lay.vpp)
        parallel.update(
            pipeline_parallel_schedule=_torch_schedule(sched),
            pipeline_parallel_microbatch_size=lay.micro_batch_size,
            module_fqns_per_model_part=_stage_modules(spec, n_stages),
        )
    mixed = "float32" if tr.precision == "fp32" else "bfloat16"
    ac: dict[str, Any] = {"mode": {"none": "none", "selective": "selective", "full": "full"}[lay.recompute]}
    if lay.recompute == "selective":
        ac["selective_ac_option"] = "op"  # op-level SAC (what costmodels.stacks prices)
    warmup = tr.resolved_warmup_steps
    sched_cfg: dict[str, Any] = {
        "warmup_steps": warmup,
        "min_lr_factor": tr.resolved_min_lr / tr.lr,
        "decay_type": "cosine" if tr.schedule == "cosine" else "linear",
    }
    if tr.schedule == "wsd":
        sched_cfg["decay_ratio"] = tr.wsd_decay_frac
    elif tr.schedule == "constant":
        sched_cfg["decay_ratio"] = 0.0
    cfg: dict[str, Any] = {
        "job": {"description": f"meshplan plan: {spec.name} on {plan.cluster.num_gpus} x "
                               f"{plan.cluster.accelerator}", "dump_folder": "./outputs"},
        "metrics": {"log_freq": tr.log_every},
        "model": {"name": flavor.name, "flavor": flavor.flavor,
                  **({"converters": ["float8"]} if tr.precision == "fp8" else {})},
        "optimizer": {"name": "AdamW", "lr": tr.lr, "beta1": tr.beta1, "beta2": tr.beta2,
                      "eps": tr.eps, "weight_decay": tr.weight_decay},
        "lr_scheduler": sched_cfg,
        "training": {"local_batch_size": local, "global_batch_size": lay.global_batch_size,
                     "seq_len": spec.seq_len, "max_norm": tr.grad_clip, "steps": tr.max_steps,
                     "mixed_precision_param": mixed},
        "parallelism": parallel,
        "activation_checkpoint": ac,
        "debug": {"seed": tr.seed},
        "checkpoint": {"enable": plan.checkpoint.every > 0,
                       "interval": plan.checkpoint.every or tr.max_steps,
                       "keep_latest_k": plan.checkpoint.keep},
    }
    return cfg


def torchtitan_toml(plan: Plan, header: list[str]) -> str:
    """The TOML text: the header comments, then the config (or the one-line refusal)."""
    lines = [*header, f"# torchtitan {TORCHTITAN_VERSION}: torchrun ... -m torchtitan.train "
             "--job.config_file torchtitan.toml  (set [training] dataset / [model] "
             "hf_assets_path to your data and tokenizer)"]
    reason = torchtitan_unsupported(plan)
    if reason is not None:
        return "\n".join([*lines, f"# not emitted: {reason}"]) + "\n"
    return "\n".join(lines) + "\n" + tomli_w.dumps(_short_floats(torchtitan_config(plan)))


def _short_floats(node: Any) -> Any:
    """Floats to 12 significant digits (3e-05, not 2.9999999999999977e-05)."""
    if isinstance(node, dict):
        return {k: _short_floats(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_short_floats(v) for v in node]
    return float(f"{node:.12g}") if isinstance(node, float) else node

