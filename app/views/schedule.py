"""Schedule: cosine vs WSD learning-rate curves for the plan's steps, and a batch-size
calculator (tokens per step = micro x dp x accumulation x seq)."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts
from app.common import fmt_count, user_errors
from costmodels.errors import MeshplanError
from costmodels.lr_schedule import lr_curve
from planner.schedule_advice import (
    parse_count,
    recommend_lr,
    recommend_schedule,
    solve_grad_accum,
)

st.header("Schedule: learning rate and batch size")
plan = st.session_state.get("meshplan_plan")
if plan:
    st.caption(f"From the Plan page: {plan['model']}, {plan['steps']:,} steps, "
               f"peak LR {plan['lr']:.2e}.")
default_steps = int(plan["steps"]) if plan else 10_000
default_params = float(plan["params"]) if plan else 70.6e9

with user_errors():
    c = st.columns(4)
    steps = int(c[0].number_input("Optimizer steps", 1, 100_000_000, default_steps,
                                  key="sched_steps"))
    params = parse_count(c[1].text_input("Parameters", fmt_count(default_params).rstrip(),
                                         key="sched_params"), "Parameters")
    advice = recommend_lr(params, steps)
    lr = c[2].number_input("Peak LR (0 = recommended)", 0.0, 1.0, 0.0, format="%.2e",
                           key="sched_lr")
    peak = float(lr) or advice.max_lr
    min_ratio = c[3].slider("Final LR / peak", 0.0, 1.0, 0.1, 0.01, key="sched_min_ratio")
    c = st.columns(3)
    warmup = int(c[0].number_input("Warmup steps (0 = recommended)", 0, 100_000_000, 0,
                                   key="sched_warmup")) or advice.warmup_steps
    decay = c[1].slider("WSD decay share", 0.0, 1.0, advice.wsd_decay_frac, 0.01,
                        key="sched_decay")
    open_ended = c[2].checkbox("Run length open-ended / continual", False, key="sched_open")
    if warmup > steps:
        raise MeshplanError(f"Warmup steps={warmup}: must not exceed the {steps} steps")
    curves = {
        name: lr_curve(peak, steps, warmup_steps=warmup, schedule=name,
                       min_lr=peak * min_ratio, wsd_decay_frac=decay)
        for name in ("cosine", "wsd")
    }
rec, why = recommend_schedule(length_known=not open_ended, continual=open_ended)
st.plotly_chart(charts.lr_curves(curves, title=f"Cosine vs WSD over {steps:,} steps"),
                key="sched_lr_chart")
st.info(f"Recommended schedule: {rec} ({why}). Peak LR {advice.max_lr:.2e} for "
        f"{fmt_count(params)} parameters, warmup {advice.warmup_steps:,} steps "
        f"({advice.warmup_frac:.0%}).")
mid = steps // 2
st.table(pd.DataFrame({
    name: {"LR at warmup end": f"{y[max(warmup - 1, 0)]:.3e}", f"LR at step {mid:,}":
           f"{y[mid]:.3e}", "final LR": f"{y[-1]:.3e}", "mean LR": f"{y.mean():.3e}"}
    for name, y in curves.items()
}))

st.subheader("Batch-size calculator")
with user_errors():
    c = st.columns(4)
    target = parse_count(c[0].text_input("Target tokens per step", "16M", key="sched_target"),
                         "Target tokens per step")
    seq = int(c[1].number_input("Sequence length", 1, 1 << 20,
                                int(plan["seq_len"]) if plan else 8192, key="sched_seq"))
    micro = int(c[2].number_input("Micro-batch", 1, 4096, int(plan["micro"]) if plan else 1,
                                  key="sched_micro"))
    dp = int(c[3].number_input("Data-parallel degree", 1, 1 << 20,
                               int(plan["dp"]) if plan else 128, key="sched_dp"))
    bp = solve_grad_accum(target, seq, micro, dp)
m = st.columns(4)
m[0].metric("gradient accumulation", f"{bp.grad_accum}")
m[1].metric("global batch (sequences)", f"{bp.global_batch:,}")
m[2].metric("tokens per step", fmt_count(bp.tokens))
m[3].metric("vs target", f"{bp.deviation_pct:+.1f} %")
if abs(bp.deviation_pct) > 5:
    st.warning(f"The nearest global batch is {bp.deviation_pct:+.1f}% off the target; change "
               "the micro-batch or the data-parallel degree to get closer.")
