"""`meshplan plan`: search every valid layout for a model on a cluster, rank them, explain
the winner, and (with --out) write plan.yaml plus launch files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from rich.table import Table

from costmodels.errors import MeshplanError
from costmodels.pipeline import BY_NAME, SCHEDULE_NAMES
from costmodels.profile import Profile
from costmodels.specs import RECOMPUTES, SHARDINGS
from costmodels.stacks import stack_for
from planner import datamix
from planner.emitters import write_launch_files
from planner.model_args import (
    add_cluster_args,
    add_framework_arg,
    add_model_args,
    add_old_available_arg,
    cluster_from_args,
    model_from_args,
)
from planner.plan_from_row import TrainChoice, plan_data, steps_for_budget
from planner.planfile import (
    ContinualSection,
    Plan,
    plan_from_dict,
    save_plan,
)
from planner.profiles import PricedBy, resolve_profile
from planner.ranking_report import explain_runner_ups, row_layout_fields, top_json, trial_runs
from planner.render import console
from planner.schedule_advice import parse_count
from planner.schedule_choice import compare_schedules, why_schedule
from planner.search import SearchResult, SearchSpace, search


def _csv_choice(text: str, allowed: tuple[str, ...], flag: str) -> tuple[str, ...]:
    vals = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [v for v in vals if v not in allowed]
    if bad or not vals:
        raise MeshplanError(f"{flag}={text!r}: choose from {', '.join(allowed)} (comma-separated)")
    return vals


def _csv_ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise MeshplanError(f"{flag}={text!r}: expected comma-separated integers, e.g. 1,2,4") from None
    if not vals or min(vals) < 1:
        raise MeshplanError(f"{flag}={text!r}: expected positive integers")
    return vals


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="search layouts for a model on a cluster; write plan.yaml + launch files")
    add_model_args(p)
    add_cluster_args(p)
    g = p.add_argument_group("batch and training")
    g.add_argument("--global-batch-tokens", help="tokens per optimizer step (e.g. 4M, 16M, 4096)")
    g.add_argument("--global-batch", type=int, help="sequences per optimizer step (instead of tokens)")
    g.add_argument("--train-tokens", help="total training tokens (default: 20 x params, Chinchilla)")
    g.add_argument("--steps", type=int, help="optimizer steps (overrides --train-tokens)")
    g.add_argument("--objective", choices=["clm", "mlm", "fim"], default="clm")
    g.add_argument("--lr", type=float, help="peak LR (default: recommended by model size)")
    g.add_argument("--schedule", choices=["cosine", "wsd", "constant"], help="LR schedule (default: recommended)")
    g.add_argument("--precision", choices=["bf16", "fp8", "fp16", "fp32"], default="bf16")
    add_framework_arg(p)
    c = p.add_argument_group("search constraints")
    c.add_argument("--max-tp", type=int, default=0, help="largest TP degree (default: the NVLink domain)")
    c.add_argument("--tp-across-nodes", action="store_true", help="allow TP groups to span nodes")
    cp = c.add_mutually_exclusive_group()
    cp.add_argument("--allow-cp", dest="allow_cp", action="store_true", default=None,
                    help="search context parallelism (default: only from 16K tokens)")
    cp.add_argument("--no-cp", dest="allow_cp", action="store_false")
    c.add_argument("--sharding", default=",".join(SHARDINGS), help="ZeRO stages to consider, e.g. zero1,zero3")
    c.add_argument("--recompute", default=",".join(RECOMPUTES), help="recompute modes to consider")
    c.add_argument("--micro-batches", default="1,2,3,4,5,6,8,10,12,16,20,24,32")
    c.add_argument("--loss-chunks", type=int, default=1,
                   help="cross entropy in this many sequence chunks, each recomputed in backward: "
                        "the last stage holds 1/N of the logits (layout.loss_chunks; default 1)")
    c.add_argument("--max-pp", type=int, default=128)
    c.add_argument("--no-hsdp", action="store_true", help="do not search sharding-group sizes")
    c.add_argument("--headroom", type=float, default=0.05, help="share of HBM kept free (default 0.05)")
    c.add_argument("--engine", choices=["torch", "deepspeed"], default="torch")
    c.add_argument("--any-framework", action="store_true",
                   help="rank every layout, also those meshplan's executor cannot run (a plan "
                        "for Megatron, torchtitan, ...), without the executor's contract or the target stack's "
                        "(costmodels.stack_contracts)")
    k = p.add_argument_group("continual pretraining (written to the plan's continual: section)")
    k.add_argument("--init-from", metavar="PATH",
                   help="start from this checkpoint: a meshplan run / step_N folder, or a "
                        "Hugging Face folder with config.json + model.safetensors")
    k.add_argument("--mixture", metavar="D=W,...",
                   help="the (new) data mixture, e.g. code=1 (written to data.mixture)")
    k.add_argument("--replay", type=float, default=None, metavar="F",
                   help="share of rows replayed from the old mixture, e.g. 0.15")
    k.add_argument("--replay-mixture", metavar="D=W,...",
                   help="the old run's mixture replay draws from, e.g. english=1")
    k.add_argument("--lr-fraction", type=float, default=None, metavar="F",
                   help="peak LR as a fraction of the original (re-warmed), e.g. 0.3")
    k.add_argument("--ewc-lambda", type=float, default=None, metavar="L",
                   help="elastic weight consolidation strength (0 = off)")
    k.add_argument("--ewc-fisher-batches", type=int, default=None, metavar="N",
                   help="old-data batches for the EWC Fisher estimate (default 8)")
    k.add_argument("--branch-step", type=int, default=None, metavar="N",
                   help="WSD: branch from the stable checkpoint of --init-from at step N")
    k.add_argument("--decay-steps", type=int, default=None, metavar="D",
                   help="WSD branch: decay for D steps after --branch-step")
    k.add_argument("--new-available", metavar="D=T,...",
                   help="unique tokens per new domain, e.g. code=30B (for epochs)")
    add_old_available_arg(k, "english=2T")
    o = p.add_argument_group("output")
    o.add_argument("--rank-by", choices=["throughput", "memory"], default="throughput")
    o.add_argument("--top", type=int, default=10)
    o.add_argument("--profile", help="calibration profile YAML (default: the shipped one)")
    o.add_argument("--out", help="write DIR/plan.yaml and the launch files there")
    o.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="dotted override applied to the written plan, e.g. train.max_steps=40")
    o.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def global_batch_from(args: argparse.Namespace, seq_len: int, gpus: int) -> tuple[int, str | None]:
    """Sequences per step. A token count that is not a whole number of sequences, or not a
    multiple of the GPU count's power-of-two part, is snapped to the nearest such batch
    within 5% (16M tokens at 8K -> 1953.1 sequences -> 2048), and the change is reported."""
    if args.global_batch is not None:
        if args.global_batch < 1:
            raise MeshplanError(f"--global-batch={args.global_batch} must be >= 1")
        return args.global_batch, None
    if not args.global_batch_tokens:
        raise MeshplanError("pass --global-batch-tokens (e.g. 4M) or --global-batch (sequences)")
    tokens = parse_count(args.global_batch_tokens, "--global-batch-tokens")
    exact = tokens / seq_len
    if exact < 1:
        raise MeshplanError(
            f"--global-batch-tokens={args.global_batch_tokens} is less than one sequence of {seq_len} tokens"
        )
    unit = 1
    while gpus % (unit * 2) == 0 and unit * 2 <= exact * 1.05:
        unit *= 2
    snapped = max(unit, round(exact / unit) * unit)
    if abs(snapped / exact - 1) <= 0.05:
        note = None if snapped == exact else (
            f"global batch {exact:g} sequences rounded to {snapped} (a multiple of {unit})")
        return int(snapped), note
    gbs = max(1, round(exact))
    return gbs, (None if gbs == exact else f"global batch {exact:g} sequences rounded to {gbs}")


def _steps(res: SearchResult, args: argparse.Namespace) -> int:
    if args.steps:
        return int(args.steps)
    tokens = parse_count(args.train_tokens, "--train-tokens") if args.train_tokens else None
    return steps_for_budget(res.model, res.global_batch, tokens)


def _is_continual(args: argparse.Namespace) -> bool:
    return any(getattr(args, k, None) is not None for k in (
        "init_from", "replay", "replay_mixture", "lr_fraction", "ewc_lambda",
        "ewc_fisher_batches", "branch_step", "decay_steps", "new_available", "old_available"))


def continual_section(args: argparse.Namespace) -> dict[str, Any]:
    """The plan's `continual:` section from the flags (only those given)."""
    if not args.init_from:
        raise MeshplanError("continual flags need --init-from PATH (the checkpoint to continue)")
    sec: dict[str, Any] = {"init_from": args.init_from}
    if args.replay is not None:
        sec["replay_fraction"] = args.replay
    if args.replay_mixture:
        sec["replay_mixture"] = datamix.parse_mixture(args.replay_mixture)
    for flag, key in (("lr_fraction", "lr_fraction"), ("ewc_lambda", "ewc_lambda"),
                      ("ewc_fisher_batches", "ewc_fisher_batches"),
                      ("branch_step", "branch_step"), ("decay_steps", "decay_steps")):
        if getattr(args, flag) is not None:
            sec[key] = getattr(args, flag)
    try:
        ContinualSection.model_validate(sec).check()
    except ValidationError as exc:
        err = exc.errors()[0]
        key = str(err["loc"][0]) if err["loc"] else "init_from"
        flag = "--replay" if key == "replay_fraction" else "--" + key.replace("_", "-")
        raise MeshplanError(f"{flag}: {err['msg']}") from None
    return sec


