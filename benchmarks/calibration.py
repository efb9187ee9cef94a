"""Reproduce the calibration reports.

    python benchmarks/calibration.py            # both reports
    python benchmarks/calibration.py --skip-local

1. The local loop on this machine (`meshplan calibrate --local-loop`): bench, fourteen short
   runs (`executor.calibration_loop.LOOP_RUNS`: eight fitted, FSDP2/ZeRO-3, PP=2 and TP=2 with
   sequence parallelism held out, three more checks), fit, and the held-out step-time error
   against the uncalibrated default profile.
2. On published_runs.csv: a profile refitted on a random half, scored on the other half,
   MAPE per GPU type and per source (5 seeds averaged).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.calibration.published import validate_runs  # noqa: E402
from planner.calibration.runs_table import read_runs  # noqa: E402
from planner.profiles import load_profile  # noqa: E402

CSV = ROOT.parent / "shared" / "data" / "published_runs.csv"


def published_report(seeds: int = 5) -> None:
    df = read_runs(CSV)
    frames = []
    for seed in range(seeds):
        v = validate_runs(df, load_profile(machine=False), cross_validated=True, seed=seed)
        t = v.table[["source_id", "gpu", "model_type", "ape_pct"]].copy()
        t["seed"] = seed
        frames.append(t)
    all_ = pd.concat(frames)
    print(f"published runs, profile fitted on a random half and scored on the other ({seeds} seeds):")
    print(f"  all rows MAPE {all_.ape_pct.mean():.2f}%, dense {all_[all_.model_type == 'dense'].ape_pct.mean():.2f}%")
    for by in ("gpu", "source_id"):
        g = all_.groupby(by)["ape_pct"]
        tab = pd.DataFrame({"rows": (g.size() / seeds).astype(int), "cv_mape_pct": g.mean().round(2),
                            "cv_median_ape_pct": g.median().round(2)})
        print(tab.to_string())


def local_report(workdir: str) -> None:
    from executor.calibration_loop import local_loop

    res = local_loop(workdir, progress=lambda m: print("  " + m))
    print(f"local loop ({res['seconds']:.0f} s): fitted on {', '.join(r['layout'] for r in res['fitted_on'])}")
    for h in res["heldout"]:
        print(f"  held out {h['layout']:16} measured {h['measured_step_time_s']:.3f} s  calibrated "
              f"{h['predicted_step_time_s']:.3f} s ({h['ape_pct']:.1f}%)  default {h['default_profile_step_time_s']:.3f} s "
              f"({h['default_profile_ape_pct']:.1f}%)")
    print(f"  held-out median APE: calibrated {res['median_ape_pct']:.1f}%, default {res['default_profile_median_ape_pct']:.1f}%")
    print(f"  chart: {res['chart']}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--skip-local", action="store_true")
    ap.add_argument("--workdir", default="runs/calibration")
    args = ap.parse_args()
    if CSV.exists():
        published_report()
    if not args.skip_local:
        local_report(args.workdir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
