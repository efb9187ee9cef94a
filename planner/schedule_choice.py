"""One layout under every pipeline schedule: which ones it admits, their step time, bubble
and memory on the first and the last pipeline rank, and why the chosen one wins.

`meshplan plan --json` reports this for its winner (`winner_schedules`, `schedule_choice`);
`meshplan predict --json` for the layout it is given (`schedules`).
"""

from __future__ import annotations

from typing import Any

from costmodels import pipeline
from costmodels.capabilities import unsupported
from costmodels.cases import build_cases, layout_columns
from costmodels.profile import Profile
from costmodels.specs import ClusterSpec, Layout, ModelSpec, SpecError
from costmodels.stack_contracts import stack_unsupported
from costmodels.stacks import stack_for
from costmodels.steptime import evaluate


def schedule_vpp(name: str, layout: Layout) -> int:
    """The stages per rank a schedule is tried with: the layout's own for the interleaved
    kinds (two when it has one), two for the V schedules, one otherwise."""
    kind = pipeline.BY_NAME[name]
    if kind.placement == "v":
        return 2
    if kind.multi:
        return layout.vpp if layout.vpp > 1 else 2
    return 1


def _variant(model: ModelSpec, layout: Layout, name: str, framework: str | None,
             executor_only: bool) -> tuple[Layout | None, str]:
    """The layout under schedule `name`, or None and why it cannot run."""
    if name not in stack_for(framework).pipeline_schedules:
        return None, f"{stack_for(framework).name} does not run schedule {name}"
    try:
        lay = layout.with_(schedule=name, vpp=schedule_vpp(name, layout))
        if executor_only:
            why = unsupported(model, lay)
            return (None, why) if why else (lay, "")
        lay.check_against(model)
    except SpecError as exc:
        return None, str(exc)
    why = stack_unsupported(stack_for(framework).name, model, lay)  # Megatron-Core's contract
    if why:
        return None, why
    problem = pipeline.microbatch_problem(lay.schedule, lay.pp, lay.vpp, lay.grad_accum)
    return (None, problem) if problem else (lay, "")


def compare_schedules(model: ModelSpec, layout: Layout, cluster: ClusterSpec, profile: Profile,
                      framework: str | None = None, executor_only: bool = True) -> list[dict[str, Any]]:
    """Every schedule for `layout` (pp > 1; [] otherwise), admissible ones evaluated in one
    batch with the rest of the layout held fixed."""
    if layout.pp == 1:
        return []
    rows: list[dict[str, Any]] = []
    admitted: list[tuple[dict[str, Any], Layout]] = []
    for name in pipeline.SCHEDULE_NAMES:
        lay, why = _variant(model, layout, name, framework, executor_only)
        row: dict[str, Any] = {"schedule": name, "admissible": lay is not None}
        if lay is None:
            row["why_not"] = why
        else:
            row.update(vpp=lay.vpp, stages_per_rank=lay.stages_per_rank)
            admitted.append((row, lay))
        rows.append(row)
    if admitted:
        cases = build_cases(model, cluster, layout_columns([lay for _, lay in admitted]), layout.precision,
                            hardware=profile.hardware.get(cluster.accelerator), framework=framework)
        pred = evaluate(cases, profile)
        for i, (row, _) in enumerate(admitted):
            step, bubble = float(pred["step_time_s"][i]), float(pred["pp_bubble_s"][i])
            peak = float(pred["peak_memory_gb"][i])
            row.update(
                step_time_s=step, pp_bubble_s=bubble, bubble_share=bubble / step,
                tokens_per_sec_per_gpu=float(pred["tokens_per_sec_per_gpu"][i]),
                mem_first_stage_gb=float(pred["mem_first_stage_gb"][i]),
                mem_last_stage_gb=float(pred["mem_last_stage_gb"][i]),
                peak_memory_gb=peak, fits_in_memory=peak <= float(pred["hbm_gb"][i]),
            )
    return rows


def why_schedule(rows: list[dict[str, Any]], chosen: str) -> str:
    """One sentence: the chosen schedule against 1F1B (or the next best), bubble saved
    against memory added, and any faster schedule that does not fit."""
    ok = [r for r in rows if r["admissible"]]
    mine = next((r for r in ok if r["schedule"] == chosen), None)
    if mine is None:
        return f"schedule {chosen}: not evaluated for this layout"
    others = [r for r in ok if r["schedule"] != chosen and r["fits_in_memory"]]
    base = next((r for r in others if r["schedule"] == "1f1b"), None) or (
        min(others, key=lambda r: r["step_time_s"]) if others else None)
    if base is None:
        return f"{chosen}: the only admissible schedule that fits"
    saved = base["pp_bubble_s"] - mine["pp_bubble_s"]
    mem = max(mine["mem_first_stage_gb"], mine["mem_last_stage_gb"]) - max(
        base["mem_first_stage_gb"], base["mem_last_stage_gb"])
    text = (f"{chosen} over {base['schedule']}: bubble {base['pp_bubble_s']:.4g} -> "
            f"{mine['pp_bubble_s']:.4g} s per step ({abs(saved):.4g} s {'saved' if saved >= 0 else 'more'}), "
            f"step {base['step_time_s']:.4g} -> {mine['step_time_s']:.4g} s, for {mem:+.2f} GB on the "
            "busiest pipeline rank")
    rest = [r for r in others if r is not base]
    if rest:
        nxt = min(rest, key=lambda r: r["step_time_s"])
        text += f"; next best {nxt['schedule']} at {nxt['step_time_s']:.4g} s"
    faster = [r for r in ok if not r["fits_in_memory"] and r["step_time_s"] < mine["step_time_s"]]
    if faster:
        f = min(faster, key=lambda r: r["step_time_s"])
        text += (f"; {f['schedule']} would be faster ({f['step_time_s']:.4g} s) but needs "
                 f"{f['peak_memory_gb']:.1f} GB")
    return text
