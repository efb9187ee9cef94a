"""Plan: model + cluster + batch + constraints -> ranked layouts, memory bar, step waterfall,
and plan.yaml / launch-file downloads for the selected layout."""

from __future__ import annotations

import io
import json
import zipfile

import streamlit as st

from app import charts
from app.common import cluster_inputs, fmt_count, model_inputs, user_errors
from app.compute import (
    layout_label,
    memory_parts,
    model_key,
    plan_dict,
    ranked_table,
    render_plan_files,
    run_search,
    space_key,
    time_parts,
)
from costmodels.errors import MeshplanError
from costmodels.hardware import ACCELERATORS
from costmodels.specs import PRECISIONS, RECOMPUTES, SHARDINGS, ClusterSpec
from planner.schedule_advice import parse_count
from planner.search import SearchSpace

st.header("Plan: ranked parallel layouts")

c_model, c_cluster, c_batch = st.columns(3)
with user_errors():
    with c_model:
        st.subheader("Model")
        model = model_inputs("plan")
        st.caption(f"{model.name}: {model.param_count() / 1e9:.2f} B parameters, "
                   f"seq {model.seq_len:,}")
    with c_cluster:
        st.subheader("Cluster")
        ci = cluster_inputs("plan")
        st.caption(f"{ci.num_gpus:,} x {ci.accelerator} "
                   f"({ACCELERATORS[ci.accelerator].hbm_gb:g} GB HBM each)")
    with c_batch:
        st.subheader("Batch and constraints")
        gbs = int(st.number_input("Global batch (sequences per step)", 1, 1 << 22, 2048,
                                  key="plan_gbs"))
        st.caption(f"{fmt_count(gbs * model.seq_len)} tokens per step")
        train_tokens_text = st.text_input("Training tokens (empty: 20 x params)", "",
                                          key="plan_train_tokens")
        max_tp = st.selectbox("Max TP", [0, 1, 2, 4, 8, 16, 32, 64],
                              format_func=lambda v: "NVLink domain" if v == 0 else str(v),
                              key="plan_max_tp")
        allow_cp = st.radio("Context parallelism", ["auto (from 16K)", "allow", "off"],
                            horizontal=True, key="plan_cp")
        shardings = st.multiselect("ZeRO stages", list(SHARDINGS), list(SHARDINGS),
                                   key="plan_sharding")
        recomputes = st.multiselect("Recompute", list(RECOMPUTES), list(RECOMPUTES),
                                    key="plan_recompute")
        precision = st.selectbox("Precision", list(PRECISIONS), key="plan_precision")
        headroom = st.slider("HBM headroom kept free", 0.0, 0.5, 0.05, 0.01,
                             key="plan_headroom")
        rank_by = st.radio("Rank by", ["throughput", "memory"], horizontal=True,
                           key="plan_rank_by")
        executor_only = st.checkbox(
            "Only layouts meshplan's executor runs", True, key="plan_executor_only",
            help="Off: rank every layout, for another stack (MoE, FP8, Megatron-only layouts)")

    if not shardings:
        raise MeshplanError("ZeRO stages: pick at least one (none, zero1, zero2, zero3)")
    if not recomputes:
        raise MeshplanError("Recompute: pick at least one (none, selective, full)")
    if ci.nodes > 1 and ci.num_gpus % ci.gpus_per_node:
        raise MeshplanError("cluster: GPUs must be a whole number of nodes")
    cluster = ClusterSpec(ci.accelerator, ci.num_gpus, gpus_per_node=ci.gpus_per_node,
                          scaleup_gbps=ci.scaleup_gbps, scaleout_gbps=ci.scaleout_gbps)
    train_tokens = parse_count(train_tokens_text, "Training tokens") \
        if train_tokens_text.strip() else None
    ACCELERATORS[ci.accelerator].peak_tflops(precision)  # fp8 on a part without it: a message
    space = SearchSpace(
        max_tp=int(max_tp), allow_cp={"allow": True, "off": False}.get(allow_cp),
        shardings=tuple(shardings), recomputes=tuple(recomputes), precision=precision,
        memory_headroom=float(headroom), executor_only=bool(executor_only),
    )
    result = run_search(model_key(model), ci.key(), gbs, space_key(space), rank_by)
    if not result["ok"]:
        raise MeshplanError(result["error"])

ranked = result["ranked"]
st.caption(
    f"{result['candidates']:,} candidate layouts evaluated in {result['seconds']:.2f} s; "
    f"{result['fitting']:,} fit in memory. Priced by the {result['priced_by'].describe()}."
)
top = st.slider("Show top N layouts", 1, len(ranked), min(10, len(ranked)), key="plan_top")
st.subheader("Ranked layouts")
st.table(ranked_table(ranked, top))

labels = [layout_label(ranked.iloc[i], i) for i in range(top)]
choice = st.selectbox("Selected layout", range(top), format_func=lambda i: labels[i],
                      key="plan_selected")
row = ranked.iloc[int(choice)]
hbm = float(row["hbm_gb"])

c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(charts.memory_bars({f"layout {labels[int(choice)].split(' ')[0]}": memory_parts(row)},
                                       hbm, hbm * (1 - headroom),
                                       title=f"Per-GPU memory: {row['peak_memory_gb']:.1f} GB"),
                    key="plan_memory_chart")
with c2:
    st.plotly_chart(charts.step_waterfall(time_parts(row),
                                          title=f"Step time: {row['step_time_s']:.3f} s"),
                    key="plan_waterfall_chart")
m1, m2, m3, m4 = st.columns(4)
m1.metric("tokens/s per GPU", f"{row['tokens_per_sec_per_gpu']:,.0f}")
m2.metric("MFU", f"{row['mfu_pct']:.1f} %")
m3.metric("peak memory", f"{row['peak_memory_gb']:.1f} GB")
m4.metric("micro-batches / step", f"{int(row['micro_batches'])}")

with st.expander("Why not the runner-ups", expanded=False):
    for line in result["runner_ups"] or ["(only one layout fits)"]:
        st.text(line)
with st.expander("Memory / throughput Pareto front", expanded=False):
    st.plotly_chart(charts.pareto(result["pareto"], row), key="plan_pareto_chart")

with user_errors():
    plan = plan_dict(model, cluster, row, result, train_tokens)
    files = render_plan_files(json.dumps(plan, sort_keys=True))
st.session_state["meshplan_plan"] = {  # read by the Schedule page
    "steps": int(plan["train"]["max_steps"]), "lr": float(plan["train"]["lr"]),
    "params": float(model.param_count()), "seq_len": model.seq_len, "global_batch": gbs,
    "dp": int(row["dp"]), "micro": int(row["micro"]), "model": model.name,
}
st.subheader("Downloads")
st.caption(f"{plan['train']['max_steps']:,} steps, predicted "
           f"{plan['predicted']['time_to_train_hours']:,.1f} h to train")
cols = st.columns(len(files) + 1)
for col, (name, text) in zip(cols, files.items(), strict=False):
    col.download_button(name, text, file_name=name, key=f"plan_dl_{name}", on_click="ignore")


def _zip() -> bytes:
    """Built when the button is pressed (Streamlit's deferred download), not on every run."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return buf.getvalue()


cols[-1].download_button("all (zip)", _zip, file_name="meshplan-plan.zip",
                         mime="application/zip", key="plan_dl_zip", on_click="ignore")
with st.expander("plan.yaml", expanded=False):
    st.code(files["plan.yaml"], language="yaml")