def continual_summary(res: SearchResult, args: argparse.Namespace) -> dict[str, Any]:
    """New-domain and replay tokens of the run, their epochs, FLOPs and predicted hours."""
    model = res.model
    tokens_per_step = res.global_batch * model.seq_len
    steps = args.decay_steps if args.branch_step is not None and args.decay_steps else _steps(
        res, args)
    new_mix = datamix.parse_mixture(args.mixture) if args.mixture else {"code": 0.5, "english": 0.5}
    old_mix = datamix.parse_mixture(args.replay_mixture) if args.replay_mixture else {}
    replay = args.replay or 0.0
    if replay > 0 and not old_mix:
        raise MeshplanError("--replay needs --replay-mixture (the old run's weights, e.g. "
                            "english=1) to size the replay tokens")
    cp = datamix.plan_continual(
        float(model.param_count()), float(steps * tokens_per_step), new_mix, replay, old_mix,
        datamix.parse_available(args.new_available) if args.new_available else None,
        datamix.parse_available(args.old_available) if args.old_available else None,
    )
    out = cp.to_dict()
    best = res.ranked.iloc[0]
    step_s = float(best.step_time_s)
    out["steps"] = int(steps)
    out["hours"] = step_s * steps / 3600
    out["new_hours"] = out["hours"] * (1 - replay)
    out["replay_hours"] = out["hours"] * replay
    return out


