"""`meshplan validate FILE.csv`: predict every measured run and score the cost model."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from planner.calibration.published import NO_MEASUREMENT, breakdown, validate_runs
from planner.calibration.runs_table import read_runs
from planner.profiles import load_profile
from planner.render import console


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="score the cost model against measured runs (CSV)")
    p.add_argument("csv", help="a CSV with the columns of published_runs.csv")
    p.add_argument("--profile", help="calibration profile YAML (default: the shipped one)")
    p.add_argument("--cross-validate", action="store_true",
                   help="score each random half with a profile fitted on the other half")
    p.add_argument("--seed", type=int, default=0, help="seed of the random halves")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    df = read_runs(args.csv)
    # Published runs are scored with the shipped (or given) profile, never this machine's.
    v = validate_runs(df, load_profile(args.profile, machine=False), args.cross_validate, args.seed)
    if args.json:
        print(json.dumps(v.to_json()))
        return 0
    for by in (["source_id", "gpu"], ["model_type"]):
        t = Table(title="Throughput error by " + " / ".join(by))
        bd = breakdown(v, by)
        for col in bd.columns:
            t.add_column(col, justify="right" if col in ("n", "mape_pct", "median_ape_pct") else "left")
        for row in bd.itertuples(index=False):
            t.add_row(*[str(x) for x in row])
        console.print(t)
    s = v.summary
    console.print(
        f"scored {s['n_scored']} rows, skipped {s['n_skipped']}; MAPE {s['mape_pct']}% "
        f"(dense {s['dense_mape_pct']}%), median APE {s['median_ape_pct']}%, within 10%: "
        f"{s['within_10pct_share']:.0%}, within 20%: {s['within_20pct_share']:.0%}; "
        f"peak memory MAPE {s['memory_mape_pct']}% over {s['n_memory_scored']} rows"
        + (" (cross-validated halves)" if s["cross_validated"] else "")
    )
    # Rows the model could not predict (an unknown accelerator or precision, an impossible
    # layout, ...) are named one line each; rows with nothing measured are only counted.
    unmeasured = [r for r in v.rows if r["skipped_reason"] == NO_MEASUREMENT]
    for r in v.rows:
        if r["skipped_reason"] and r["skipped_reason"] != NO_MEASUREMENT:
            print(f"not predicted: {r['run_id']}: {r['skipped_reason']}")
    if unmeasured:
        console.print(f"{len(unmeasured)} row(s) have no measured_tokens_per_sec_per_gpu to score against")
    return 0
