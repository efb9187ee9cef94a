"""Compare: two or three ranked layouts of one search, or the best layout on two
accelerators, on the same memory and step-time charts."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import charts
from app.common import cluster_inputs, model_inputs, user_errors
from app.compute import layout_label, memory_parts, model_key, run_search, space_key, time_parts
from costmodels.errors import MeshplanError
from costmodels.hardware import ACCELERATORS
from planner.search import SearchSpace

st.header("Compare layouts or accelerators")

mode = st.radio("Compare", ["layouts of one search", "two accelerators"], horizontal=True,
                key="cmp_mode")
c_model, c_cluster = st.columns(2)
with user_errors():
    with c_model:
        model = model_inputs("cmp")
        gbs = int(st.number_input("Global batch (sequences per step)", 1, 1 << 22, 2048,
                                  key="cmp_gbs"))
    with c_cluster:
        ci = cluster_inputs("cmp")
        if mode == "two accelerators":
            keys = sorted(ACCELERATORS)
            other = st.selectbox("Second accelerator", keys, index=keys.index("h200"),
                                 key="cmp_acc2")
    space = space_key(SearchSpace())

    columns: dict[str, pd.Series] = {}
    if mode == "layouts of one search":
        res = run_search(model_key(model), ci.key(), gbs, space)
        if not res["ok"]:
            raise MeshplanError(res["error"])
        ranked = res["ranked"]
        labels = [layout_label(ranked.iloc[i], i) for i in range(len(ranked))]
        picked = st.multiselect("Layouts (2 or 3)", list(range(len(ranked))),
                                default=list(range(min(2, len(ranked)))),
                                format_func=lambda i: labels[i], key="cmp_layouts",
                                max_selections=3)
        if len(picked) < 2 and len(ranked) >= 2:
            raise MeshplanError("Layouts: pick two or three layouts to compare")
        for i in picked:
            columns[labels[i].split(" ")[0] + " " + " ".join(labels[i].split(" ")[1:4])] = \
                ranked.iloc[i]
        hbm = float(ranked.iloc[0]["hbm_gb"])
    else:
        for acc in dict.fromkeys([ci.accelerator, other]):
            key = (acc, *ci.key()[1:])
            res = run_search(model_key(model), key, gbs, space)
            if not res["ok"]:
                raise MeshplanError(f"{acc}: {res['error']}")
            columns[acc] = res["ranked"].iloc[0]
        if len(columns) < 2:
            raise MeshplanError("Second accelerator: pick one different from the first")
        hbm = max(float(r["hbm_gb"]) for r in columns.values())

summary = pd.DataFrame({
    name: {
        "layout": f"tp{int(r['tp'])} pp{int(r['pp'])} dp{int(r['dp'])} cp{int(r['cp'])} "
                  f"vpp{int(r['vpp'])} {r['sharding']} mbs{int(r['micro'])} {r['recompute']}",
        "tokens/s/GPU": f"{r['tokens_per_sec_per_gpu']:,.0f}",
        "MFU %": f"{r['mfu_pct']:.1f}",
        "step s": f"{r['step_time_s']:.3f}",
        "peak mem GB": f"{r['peak_memory_gb']:.1f}",
        "HBM GB": f"{r['hbm_gb']:g}",
    }
    for name, r in columns.items()
})
st.table(summary)
c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(charts.memory_bars({k: memory_parts(r) for k, r in columns.items()}, hbm,
                                       title="Per-GPU memory"), key="cmp_memory_chart")
with c2:
    st.plotly_chart(charts.stacked_times({k: time_parts(r) for k, r in columns.items()}),
                    key="cmp_time_chart")
if mode == "two accelerators":
    a, b = list(columns)
    speed = columns[b]["tokens_per_sec_per_gpu"] / columns[a]["tokens_per_sec_per_gpu"]
    st.info(f"{b} trains {speed:.2f}x as many tokens/s per GPU as {a} at the same GPU count "
            "(each with its own best layout).")