def build_plan(res: SearchResult, args: argparse.Namespace, profile: Profile,
               priced_by: PricedBy) -> Plan:
    """The winner's plan, priced with the profile the search used."""
    train = TrainChoice(steps=_steps(res, args), objective=args.objective, lr=args.lr,
                        schedule=args.schedule)
    data = plan_data(res.model, res.cluster, res.ranked.iloc[0], res.global_batch, args.precision,
                     train, profile, priced_by, args.framework, args.engine,
                     res.candidates_evaluated)
    if getattr(args, "mixture", None):
        data["data"] = {"mixture": datamix.parse_mixture(args.mixture)}
    if _is_continual(args):
        data["continual"] = continual_section(args)
    return plan_from_dict(data, "plan", args.override)


def run(args: argparse.Namespace) -> int:
    model = model_from_args(args)
    cluster = cluster_from_args(args)
    if args.top < 1:
        raise MeshplanError(f"--top={args.top} must be >= 1")
    if args.override and not args.out:
        raise MeshplanError("--override changes the written plan: pass --out DIR as well")
    if not 0 <= args.headroom < 1:
        raise MeshplanError(f"--headroom={args.headroom} must be in [0, 1)")
    gbs, batch_note = global_batch_from(args, model.seq_len, cluster.num_gpus)
    if args.loss_chunks < 1:
        raise MeshplanError(f"--loss-chunks {args.loss_chunks}: must be >= 1 (1 = the whole sequence)")
    if args.loss_chunks > 1 and (args.any_framework or args.framework != "meshplan"):
        other = "--any-framework" if args.any_framework else f"--framework {args.framework}"
        raise MeshplanError(f"--loss-chunks {args.loss_chunks}: only meshplan's executor chunks the "
                            f"loss; drop it for {other}")
    space = SearchSpace(
        max_tp=args.max_tp, tp_across_nodes=args.tp_across_nodes, allow_cp=args.allow_cp,
        max_pp=args.max_pp, micro_batches=_csv_ints(args.micro_batches, "--micro-batches"),
        shardings=_csv_choice(args.sharding, SHARDINGS, "--sharding"),
        recomputes=_csv_choice(args.recompute, RECOMPUTES, "--recompute"),
        hsdp=not args.no_hsdp, precision=args.precision, memory_headroom=args.headroom,
        framework=args.framework, engine=args.engine,
        # the schedules the target stack runs (`costmodels.stacks`; Megatron-LM: 1F1B, interleaved)
        schedules=tuple(stack_for(args.framework).pipeline_schedules),
        executor_only=not args.any_framework and args.framework == "meshplan",
        stack_contract=not args.any_framework, loss_chunks=args.loss_chunks,
    )
    profile, priced_by = resolve_profile(args.profile)
    res = search(model, cluster, gbs, profile, space, args.top, args.rank_by)
    notes = ([batch_note] if batch_note else []) + res.notes
    winner = res.layout(0)
    by_schedule = compare_schedules(model, winner, cluster, profile, args.framework, space.executor_only)
    out: dict[str, Any] = {
        "model": model.name, "params": model.param_count(), "accelerator": cluster.accelerator,
        "gpus": cluster.num_gpus, "seq_len": model.seq_len, "global_batch_size": gbs,
        "global_batch_tokens": gbs * model.seq_len,
        "candidates_evaluated": res.candidates_evaluated,
        "search_seconds": round(res.search_seconds, 4),
        "top": top_json(res),
        "schedules_evaluated": sorted(res.schedules_evaluated, key=SCHEDULE_NAMES.index),
        "schedule_candidates": res.schedules_evaluated,
        "schedules_not_admitted": {name: f"no candidate layout has {BY_NAME[name].needs}"
                                   for name, n in res.schedules_evaluated.items() if n == 0},
        # the winner under each pipeline schedule, the rest of its layout held fixed
        "winner_schedules": by_schedule,
        "schedule_choice": why_schedule(by_schedule, winner.effective_schedule) if by_schedule
        else "the winner has no pipeline (pp=1): the schedule does not apply",
        "pareto": [
            {**row_layout_fields(res, r),
             "predicted_peak_memory_gb": round(float(r.peak_memory_gb), 3),
             "predicted_tokens_per_sec_per_gpu": round(float(r.tokens_per_sec_per_gpu), 3)}
            for _, r in res.pareto.iterrows()
        ],
        "why_not_runner_ups": explain_runner_ups(res),
        "framework": args.framework,
        "ranked_for": "meshplan-executor" if space.executor_only else "any-framework",
        "trial_runs_to_separate": trial_runs(res, str(Path(args.out) / "plan.yaml") if args.out else "PLAN"),
        "notes": notes,
        "priced_by": priced_by.to_dict(),
    }
    if _is_continual(args):
        continual_section(args)  # flag errors before any file is written
        out["continual"] = continual_summary(res, args)
    if args.out:
        plan = build_plan(res, args, profile, priced_by)
        plan_path = save_plan(plan, Path(args.out) / "plan.yaml")
        files = write_launch_files(plan, args.out)
        out["plan_path"] = str(plan_path)
        out["launch_files"] = [str(f) for f in files]
    if args.json:
        print(json.dumps(out))
    else:
        _print(out)
    return 0


