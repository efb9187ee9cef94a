"""Measured against predicted pipeline bubble on this machine: the `small` preset (8
layers) at pp4 on gloo, schedules 1F1B, ZB-V and DualPipe-V at m = 4 and m = 8 micro-batches
per step. Measured: `pp_bubble_share` in metrics.jsonl (the executor's idle time in the
schedule over the step time, mean over ranks and over the steps after the first two).
Predicted: the run's `pipeline.predicted_bubble_share` (summary.json): the cost model's
F / B / W per micro-batch for this host, through the schedule's own action order,
time-shared over the host's cores (`executor.parallel.pp.PipelineStrategy.predicted_pipeline`).
The host is measured first (`meshplan bench --quick --world 4` into a private machine profile).

    python benchmarks/pipeline_bubble.py [--steps 8] [--seq-len 128] [--out DIR]

Writes DIR/bubble.json and prints one line per run. Each run is `meshplan run` under
torchrun with 4 processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from costmodels.capabilities import unsupported
from costmodels.errors import MeshplanError
from costmodels.presets import PRESETS
from planner.planfile import plan_from_dict, save_plan

RUNS = [("1f1b", 4), ("zbv", 4), ("dualpipev", 4), ("1f1b", 8), ("zbv", 8), ("dualpipev", 8)]


def plan_for(schedule: str, m: int, seq: int, steps: int):
    spec = PRESETS["small"].with_(seq_len=seq)
    return plan_from_dict({
        "model": spec.to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": 4},
        "layout": {"pp": 4, "schedule": schedule, "micro_batch_size": 1, "global_batch_size": m},
        "train": {"precision": "fp32", "max_steps": steps, "warmup_steps": 0, "lr": 1e-3},
        "checkpoint": {"every": 0},
    })


def pipeline_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())["pipeline"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out_dir = Path(args.out or tempfile.mkdtemp(prefix="bubble-"))
    env = {**os.environ, "MESHPLAN_COMM_ACCOUNTING": "1",
           "MESHPLAN_MACHINE_PROFILE": str(out_dir / "machine.yaml")}
    subprocess.run([sys.executable, "-m", "planner.cli", "bench", "--quick", "--world", "4"], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    rows = []
    for schedule, m in RUNS:
        try:
            plan = plan_for(schedule, m, args.seq_len, args.steps)
            why = unsupported(plan.model_spec(), plan.layout_spec())
        except MeshplanError as exc:
            why = str(exc)
        row = {"schedule": schedule, "micro_batches": m}
        if why:
            row["refused"] = why
            print(f"{schedule:10s} m={m}: refused: {why}", flush=True)
            rows.append(row)
            continue
        d = out_dir / f"{schedule}-m{m}"
        save_plan(plan, d / "plan.yaml")
        subprocess.run([sys.executable, "-m", "planner.cli", "run", str(d / "plan.yaml"), "--out", str(d / "run"),
                        "--no-progress"], check=True, env=env, stdout=subprocess.DEVNULL)
        rec = pipeline_record(d / "run")
        row.update(measured=rec["measured_bubble_share"], predicted=rec["predicted_bubble_share"],
                   measured_idle_s=rec["measured_idle_s"], predicted_idle_s=rec["predicted_idle_s"])
        print(f"{schedule:10s} m={m}: measured {100 * row['measured']:.1f}% predicted "
              f"{100 * row['predicted']:.1f}%", flush=True)
        rows.append(row)
    (out_dir / "bubble.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out_dir / 'bubble.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
