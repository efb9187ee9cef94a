"""Accuracy: predicted vs measured tokens/s on published_runs.csv (or the user's own runs),
error by source and GPU, and before / after calibration (built-in starting values, the
shipped fitted profile, and a profile file the user points at)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from app import charts
from app.common import PUBLISHED_RUNS, user_errors
from app.compute import score_runs
from costmodels.errors import MeshplanError

PROFILES = {
    "baseline": "before calibration (Profile() built-in values)",
    "shipped": "after calibration (shipped default profile)",
    "user": "your profile file",
}

st.header("Accuracy: predicted vs measured")
with user_errors():
    c1, c2 = st.columns(2)
    with c1:
        upload = st.file_uploader("Your calibration runs (CSV with the columns of "
                                  "published_runs.csv)", type=["csv"], key="acc_upload")
        csv_text = st.text_input("... or a CSV path", str(PUBLISHED_RUNS), key="acc_csv")
    with c2:
        profile_path = st.text_input("Profile YAML to compare (optional, e.g. from "
                                     "`meshplan calibrate`)", "", key="acc_profile").strip()
        color = st.radio("Colour by", ["source_id", "gpu", "model_type"], horizontal=True,
                         key="acc_color")
    if upload is not None:
        tmp = Path(tempfile.gettempdir()) / f"meshplan-runs-{abs(hash(upload.getvalue()))}.csv"
        tmp.write_bytes(upload.getvalue())
        csv_path = tmp
    else:
        csv_path = Path(csv_text.strip())
        if not csv_path.is_file():
            raise MeshplanError(f"runs CSV {csv_path}: not found; upload a CSV or fix the path")
    if profile_path and not Path(profile_path).is_file():
        raise MeshplanError(f"profile {profile_path}: not found; give a YAML from "
                            "`meshplan calibrate` or leave it empty")
    choices = ["baseline", "shipped"] + (["user"] if profile_path else [])
    mtimes = (csv_path.stat().st_mtime_ns / 1e9,
              Path(profile_path).stat().st_mtime_ns / 1e9 if profile_path else 0.0)
    scored = {c: score_runs(str(csv_path), c, profile_path or None,
                            mtimes if c == "user" else (mtimes[0], 0.0)) for c in choices}
    for c, res in scored.items():
        if not res["ok"]:
            raise MeshplanError(f"{PROFILES[c]}: {res['error']}")

st.subheader("Before / after calibration")
st.table(pd.DataFrame({
    PROFILES[c]: {
        "profile": res["profile"], "rows scored": res["summary"]["n_scored"],
        "rows skipped": res["summary"]["n_skipped"],
        "MAPE %": res["summary"]["mape_pct"], "median APE %": res["summary"]["median_ape_pct"],
        "within 20 %": res["summary"]["within_20pct_share"],
        "memory MAPE %": res["summary"]["memory_mape_pct"],
    }
    for c, res in scored.items()
}).astype(str))

view = st.radio("Scatter of", [PROFILES[c] for c in choices], index=1, horizontal=True,
                key="acc_view")
chosen = next(c for c in choices if PROFILES[c] == view)
res = scored[chosen]
st.plotly_chart(charts.accuracy_scatter(res["rows"], color=color,
                                        title=f"Predicted vs measured tokens/s per GPU ({view})"),
                key="acc_scatter")
c1, c2 = st.columns(2)
with c1:
    st.markdown("**Error by source**")
    st.table(res["by_source"].set_index("source_id") if len(res["by_source"]) else
             pd.DataFrame())
with c2:
    st.markdown("**Error by GPU**")
    st.table(res["by_gpu"].set_index("gpu") if len(res["by_gpu"]) else pd.DataFrame())
skipped = res["rows"][res["rows"]["skipped_reason"].notna()]
if len(skipped):
    with st.expander(f"{len(skipped)} rows not scored, and why"):
        st.dataframe(skipped[["run_id", "model_name", "gpu", "skipped_reason"]], hide_index=True)
