"""The whole calibration loop on this machine: bench -> short runs of several layouts ->
fit the profile on some of them -> predict the held-out layouts -> report the error, next to
what the uncalibrated default profile predicted for the same held-out runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from costmodels.errors import MeshplanError
from costmodels.presets import get_preset
from planner.calibration.measured_runs import calibrate_runs, chart, predict_runs
from planner.planfile import plan_from_dict, save_plan
from planner.profiles import load_profile


@dataclass(frozen=True)
class LoopRun:
    name: str
    layout: dict[str, Any]
    gpus: int
    held_out: bool
    check: bool = False  # predicted after the fit, reported with the held-out runs' errors


# Fit on one-process runs at a small, a medium and a larger micro-batch and with 8
# accumulated micro-batches (per-step vs per-micro-batch vs per-token cost),
# DDP at two batch sizes (same gradient traffic, twice the compute: separates the two), FSDP2
# (ZeRO-2) and TP; hold out the layouts whose costs the fit never saw directly: ZeRO-3's
# per-layer parameter gathers, the pipeline's bubble and stage imbalance, and sequence
# parallelism's all-gather / reduce-scatter pairs in place of TP's all-reduces. Checks widen
# the unseen set to a large one-process micro-batch, a small multi-rank one and four ranks on
# this host.
LOOP_RUNS = (
    LoopRun("single_mbs2", {"micro_batch_size": 2, "global_batch_size": 2}, 1, False),
    LoopRun("single_mbs8", {"micro_batch_size": 8, "global_batch_size": 8}, 1, False),
    LoopRun("single_mbs16", {"micro_batch_size": 16, "global_batch_size": 16}, 1, False),
    LoopRun("single_mbs2_ga8", {"micro_batch_size": 2, "global_batch_size": 16}, 1, False),
    LoopRun("ddp2", {"dp": 2, "micro_batch_size": 8, "global_batch_size": 16}, 2, False),
    LoopRun("ddp2_mbs16", {"dp": 2, "micro_batch_size": 16, "global_batch_size": 32}, 2, False),
    LoopRun("fsdp2_zero2", {"dp": 2, "sharding": "zero2", "micro_batch_size": 8, "global_batch_size": 16}, 2, False),
    LoopRun("tp2", {"tp": 2, "micro_batch_size": 16, "global_batch_size": 16, "sequence_parallel": False}, 2, False),
    LoopRun("fsdp2_zero3", {"dp": 2, "sharding": "zero3", "micro_batch_size": 8, "global_batch_size": 16}, 2, True),
    LoopRun("pp2", {"pp": 2, "micro_batch_size": 4, "global_batch_size": 16}, 2, True),
    LoopRun("tp2_sp", {"tp": 2, "micro_batch_size": 16, "global_batch_size": 16, "sequence_parallel": True}, 2, True),
    LoopRun("single_mbs32", {"micro_batch_size": 32, "global_batch_size": 32}, 1, False, check=True),
    LoopRun("ddp2_mbs2", {"dp": 2, "micro_batch_size": 2, "global_batch_size": 4}, 2, False, check=True),
    LoopRun("ddp4_mbs4", {"dp": 4, "micro_batch_size": 4, "global_batch_size": 16}, 4, False, check=True),
)
LOOP_STEPS = 12  # per run; the first WARMUP_STEPS are dropped, the median of the rest is used


def _plan_for(run: LoopRun, model: str, seq_len: int, steps: int) -> dict[str, Any]:
    spec = get_preset(model).with_(seq_len=seq_len)
    return {
        "model": spec.to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": run.gpus, "gpus_per_node": 1, "num_nodes": run.gpus},
        "layout": run.layout,
        "train": {"objective": "clm", "max_steps": steps, "precision": "fp32", "lr": 1e-3,
                  "warmup_frac": 0.0, "log_every": 1, "host_probe": True},
        "checkpoint": {"every": 0, "keep": 1},
    }


def _run(plan_path: Path, out: Path, timeout_s: float) -> tuple[bool, str]:
    env = dict(os.environ)  # threads: `meshplan run` splits the cores among the ranks
    proc = subprocess.run(
        [sys.executable, "-m", "planner.cli", "run", str(plan_path), "--out", str(out)],
        capture_output=True, text=True, timeout=timeout_s, env=env,
    )
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
    return proc.returncode == 0, tail[0]


def select_runs(names: list[str] | None) -> tuple[LoopRun, ...]:
    """The loop's runs of these names (all when None), in the loop's order."""
    if names is None:
        return LOOP_RUNS
    known = {r.name for r in LOOP_RUNS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise MeshplanError(f"--loop-runs: unknown run(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    chosen = tuple(r for r in LOOP_RUNS if r.name in names)
    fits = [r for r in chosen if not (r.held_out or r.check)]
    if len(fits) < 2 or not any(r.held_out for r in chosen):
        raise MeshplanError("--loop-runs: choose at least two fitted runs and one held-out run "
                            f"(held out: {', '.join(r.name for r in LOOP_RUNS if r.held_out)})")
    return chosen


def local_loop(
    workdir: str | Path = "runs/calibration", model: str = "tiny", seq_len: int = 128, steps: int = LOOP_STEPS,
    quick_bench: bool = True, progress=print, run_timeout_s: float = 240,
    runs: list[str] | None = None,
) -> dict[str, Any]:
    """`runs`: names of the `LOOP_RUNS` to run (default: all of them)."""
    from executor.bench import run_bench

    selected = select_runs(runs)
    t0 = time.perf_counter()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    progress("bench: GEMMs, memory, gloo collectives")
    bench = run_bench(quick=quick_bench, world=2)
    default = load_profile(machine=False)  # the shipped profile: "before calibration"
    hardware = {**default.hardware, "cpu": bench.hardware_override()}
    measured_base = default.with_(hardware=hardware, source="default + measured cpu hardware")
    fit_dirs, held_dirs, check_dirs, failures = [], [], [], {}
    for r in selected:
        plan = plan_from_dict(_plan_for(r, model, seq_len, steps), f"loop plan {r.name}")
        pdir = work / "plans" / r.name
        save_plan(plan, pdir / "plan.yaml")
        out = work / "runs" / r.name
        if out.exists():
            import shutil

            shutil.rmtree(out)
        progress(f"run {r.name}: {r.gpus} process(es), {steps} steps")
        try:
            ok, msg = _run(pdir / "plan.yaml", out, run_timeout_s)
        except subprocess.TimeoutExpired:
            ok, msg = False, f"timed out after {run_timeout_s:.0f} s"
        if not ok:
            failures[r.name] = msg
            continue
        (check_dirs if r.check else held_dirs if r.held_out else fit_dirs).append(out)
    if len(fit_dirs) < 2 or not held_dirs:
        raise MeshplanError(f"calibration loop: too few runs succeeded ({'; '.join(f'{k}: {v}' for k, v in failures.items())})")
    progress("calibrate on " + ", ".join(d.name for d in fit_dirs))
    cal = calibrate_runs(fit_dirs, measured_base, source="calibrated by meshplan calibrate --local-loop")
    held = predict_runs(held_dirs, cal.profile)
    checks = predict_runs(check_dirs, cal.profile)
    before = predict_runs(held_dirs, default)
    for h, b in zip(held, before, strict=True):
        h["default_profile_step_time_s"] = b["predicted_step_time_s"]
        h["default_profile_ape_pct"] = b["ape_pct"]
    profile_path = work / "profile.yaml"
    from costmodels.profile import dump_profile
    from planner.atomic import atomic_write_text

    atomic_write_text(profile_path, dump_profile(cal.profile))
    pts = [(h["layout"] + " (held out)", h["measured_step_time_s"], h["predicted_step_time_s"]) for h in held + checks]
    pts += [(r["layout"], r["measured_step_time_s"], r["after_step_time_s"]) for r in cal.rows]
    png = chart(pts, work / "predicted_vs_measured.png", "CPU calibration: step time")
    return {
        "heldout": [{k: h[k] for k in ("layout", "predicted_step_time_s", "measured_step_time_s", "ape_pct",
                                        "default_profile_step_time_s", "default_profile_ape_pct")} for h in held],
        "median_ape_pct": float(np.median([h["ape_pct"] for h in held])),
        # Every run the fit did not see: the held-out layouts and the checks (small / large
        # micro-batch, four ranks).
        "checks": [{k: c[k] for k in ("layout", "predicted_step_time_s", "measured_step_time_s", "ape_pct")}
                   for c in checks],
        "unseen_median_ape_pct": float(np.median([h["ape_pct"] for h in held + checks])),
        "unseen_max_ape_pct": float(max(h["ape_pct"] for h in held + checks)),
        "default_profile_median_ape_pct": float(np.median([h["default_profile_ape_pct"] for h in held])),
        "fitted_on": cal.rows,
        "fitted_params": cal.params,
        "failed_runs": failures,
        "bench": bench.hardware_override(),
        "profile_path": str(profile_path),
        "chart": str(png),
        "seconds": time.perf_counter() - t0,
    }


