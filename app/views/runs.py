"""Runs: a `meshplan run` directory -> loss, LR, grad-norm and throughput curves with skipped
steps and rollbacks marked, held-out per-domain eval losses, and predicted vs measured."""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from app import charts
from app.common import REPO_ROOT, user_errors
from app.rundir import find_runs, read_run

st.header("Runs: training curves and predicted vs measured")

root = st.text_input("Look for runs under", os.environ.get("MESHPLAN_RUNS_DIR",
                                                           str(REPO_ROOT / "runs")),
                     key="runs_root")
found = find_runs(root)
options = [""] + [str(p) for p in found]
picked = st.selectbox("Run directory", options, index=1 if found else 0, key="runs_pick",
                      format_func=lambda s: s or "(type a path below)")
typed = st.text_input("... or its path", "", key="runs_path")
path = typed.strip() or picked
if not path:
    st.info("Pick or type the directory `meshplan run` wrote (it holds metrics.jsonl).")
    st.stop()

with user_errors():
    run = read_run(path)

m = run.metrics
s = run.summary
k = st.columns(5)
k[0].metric("steps", f"{int(m['step'].max()):,}")
if "loss" in m:
    k[1].metric("last loss", f"{float(m['loss'].iloc[-1]):.4f}")
k[2].metric("skipped steps", f"{len(run.skipped_steps)}")
k[3].metric("rollbacks", f"{len(run.rollbacks)}")
if s.get("tokens_per_sec"):
    k[4].metric("tokens/s", f"{float(s['tokens_per_sec']):,.0f}")

c1, c2 = st.columns(2)
with c1:
    if "loss" in m:
        st.plotly_chart(charts.run_curve(m, "loss", "Loss", run.skipped_steps, run.rollbacks),
                        key="runs_loss_chart")
    if "grad_norm" in m:
        st.plotly_chart(charts.run_curve(m, "grad_norm", "Gradient norm", run.skipped_steps,
                                         run.rollbacks, log_y=True), key="runs_gn_chart")
with c2:
    if "lr" in m:
        st.plotly_chart(charts.run_curve(m, "lr", "Learning rate"), key="runs_lr_chart")
    if "tokens_per_sec" in m:
        st.plotly_chart(charts.run_curve(m, "tokens_per_sec", "Throughput (tokens/s)",
                                         run.skipped_steps, run.rollbacks),
                        key="runs_tps_chart")
if run.eval_columns:
    st.plotly_chart(charts.multi_curve(m, run.eval_columns, "Held-out eval loss"),
                    key="runs_eval_chart")

pvm = run.predicted_vs_measured()
st.subheader("Predicted vs measured")
if pvm.empty:
    st.info("No predictions in summary.json / plan.yaml and no measurements yet.")
else:
    shown = pvm.copy()
    shown["measured / predicted"] = [
        f"{a / b:.2f}" if (a is not None and b and pd.notna(a) and pd.notna(b)) else ""
        for a, b in zip(shown["measured"], shown["predicted"], strict=True)]
    st.table(shown.set_index("quantity"))
    c1, c2 = st.columns(2)
    for col, (_, r) in zip((c1, c2), pvm.iterrows(), strict=False):
        with col:
            st.plotly_chart(charts.predicted_vs_measured(pd.DataFrame([r]), r["quantity"],
                                                         r["quantity"].split("(")[-1][:-1]),
                            key=f"runs_pvm_{r['quantity'][:4]}")
if not run.events.empty and "event" in run.events:
    with st.expander("Events (skips, rollbacks, checkpoints)"):
        ev = run.events.drop(columns=[c for c in ("sample_ids", "blacklisted")
                                      if c in run.events.columns])
        st.dataframe(ev, hide_index=True)
