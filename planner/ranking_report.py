"""What a search's ranking says to a reader: the ranked layouts as JSON, why the winner beat
each runner-up, and the short trial runs that would separate layouts the cost model cannot
tell apart."""

from __future__ import annotations

from typing import Any

import pandas as pd

from planner.plan_sections import LAYOUT_PLAN_FIELDS, layout_section
from planner.search import BREAKDOWN, SearchResult, row_to_layout


def row_layout_fields(result: SearchResult, row: pd.Series) -> dict[str, Any]:
    """A ranked / Pareto row's layout in the plan's `layout:` spelling
    (`plan_sections.layout_section`), the batch and the engine left to the plan."""
    lay = row_to_layout(row, result.global_batch, result.table.attrs["precision"])
    fields = layout_section(lay)
    del fields["engine"], fields["global_batch_size"]
    return fields


def top_json(result: SearchResult) -> list[dict[str, Any]]:
    """Ranked layouts. `within_uncertainty_of_best`: the layout's interval reaches the
    winner's, so the cost model cannot tell them apart (a short trial run can)."""
    out = []
    # Compared with the fastest ranked layout (with --rank-by memory the first is not it).
    fastest = result.ranked["tokens_per_sec_per_gpu"].idxmax() if len(result.ranked) else None
    best_low = float(result.ranked.loc[fastest, "tokens_per_sec_per_gpu_low"]) if fastest is not None else 0.0
    for _, r in result.ranked.iterrows():
        out.append({
            **row_layout_fields(result, r),
            "grad_accum": int(r.micro_batches),
            "runnable_by_executor": bool(r.runnable),
            "predicted_tokens_per_sec_per_gpu": round(float(r.tokens_per_sec_per_gpu), 3),
            "tokens_per_sec_per_gpu_interval": [round(float(r.tokens_per_sec_per_gpu_low), 3),
                                                round(float(r.tokens_per_sec_per_gpu_high), 3)],
            "within_uncertainty_of_best": bool(float(r.tokens_per_sec_per_gpu_high) >= best_low),
            "predicted_mfu_pct": round(float(r.mfu_pct), 3),
            "predicted_peak_memory_gb": round(float(r.peak_memory_gb), 3),
            "predicted_step_time_s": round(float(r.step_time_s), 6),
            "breakdown_s": {k.removesuffix("_s"): round(float(r[k]), 6) for k in BREAKDOWN},
        })
    return out


def trial_runs(result: SearchResult, plan_path: str = "PLAN") -> list[str]:
    """Short runs that would separate the layouts the cost model cannot tell apart: the
    executor's own, 20 steps each, with the layout fields that differ from the winner's."""
    top = top_json(result)
    if not top:
        return []
    fields = [f for f in LAYOUT_PLAN_FIELDS if f not in ("engine", "global_batch_size")]
    cmds = []
    close = [(i, t) for i, t in enumerate(top) if t["within_uncertainty_of_best"]][:4]
    for rank, t in close:
        overrides = " ".join(f"--override layout.{f}={str(t[f]).lower() if isinstance(t[f], bool) else t[f]}"
                             for f in fields)
        cmds.append(f"meshplan run {plan_path} --out trial_rank{rank + 1} {overrides} --override train.max_steps=20")
    return cmds if len(cmds) > 1 else []


def explain_runner_ups(result: SearchResult, k: int = 4) -> list[str]:
    """Why each runner-up loses to the winner: the breakdown terms that grew most."""
    if len(result.ranked) < 2:
        return []
    w = result.ranked.iloc[0]
    lines = []
    for i in range(1, min(k + 1, len(result.ranked))):
        r = result.ranked.iloc[i]
        deltas = sorted(((float(r[c] - w[c]), c) for c in BREAKDOWN), reverse=True)
        worse = [f"+{d:.3g}s {c.removesuffix('_s')}" for d, c in deltas if d > 1e-9][:2]
        better = [f"{d:.3g}s {c.removesuffix('_s')}" for d, c in deltas[::-1] if d < -1e-9][:1]
        desc = f"tp={r.tp} pp={r.pp} dp={r.dp} cp={r.cp} ep={r.ep} vpp={r.vpp} {r.sharding} mbs={r.micro} rc={r.recompute}"
        gap = (r.step_time_s / w.step_time_s - 1) * 100
        lines.append(f"#{i + 1} {desc}: {gap:.1f}% slower ({', '.join(worse) or 'ties'}"
                     + (f"; gains {', '.join(better)}" if better else "") + ")")
    return lines
