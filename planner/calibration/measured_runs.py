"""Calibrate the cost model on measured runs: read run directories written by `meshplan run`,
predict each with the current profile, fit the profile's free parameters with scipy least
squares, and report errors out of sample (leave-one-run-out) so no run is scored by a fit
that saw it.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from costmodels.cases import Cases, build_cases, concat_cases, layout_columns
from costmodels.errors import MeshplanError
from costmodels.fit import cross_validate, fit_throughput
from costmodels.hardware import at_host_speed
from costmodels.profile import Profile
from costmodels.steptime import evaluate
from planner.planfile import Plan, load_plan
from planner.run_records import read_records

WARMUP_STEPS = 3  # first steps include allocator growth and lazy init: not steady state
# With few runs only the parameters a CPU run can identify are fitted; the rest keep the
# base profile's values (fitting 9 parameters to 4 runs would just memorise them).
FEW_RUNS_FIXED = ("attn_eff", "dp_overlap", "elementwise_eff")


@dataclass
class MeasuredRun:
    name: str
    path: Path
    plan: Plan
    step_time_s: float
    steps_used: int
    peak_memory_gb: float | None
    cpu_threads: int | None = None  # threads per rank the run used (CPU runs)
    moe_imbalance: float | None = None  # median logged max / mean expert load (MoE runs)
    framework: str = "meshplan"  # the training stack that ran it (`costmodels.stacks`)
    # median of the steps' host-speed probes (`train.host_probe`; CPU runs), fp32 TFLOP/s:
    # `run_cases` prices the run at that speed
    host_fp32_tflops: float | None = None

    @property
    def tokens_per_sec_per_gpu(self) -> float:
        lay = self.plan.layout
        return lay.global_batch_size * self.plan.model["seq_len"] / self.step_time_s / lay.world_size

    def layout_label(self) -> str:
        lay = self.plan.layout
        parts = [f"{k}{getattr(lay, k)}" for k in ("dp", "tp", "pp", "cp") if getattr(lay, k) > 1]
        if lay.tp > 1 and lay.sequence_parallel:
            parts.append("sp")
        if lay.sharding != "none":
            parts.append(lay.sharding)
        if lay.engine != "torch":
            parts.append(lay.engine)
        return ("+".join(parts) or "single") + f" mbs{lay.micro_batch_size}"


def load_run(path: str | Path) -> MeasuredRun:
    """A run directory's plan and its steady-state step time; one-line error if unusable."""
    p = Path(path)
    if not p.is_dir():
        raise MeshplanError(f"{p}: not a run directory")
    plan = load_plan(p / "plan.yaml")
    metrics = p / "metrics.jsonl"
    if not metrics.is_file():
        raise MeshplanError(f"{p}: no metrics.jsonl (the run never logged a step)")
    times: list[float] = []
    imbalance: list[float] = []
    probes: list[float] = []
    for rec in read_records(metrics):
        if rec.get("skipped") or int(rec.get("step", 0)) <= WARMUP_STEPS:
            continue
        t = rec.get("step_time_s")
        if isinstance(t, int | float) and t > 0:
            times.append(float(t))
        imb = rec.get("moe_imbalance")
        if isinstance(imb, int | float) and imb >= 1.0:
            imbalance.append(float(imb))
        probe = rec.get("host_fp32_tflops")
        if isinstance(probe, int | float) and probe > 0:
            probes.append(float(probe))
    if len(times) < 2:
        raise MeshplanError(f"{p}: fewer than 2 steady-state steps after warm-up to measure")
    peak, threads = None, None
    summary = p / "summary.json"
    if summary.is_file():
        try:
            s = json.loads(summary.read_text())
            if s.get("peak_memory_bytes"):
                peak = float(s["peak_memory_bytes"]) / 1e9
            if isinstance(s.get("cpu_threads"), int) and s["cpu_threads"] > 0:
                threads = s["cpu_threads"]
        except (json.JSONDecodeError, TypeError, ValueError, AttributeError):
            peak, threads = None, None
    return MeasuredRun(p.name, p, plan, statistics.median(times), len(times), peak, threads,
                       statistics.median(imbalance) if imbalance else None,
                       host_fp32_tflops=statistics.median(probes) if probes else None)


def run_cases(runs: list[MeasuredRun], profile: Profile) -> Cases:
    parts = []
    for r in runs:
        c = r.plan.cluster
        cluster = c.spec()
        hw = dict(profile.hardware.get(c.accelerator, {}))
        if c.accelerator == "cpu" and r.cpu_threads:
            hw["threads_per_rank"] = float(r.cpu_threads)  # what the run used, not the default
        hw = at_host_speed(hw, r.host_fp32_tflops)
        case = build_cases(
            r.plan.model_spec(), cluster, layout_columns([r.plan.layout_spec()]),
            r.plan.train.precision, hardware=hw, framework=r.framework,
        )
        # an MoE run is priced at the load imbalance it measured, not the profile's default
        case["moe_imbalance"] = np.full(1, r.moe_imbalance or profile.moe_imbalance)
        parts.append(case)
    return concat_cases(parts)


@dataclass
class Calibration:
    profile: Profile
    rows: list[dict[str, Any]] = field(default_factory=list)
    unusable: dict[str, str] = field(default_factory=dict)
    params: dict[str, float] = field(default_factory=dict)

    def median_ape(self, key: str) -> float | None:
        vals = [r[key] for r in self.rows if r.get(key) is not None]
        return float(np.median(vals)) if vals else None


def _ape(pred: float, meas: float) -> float:
    return abs(pred / meas - 1) * 100


