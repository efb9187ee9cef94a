"""`meshplan predict`: one model + cluster + layout -> memory and step-time breakdowns."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from costmodels.cases import single_case
from costmodels.errors import MeshplanError
from costmodels.pipeline import SCHEDULE_NAMES
from costmodels.specs import Layout
from costmodels.stacks import stack_for
from costmodels.steptime import evaluate
from costmodels.uncertainty import interval
from planner.model_args import (
    add_cluster_args,
    add_framework_arg,
    add_model_args,
    cluster_from_args,
    load_yaml_config,
    model_from_args,
)
from planner.plan_sections import LAYOUT_PLAN_KEYS
from planner.planfile import plan_from_dict
from planner.profiles import PricedBy, resolve_profile
from planner.render import print_prediction
from planner.schedule_choice import compare_schedules

LAYOUT_FLAGS = ("tp", "pp", "dp", "cp", "ep", "vpp", "micro_batch", "global_batch")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="predict memory, step time, tokens/s and MFU of one layout")
    add_model_args(p)
    add_cluster_args(p)
    g = p.add_argument_group("layout")
    for name in LAYOUT_FLAGS:
        g.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    g.add_argument("--sharding", choices=["none", "zero1", "zero2", "zero3"], default=None)
    g.add_argument("--recompute", choices=["none", "selective", "full"], default=None)
    g.add_argument("--sequence-parallel", action="store_true", default=None)
    g.add_argument("--precision", choices=["bf16", "fp8", "fp16", "fp32", "fp4"], default=None)
    g.add_argument("--schedule", choices=SCHEDULE_NAMES, default=None,
                   help="pipeline schedule (costmodels.pipeline); zbv / dualpipev hold two stages per rank")
    add_framework_arg(p)
    p.add_argument("--config", help="a plan.yaml `meshplan plan` wrote (priced again with its own "
                   "cluster, profile and framework), or a YAML with model / cluster / layout "
                   "sections (flags override either)")
    p.add_argument("--profile", help="calibration profile YAML (default: the shipped one)")
    p.add_argument("--moe-imbalance", type=float, default=None,
                   help="MoE load imbalance, max / mean tokens per expert (1.0: balanced; "
                        "default: the profile's, measured by `meshplan calibrate` on your runs)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, framework=None)


def predict_dict(model, layout: Layout, cluster, profile, priced_by: PricedBy,
                 framework: str | None = None,
                 moe_imbalance: float | None = None) -> dict[str, Any]:
    layout.check_against(model, cluster.num_gpus)
    cases = single_case(model, layout, cluster, profile.hardware.get(cluster.accelerator), framework)
    if moe_imbalance is not None:
        if not moe_imbalance >= 1.0:
            raise MeshplanError(f"--moe-imbalance={moe_imbalance}: max / mean expert load is >= 1.0 "
                                "(1.0 = balanced)")
        cases["moe_imbalance"] = np.full(1, float(moe_imbalance))
    out = evaluate(cases, profile)
    v = {k: float(x[0]) for k, x in out.items()}
    unc = profile.uncertainty
    tps_lo, tps_hi = interval(out["tokens_per_sec_per_gpu"], unc.get("throughput"), model.param_count())
    mem_lo, mem_hi = interval(out["peak_memory_gb"], unc.get("memory"))
    tokens_step = layout.global_batch * model.seq_len
    world = cluster.num_gpus
    return {
        "model": model.name, "params": model.param_count(),
        "active_params": model.param_count(active_only=True), "accelerator": cluster.accelerator,
        "gpus": cluster.num_gpus, "layout": layout.to_dict(),
        "memory_gb": {
            "weights": v["mem_weights_gb"], "gradients": v["mem_gradients_gb"],
            "optimizer": v["mem_optimizer_gb"], "activations": v["mem_activations_gb"],
            "buffers": v["mem_buffers_gb"], "overhead": v["mem_overhead_gb"],
            "total": v["peak_memory_gb"], "capacity": v["hbm_gb"],
            "first_stage": v["mem_first_stage_gb"], "last_stage": v["mem_last_stage_gb"],
        },
        "step_time_s": {
            "compute": v["compute_s"], "tp_comm": v["tp_comm_s"], "moe_comm": v["moe_comm_s"],
            "cp_comm": v["cp_comm_s"],
            "pp_bubble": v["pp_bubble_s"], "pp_p2p": v["pp_p2p_s"],
            "dp_comm_total": v["dp_comm_s"], "dp_comm_exposed": v["dp_exposed_s"],
            "optimizer": v["optimizer_s"], "straggler_sync": v["sync_s"], "total": v["step_time_s"],
        },
        "micro_batches_per_step": v["micro_batches"],
        "tokens_per_sec_per_gpu": v["tokens_per_sec_per_gpu"],
        # 80% intervals from the profile's cross-validated residuals (costmodels.uncertainty)
        "tokens_per_sec_per_gpu_interval": [float(tps_lo[0]), float(tps_hi[0])],
        "step_time_s_interval": [tokens_step / world / float(tps_hi[0]), tokens_step / world / float(tps_lo[0])],
        "peak_memory_gb_interval": [float(mem_lo[0]), float(mem_hi[0])],
        "framework": stack_for(framework).name,
        "mfu_pct": v["mfu"] * 100,
        "flops_per_token": v["flops_per_token"],
        "fits_in_memory": v["peak_memory_gb"] <= v["hbm_gb"],
        "profile": profile.source,
        "priced_by": priced_by.to_dict(),
        # this layout under every pipeline schedule: step time, bubble, memory on the first
        # and the last pipeline rank (`planner.schedule_choice`)
        "schedules": compare_schedules(model, layout, cluster, profile, framework,
                                       executor_only=stack_for(framework).name == "meshplan"),
    }


# predict flag -> the plan field it overrides (layout flags are named as Layout's fields)
_LAYOUT_FLAGS = ("tp", "pp", "dp", "cp", "ep", "vpp", "micro_batch", "global_batch", "sharding",
                 "recompute", "sequence_parallel", "schedule")
_PLAN_FIELDS = {**{f: f"layout.{LAYOUT_PLAN_KEYS.get(f, f)}" for f in _LAYOUT_FLAGS},
                "precision": "train.precision", "seq_len": "model.seq_len", "gpus": "cluster.num_gpus",
                "gpus_per_node": "cluster.gpus_per_node"}


def is_plan_file(cfg: dict[str, Any]) -> bool:
    """A plan.yaml (`planner.planfile`), not a free-form model / cluster / layout config."""
    lay = cfg.get("layout")
    return "version" in cfg or "predicted" in cfg or (
        isinstance(lay, dict) and bool({"micro_batch_size", "global_batch_size"} & set(lay)))


def _run_plan(args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    """Price a plan file again: its model, layout, cluster (links included), the profile and
    framework its `predicted` block was computed with; flags override plan fields."""
    if args.model or args.hf_config:
        raise MeshplanError("--config PLAN already names the model; drop --model / --hf-config "
                            "(or override model fields with --seq-len)")
    overrides = [f"{field}={getattr(args, flag)}" for flag, field in _PLAN_FIELDS.items()
                 if getattr(args, flag, None) is not None]
    if args.gpu != "h100-sxm":
        overrides.append(f"cluster.accelerator={args.gpu}")
    overrides += [f"cluster.{k}={v}" for k, v in (("scaleup_gbps", args.nvlink_gbps),
                                                   ("scaleout_gbps", args.nic_gbps)) if v]
    plan = plan_from_dict(cfg, str(args.config), overrides, resize_cluster=True)
    stored = None if args.profile else plan.cost_profile()
    if stored is not None:
        origin = plan.predicted.get("priced_by", {}).get("describe") if isinstance(
            plan.predicted.get("priced_by"), dict) else None
        profile, priced_by = stored, PricedBy("plan", str(args.config), origin)
    else:
        profile, priced_by = resolve_profile(args.profile)
    framework = args.framework or plan.predicted.get("framework") or "meshplan"
    result = predict_dict(plan.model_spec(), plan.layout_spec(), plan.cluster.spec(), profile,
                          priced_by, framework, args.moe_imbalance)
    if "step_time_s" in plan.predicted:
        pred = plan.predicted
        result["plan_predicted"] = {"step_time_s": pred["step_time_s"],
                                    "peak_memory_gb": pred.get("peak_memory_gb")}
        result["matches_plan"] = bool(
            np.isclose(result["step_time_s"]["total"], pred["step_time_s"], rtol=1e-9)
            and np.isclose(result["memory_gb"]["total"], pred.get("peak_memory_gb", np.nan), rtol=1e-9))
    return result


def run(args: argparse.Namespace) -> int:
    cfg = load_yaml_config(args.config)
    if is_plan_file(cfg):
        return _show(_run_plan(args, cfg), args.json)
    model = model_from_args(args, cfg)
    cluster_cfg = cfg.get("cluster", {}) or {}
    if args.gpus is None and "gpus" in cluster_cfg:
        gpus = cluster_cfg["gpus"]
        if isinstance(gpus, bool) or not isinstance(gpus, int):
            raise MeshplanError(f"--config cluster.gpus={gpus!r}: must be an integer >= 1")
        args.gpus = gpus
    if cluster_cfg.get("gpu") and args.gpu == "h100-sxm":
        args.gpu = str(cluster_cfg["gpu"])
    lay: dict[str, Any] = dict(cfg.get("layout", {}) or {})
    for name in (*LAYOUT_FLAGS, "sharding", "recompute", "sequence_parallel", "precision", "schedule"):
        val = getattr(args, name)
        if val is not None:
            lay[name] = val
    for name in LAYOUT_FLAGS:
        v = lay.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            flag = "--" + name.replace("_", "-")
            raise MeshplanError(f"{flag}={v!r}: must be an integer >= 1 (layout.{name})")
    if args.gpus is None:
        args.gpus = int(lay.get("tp", 1)) * int(lay.get("pp", 1)) * int(lay.get("dp", 1)) * int(lay.get("cp", 1))
    cluster = cluster_from_args(args)
    if "dp" not in lay:
        other = int(lay.get("tp", 1)) * int(lay.get("pp", 1)) * int(lay.get("cp", 1))
        if cluster.num_gpus % other:
            raise MeshplanError(f"--gpus={cluster.num_gpus} is not divisible by tp*pp*cp={other}")
        lay["dp"] = cluster.num_gpus // other
    lay.setdefault("global_batch", int(lay.get("micro_batch", 1)) * int(lay["dp"]) * max(1, int(lay.get("pp", 1))))
    layout = Layout.from_dict(lay)
    profile, priced_by = resolve_profile(args.profile)
    return _show(predict_dict(model, layout, cluster, profile, priced_by,
                              args.framework or "meshplan", args.moe_imbalance), args.json)


def _show(result: dict[str, Any], as_json: bool) -> int:
    if as_json:
        print(json.dumps(result, indent=2))
    else:
        print_prediction(result)
    return 0
