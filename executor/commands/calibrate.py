"""`meshplan calibrate`: fit the cost model's profile on measured runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from costmodels.errors import MeshplanError
from costmodels.profile import dump_profile
from planner.profiles import load_profile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit the cost-model profile on measured runs (or run the local loop)")
    p.add_argument("runs", nargs="*", help="run directories written by `meshplan run` (and/or --log)")
    p.add_argument("--published", help="also report cross-validated accuracy on a published-runs CSV "
                                       "(and fit on it jointly with --fit-published)")
    p.add_argument("--fit-published", action="store_true", help="refit GPU parameters on --published first")
    p.add_argument("--profile", help="profile to start from (default: the shipped one)")
    p.add_argument("--out", help="write the fitted profile YAML here")
    p.add_argument("--chart", help="write a predicted-vs-measured PNG here")
    p.add_argument("--local-loop", action="store_true",
                   help="bench -> run several layouts here -> fit on some -> predict the held-out ones")
    p.add_argument("--workdir", default="runs/calibration", help="where --local-loop writes runs")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per --local-loop run (default: executor.calibration_loop.LOOP_STEPS)")
    p.add_argument("--loop-runs", default="",
                   help="comma-separated names of the --local-loop layouts to run (default: all; "
                        "see executor.calibration_loop.LOOP_RUNS)")
    g = p.add_argument_group("training logs of other frameworks")
    g.add_argument("--log", action="append", default=[], metavar="FILE",
                   help="a Megatron / torchtitan / DeepSpeed / NeMo training log (repeatable)")
    g.add_argument("--framework", choices=["megatron", "torchtitan", "deepspeed", "nemo"],
                   help="the log's format (default: detected from its lines)")
    g.add_argument("--plan", action="append", default=[], metavar="PLAN",
                   help="the plan.yaml each --log ran (one for all, or one per --log)")
    g.add_argument("--model", help="without --plan: the model preset the log trained")
    g.add_argument("--gpu", default="h100-sxm", help="without --plan: accelerator key")
    g.add_argument("--gpus", type=int, help="without --plan: GPU count")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--seq-len", type=int)
    for dim in ("tp", "pp", "cp", "vpp"):
        g.add_argument(f"--{dim}", type=int, default=1)
    g.add_argument("--micro-batch", type=int, default=1)
    g.add_argument("--global-batch", type=int, help="without --plan: sequences per step")
    g.add_argument("--sharding", choices=["none", "zero1", "zero2", "zero3"], default="none")
    g.add_argument("--recompute", choices=["none", "selective", "full"], default="none")
    g.add_argument("--precision", choices=["bf16", "fp8", "fp16", "fp32"], default="bf16")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def plans_for_logs(args: argparse.Namespace):
    """The plan each --log ran: --plan files (one shared, or one per log), else one plan
    built from the layout flags."""
    from planner.planfile import load_plan, plan_from_dict

    if args.plan:
        if len(args.plan) not in (1, len(args.log)):
            raise MeshplanError(f"--plan given {len(args.plan)} times for {len(args.log)} --log files: "
                                "give one plan for all logs, or one per log")
        plans = [load_plan(p) for p in args.plan]
        return plans * len(args.log) if len(plans) == 1 else plans
    if not (args.model and args.gpus and args.global_batch):
        raise MeshplanError("--log needs the layout it ran: --plan PLAN.yaml, or --model, --gpus "
                            "and --global-batch (with --tp/--pp/--cp/--micro-batch/--sharding ...)")
    from costmodels.presets import get_preset

    spec = get_preset(args.model)
    if args.seq_len:
        spec = spec.with_(seq_len=args.seq_len)
    other = args.tp * args.pp * args.cp
    if args.gpus % other:
        raise MeshplanError(f"--gpus={args.gpus} is not divisible by tp*pp*cp={other}")
    per_node = min(args.gpus_per_node, args.gpus)
    plan = plan_from_dict({
        "model": spec.to_dict(),
        "cluster": {"accelerator": args.gpu, "num_gpus": args.gpus, "gpus_per_node": per_node,
                    "num_nodes": max(1, args.gpus // per_node)},
        "layout": {"tp": args.tp, "pp": args.pp, "cp": args.cp, "vpp": args.vpp, "dp": args.gpus // other,
                   "micro_batch_size": args.micro_batch, "global_batch_size": args.global_batch,
                   "sharding": args.sharding, "recompute": args.recompute,
                   "sequence_parallel": args.tp > 1},
        "train": {"precision": args.precision},
    }, "flags")
    return [plan] * len(args.log)


def run(args: argparse.Namespace) -> int:
    from planner.atomic import atomic_write_text

    if args.local_loop:
        from executor.calibration_loop import LOOP_STEPS, local_loop, select_runs
        from executor.dir_lock import dir_lock

        say = (lambda m: print(m, file=sys.stderr)) if args.json else print
        names = [n.strip() for n in args.loop_runs.split(",") if n.strip()] or None
        select_runs(names)  # a bad --loop-runs fails before the workdir is touched
        with dir_lock(args.workdir, "--workdir"):
            res = local_loop(args.workdir, steps=args.steps or LOOP_STEPS, progress=say,
                             runs=names)
        if args.out:
            atomic_write_text(Path(args.out), Path(res["profile_path"]).read_text())
        if args.json:
            print(json.dumps(res))
        else:
            _print_loop(res)
        return 0
    if not args.runs and not args.published and not args.log:
        raise MeshplanError("give run directories, --log FILE, --published FILE.csv, or --local-loop")
    base = load_profile(args.profile)
    out: dict = {}
    if args.published and args.fit_published:
        from planner.calibration.published import fit_on_runs
        from planner.calibration.runs_table import read_runs

        base = fit_on_runs(read_runs(args.published), base, source=f"fitted on {Path(args.published).name}")
    if args.runs or args.log:
        from planner.calibration.measured_runs import calibrate_runs, chart, run_from_log

        logged = [run_from_log(log, plan, args.framework)
                  for log, plan in zip(args.log, plans_for_logs(args) if args.log else [], strict=True)]
        source = "calibrated on " + ", ".join([*(Path(r).name for r in args.runs),
                                                *(f"{r.name} ({r.framework})" for r in logged)])
        cal = calibrate_runs(args.runs, base, source=source, logged=logged)
        base = cal.profile
        out["runs"] = cal.rows
        out["unusable"] = cal.unusable
        out["fitted_params"] = cal.params
        out["median_ape_before_pct"] = cal.median_ape("before_ape_pct")
        out["median_ape_after_pct"] = cal.median_ape("after_ape_pct")
        out["median_ape_leave_one_run_out_pct"] = cal.median_ape("loro_ape_pct")
        if args.chart:
            pts = [(r["layout"], r["measured_step_time_s"], r["loro_step_time_s"] or r["after_step_time_s"]) for r in cal.rows]
            out["chart"] = str(chart(pts, args.chart, "predicted (leave-one-run-out) vs measured"))
    if args.published:
        from planner.calibration.measured_runs import published_cv_report

        out["published"] = published_cv_report(args.published, base)
    if args.out:
        atomic_write_text(Path(args.out), dump_profile(base))
        out["profile_path"] = args.out
    if args.json:
        print(json.dumps(out))
        return 0
    for k, v in out.get("unusable", {}).items():
        print(f"unusable run {k}: {v}")
    for r in out.get("runs", []):
        loro = "" if r["loro_ape_pct"] is None else f"  leave-one-out {r['loro_step_time_s']:.3f}s ({r['loro_ape_pct']:.1f}%)"
        print(f"{r['run']:24} {r['layout']:18} measured {r['measured_step_time_s']:.3f}s  before "
              f"{r['before_step_time_s']:.3f}s ({r['before_ape_pct']:.1f}%)  after {r['after_step_time_s']:.3f}s "
              f"({r['after_ape_pct']:.1f}%){loro}")
    if "published" in out:
        s = out["published"]["summary"]
        print(f"published runs, cross-validated halves: MAPE {s['mape_pct']}% (dense {s['dense_mape_pct']}%)")
        for row in out["published"]["by_gpu"]:
            print(f"  {row['gpu']:22} n={row['n']:3}  MAPE {row['mape_pct']}%")
        for row in out["published"]["by_source"]:
            print(f"  {row['source_id']:34} n={row['n']:3}  MAPE {row['mape_pct']}%")
    if args.out:
        print(f"wrote {args.out}")
    return 0


def _print_loop(res: dict) -> None:
    print(f"calibration loop finished in {res['seconds']:.0f} s; profile {res['profile_path']}, chart {res['chart']}")
    for r in res["fitted_on"]:
        print(f"  fitted   {r['layout']:18} measured {r['measured_step_time_s']:.3f}s  after {r['after_step_time_s']:.3f}s ({r['after_ape_pct']:.1f}%)")
    for h in res["heldout"]:
        print(f"  held out {h['layout']:18} measured {h['measured_step_time_s']:.3f}s  predicted "
              f"{h['predicted_step_time_s']:.3f}s ({h['ape_pct']:.1f}%)  default profile {h['default_profile_step_time_s']:.3f}s "
              f"({h['default_profile_ape_pct']:.1f}%)")
    print(f"held-out median APE {res['median_ape_pct']:.1f}% (default profile {res['default_profile_median_ape_pct']:.1f}%)")
    for k, v in res["failed_runs"].items():
        print(f"  run {k} failed: {v}")