def _print(out: dict[str, Any]) -> None:
    console.print(
        f"[bold]{out['model']}[/] ({out['params'] / 1e9:.2f} B) on {out['gpus']} x {out['accelerator']}, "
        f"seq {out['seq_len']}, global batch {out['global_batch_size']} sequences "
        f"({out['global_batch_tokens'] / 1e6:.2f} M tokens): {out['candidates_evaluated']:,} candidates "
        f"in {out['search_seconds']:.3f} s"
    )
    t = Table(title="Ranked layouts")
    for col in ("#", "tp", "pp", "dp", "cp", "ep", "vpp", "ZeRO", "shard", "mbs", "recompute", "sp",
                "tokens/s/GPU", "MFU %", "mem GB", "step s"):
        t.add_column(col, justify="right")
    for i, r in enumerate(out["top"], 1):
        rc = r["recompute"] + (f" ({r['recompute_layers']})" if r["recompute_layers"] else "")
        t.add_row(str(i), str(r["tp"]), str(r["pp"]), str(r["dp"]), str(r["cp"]), str(r.get("ep", 1)), str(r["vpp"]),
                  r["sharding"], str(r["dp_shard"] or "all"), str(r["micro_batch_size"]), rc,
                  "y" if r["sequence_parallel"] else "", f"{r['predicted_tokens_per_sec_per_gpu']:.1f}",
                  f"{r['predicted_mfu_pct']:.1f}", f"{r['predicted_peak_memory_gb']:.1f}",
                  f"{r['predicted_step_time_s']:.3f}")
    console.print(t)
    w = out["top"][0]
    console.print("winner's step time: " + ", ".join(
        f"{k} {v:.3g}s" for k, v in w["breakdown_s"].items() if v > 0))
    for line in out["why_not_runner_ups"]:
        console.print("  " + line)
    console.print(f"pipeline schedule: {out['schedule_choice']}")
    console.print(f"memory/throughput Pareto front: {len(out['pareto'])} layouts")
    console.print(f"priced by: {out['priced_by']['describe']}")
    for n in out["notes"]:
        console.print(f"[dim]{n}[/]")
    if "continual" in out:
        from planner.commands.size_render import human

        c = out["continual"]
        console.print(
            f"[bold]continual[/]: {c['steps']:,} steps = {human(c['total_tokens'])} tokens: "
            f"new {human(c['new_tokens'])} ({c['new_flops']:.3g} FLOPs), replay "
            f"{human(c['replay_tokens'])} ({c['replay_flops']:.3g} FLOPs), "
            f"~{c['hours']:.3g} h predicted"
        )
        for part in ("new", "replay"):
            for row in c[part]["domains"]:
                ep = "-" if row["epochs"] is None else f"{row['epochs']:.2f} epochs"
                console.print(f"  {part:6s} {row['domain']}: {human(row['tokens'])} tokens, {ep}")
        for w in c["warnings"]:
            console.print(f"[yellow]warning:[/] {w}")
    if "plan_path" in out:
        console.print(f"wrote {out['plan_path']} and {', '.join(Path(f).name for f in out['launch_files'])}")
