"""`meshplan calibrate`: fit the cost model's profile on measured runs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from costmodels.errors import MeshplanError
from costmodels.profile import dump_profile, load_profile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="fit the cost-model profile on measured runs (or run the local loop)")
    p.add_argument("runs", nargs="*", help="run directories written by `meshplan run`")
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
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.planfile import atomic_write_text

    if args.local_loop:
        from executor.calibration_loop import LOOP_STEPS, local_loop

        say = (lambda m: print(m, file=sys.stderr)) if args.json else print
        names = [n.strip() for n in args.loop_runs.split(",") if n.strip()] or None
        res = local_loop(args.workdir, steps=args.steps or LOOP_STEPS, progress=say, runs=names)
        if args.out:
            atomic_write_text(Path(args.out), Path(res["profile_path"]).read_text())
        if args.json:
            print(json.dumps(res))
        else:
            _print_loop(res)
        return 0
    if not args.runs and not args.published:
        raise MeshplanError("give run directories, --published FILE.csv, or --local-loop")
    base = load_profile(args.profile)
    out: dict = {}
    if args.published and args.fit_published:
        from planner.runs_table import read_runs
        from planner.validate import fit_on_runs

        base = fit_on_runs(read_runs(args.published), base, source=f"fitted on {Path(args.published).name}")
    if args.runs:
        from executor.calibrate import calibrate_runs, chart

        cal = calibrate_runs(args.runs, base)
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
        from executor.calibrate import published_cv_report

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