def calibrate_runs(
    paths: list[str | Path], base: Profile, source: str = "calibrated on local runs",
    logged: list[MeasuredRun] | None = None,
) -> Calibration:
    """Fit `base` to the usable runs among `paths` plus `logged` ones (read from other
    frameworks' logs, `run_from_log`); unusable ones are reported and skipped."""
    runs: list[MeasuredRun] = list(logged or [])
    unusable: dict[str, str] = {}
    for p in paths:
        try:
            runs.append(load_run(p))
        except MeshplanError as exc:
            unusable[str(p)] = str(exc)
    if not runs:
        raise MeshplanError("no usable run directories: " + "; ".join(unusable.values()))
    cases = run_cases(runs, base)
    meas_tps = np.array([r.tokens_per_sec_per_gpu for r in runs])
    before = evaluate(cases, base)["step_time_s"]
    fixed = FEW_RUNS_FIXED if len(runs) < 10 else ()
    fit = fit_throughput(cases, meas_tps, base, fixed=fixed, source=source)
    after_all = evaluate(cases, fit.profile)
    after, after_mem = after_all["step_time_s"], after_all["peak_memory_gb"]
    loro = None
    if len(runs) >= 3:
        loro_tps = cross_validate(cases, meas_tps, np.arange(len(runs)), base, fixed)
        loro = meas_tps / loro_tps * np.array([r.step_time_s for r in runs])
    profile = fit.profile
    measured = [r.moe_imbalance for r in runs if r.moe_imbalance is not None]
    if measured:  # the default for layouts not run yet: what this user's routing does
        profile = profile.with_(moe_imbalance=float(np.median(measured)))
    cal = Calibration(profile, unusable=unusable, params=fit.params)
    for i, r in enumerate(runs):
        cal.rows.append({
            "run": r.name, "layout": r.layout_label(), "measured_step_time_s": r.step_time_s,
            "before_step_time_s": float(before[i]), "after_step_time_s": float(after[i]),
            "before_ape_pct": _ape(float(before[i]), r.step_time_s),
            "after_ape_pct": _ape(float(after[i]), r.step_time_s),
            "loro_step_time_s": None if loro is None else float(loro[i]),
            "loro_ape_pct": None if loro is None else _ape(float(loro[i]), r.step_time_s),
            "framework": r.framework,
            "measured_peak_memory_gb": r.peak_memory_gb,
            "predicted_peak_memory_gb": float(after_mem[i]),
        })
    return cal


# framework a log names -> the stack its steps are priced with (`costmodels.stacks`)
LOG_STACKS = {"megatron": "megatron-core", "torchtitan": "torchtitan", "deepspeed": "deepspeed",
              "nemo": "nemo"}


def run_from_log(path: str | Path, plan: Plan, framework: str | None = None) -> MeasuredRun:
    """A measured run from a Megatron / torchtitan / DeepSpeed / NeMo training log and the
    plan (or flags) that give its layout: the median steady-state step time (warm-up steps
    dropped, as for meshplan runs) and the peak memory the log prints."""
    from planner.calibration.framework_logs import read_log

    lay = plan.layout
    logs = read_log(path, framework, tokens_per_step=lay.global_batch_size * plan.model_spec().seq_len,
                    gpus=lay.world_size, samples_per_step=lay.global_batch_size)
    if logs.global_batch_size is not None and logs.global_batch_size != lay.global_batch_size:
        raise MeshplanError(f"--log {path}: its global batch size is {logs.global_batch_size} but "
                            f"the plan's layout.global_batch_size is {lay.global_batch_size}; "
                            "give the plan the log's run used")
    times = logs.steady(WARMUP_STEPS)
    if len(times) < 2:
        raise MeshplanError(f"--log {path}: fewer than 2 logged steps after the first "
                            f"{WARMUP_STEPS} (warm-up); log more steps")
    return MeasuredRun(Path(path).name, Path(path), plan, statistics.median(times), len(times),
                       logs.peak_memory_gb, framework=LOG_STACKS[logs.framework])


def predict_runs(paths: list[str | Path], profile: Profile) -> list[dict[str, Any]]:
    """Predicted vs measured step time of runs the profile was not fitted on."""
    out = []
    for p in paths:
        r = load_run(p)
        pred = float(evaluate(run_cases([r], profile), profile)["step_time_s"][0])
        out.append({"run": r.name, "layout": r.layout_label(), "predicted_step_time_s": pred,
                    "measured_step_time_s": r.step_time_s, "ape_pct": _ape(pred, r.step_time_s)})
    return out


def chart(points: list[tuple[str, float, float]], path: str | Path, title: str) -> Path:
    """Predicted-vs-measured scatter (log-log) with the y = x line, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    meas = [p[1] for p in points]
    pred = [p[2] for p in points]
    lo, hi = min(meas + pred) * 0.8, max(meas + pred) * 1.25
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, label="predicted = measured")
    ax.fill_between([lo, hi], [lo * 0.85, hi * 0.85], [lo * 1.15, hi * 1.15], color="grey", alpha=0.15, label="±15%")
    ax.scatter(meas, pred, zorder=3)
    for name, m, pr in points:
        ax.annotate(name, (m, pr), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("measured step time (s)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def published_cv_report(csv: str | Path, profile: Profile, seed: int = 0) -> dict[str, Any]:
    """Cross-validated (random halves) MAPE of `profile` refitted on published runs, by GPU
    and by source."""
    from planner.calibration.published import breakdown, validate_runs
    from planner.calibration.runs_table import read_runs

    df = read_runs(csv)
    v = validate_runs(df, profile, cross_validated=True, seed=seed)
    by_gpu = breakdown(v, ["gpu"]).to_dict(orient="records")
    by_source = breakdown(v, ["source_id"]).to_dict(orient="records")
    return {"summary": v.summary, "by_gpu": by_gpu, "by_source": by_source}
