"""Every cost-model call the dashboard makes, behind `st.cache_data` keyed by plain inputs
(strings, numbers, tuples), so a widget change that does not alter the inputs of a search
redraws from the cache. Cached functions return small frames and dicts (cheap to copy),
and return user errors as a value, so an impossible input is cached too (no re-search on
every redraw)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

import pandas as pd
import streamlit as st

from costmodels.errors import MeshplanError
from costmodels.profile import Profile
from costmodels.specs import ClusterSpec, ModelSpec
from planner.calibration.published import breakdown, validate_runs
from planner.emitters import render_launch_files
from planner.plan_from_row import TrainChoice, plan_data, steps_for_budget
from planner.planfile import Plan, plan_from_dict
from planner.profiles import PricedBy, load_profile, resolve_profile
from planner.ranking_report import explain_runner_ups
from planner.search import BREAKDOWN, SearchSpace, search

TOP_CACHED = 50  # layouts kept per search; the "show top N" slider slices these
MEMORY_PARTS = ("weights", "gradients", "optimizer", "activations", "buffers", "overhead")
TIME_PARTS = {  # breakdown column -> label, in the order a step spends it
    "compute_s": "compute", "tp_comm_s": "exposed TP comm", "moe_comm_s": "MoE all-to-all",
    "cp_comm_s": "exposed CP comm",
    "pp_p2p_s": "PP p2p", "pp_bubble_s": "PP bubble", "dp_exposed_s": "exposed DP comm",
    "optimizer_s": "optimizer", "sync_s": "straggler sync",
}
assert set(TIME_PARTS) == set(BREAKDOWN), "the waterfall must show every breakdown term"


def model_key(model: ModelSpec) -> str:
    return json.dumps(model.to_dict(), sort_keys=True)


def space_key(space: SearchSpace) -> str:
    return json.dumps(asdict(space), sort_keys=True)


def _profile(path: str | None) -> tuple[Profile, PricedBy]:
    return resolve_profile(path or None)


@st.cache_data(max_entries=64, show_spinner="Searching layouts ...")
def run_search(model_json: str, cluster: tuple[str, int, int, float, float], global_batch: int,
               space_json: str, rank_by: str = "throughput",
               profile_path: str | None = None) -> dict[str, Any]:
    """One `planner.search.search` call on plain inputs; the top TOP_CACHED layouts."""
    try:
        model = ModelSpec.from_dict(json.loads(model_json))
        acc, gpus, gpn, up, out = cluster
        spec = ClusterSpec(acc, int(gpus), gpus_per_node=min(int(gpn), int(gpus)),
                           scaleup_gbps=float(up), scaleout_gbps=float(out))
        raw = json.loads(space_json)
        space = SearchSpace(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        prof, priced_by = _profile(profile_path)
        res = search(model, spec, int(global_batch), prof, space, TOP_CACHED, rank_by)
    except MeshplanError as exc:
        return {"ok": False, "error": str(exc)}
    return {
        "ok": True, "ranked": res.ranked, "pareto": res.pareto,
        "candidates": res.candidates_evaluated, "seconds": res.search_seconds,
        "fitting": len(res.table), "notes": list(res.notes),
        "runner_ups": explain_runner_ups(res), "precision": space.precision,
        "profile": prof.source, "profile_values": prof.to_dict(), "global_batch": int(global_batch),
        "priced_by": priced_by, "framework": space.framework,
    }


def layout_label(row: pd.Series, i: int) -> str:
    rc = str(row["recompute"]) + (f"({int(row['recompute_layers'])})"
                                  if int(row["recompute_layers"]) else "")
    return (f"#{i + 1} tp{int(row['tp'])} pp{int(row['pp'])} dp{int(row['dp'])} "
            f"cp{int(row['cp'])} vpp{int(row['vpp'])} {row['sharding']} mbs{int(row['micro'])} {rc}")


def ranked_table(ranked: pd.DataFrame, top: int) -> pd.DataFrame:
    """The ranked layouts, formatted for display (header words as in `meshplan plan`)."""
    r = ranked.head(top)
    return pd.DataFrame({
        "#": range(1, len(r) + 1),
        "TP": r["tp"].astype(int), "PP": r["pp"].astype(int), "DP": r["dp"].astype(int),
        "CP": r["cp"].astype(int), "VPP": r["vpp"].astype(int),
        "ZeRO": r["sharding"], "shard group": [str(int(x) or "all") for x in r["dp_shard"]],
        "micro": r["micro"].astype(int),
        "recompute": [f"{a}" + (f" ({int(b)})" if int(b) else "")
                      for a, b in zip(r["recompute"], r["recompute_layers"], strict=True)],
        "SP": ["yes" if x else "" for x in r["sp"]], "schedule": r["schedule"],
        "tokens/s/GPU": [f"{x:,.0f}" for x in r["tokens_per_sec_per_gpu"]],
        "MFU %": [f"{x:.1f}" for x in r["mfu_pct"]],
        "peak mem GB": [f"{x:.1f}" for x in r["peak_memory_gb"]],
        "step s": [f"{x:.3f}" for x in r["step_time_s"]],
    }).set_index("#")


def memory_parts(row: pd.Series) -> dict[str, float]:
    return {k: float(row[f"mem_{k}_gb"]) for k in MEMORY_PARTS}


def time_parts(row: pd.Series) -> dict[str, float]:
    return {label: float(row[col]) for col, label in TIME_PARTS.items()}


def plan_dict(model: ModelSpec, cluster: ClusterSpec, row: pd.Series, result: dict[str, Any],
              train_tokens: float | None = None, engine: str = "torch") -> dict[str, Any]:
    """The plan.yaml of one ranked layout, built by the function `meshplan plan --out` uses."""
    steps = steps_for_budget(model, result["global_batch"], train_tokens)
    return plan_data(model, cluster, row, result["global_batch"], result["precision"],
                     TrainChoice(steps=steps), Profile.from_dict(result["profile_values"]),
                     result["priced_by"], result["framework"], engine, result["candidates"])


@st.cache_data(max_entries=64, show_spinner=False)
def render_plan_files(plan_json: str) -> dict[str, str]:
    """plan.yaml plus every launch file the emitters write, as {file name: text}."""
    plan: Plan = plan_from_dict(json.loads(plan_json), "plan")
    return {"plan.yaml": plan.to_yaml(), **render_launch_files(plan, ".")}


@st.cache_data(max_entries=16, show_spinner="Scoring the cost model on the runs ...")
def score_runs(csv_path: str, profile_choice: str, profile_path: str | None,
               mtimes: tuple[float, float]) -> dict[str, Any]:
    """`planner.calibration.published.validate_runs` under one profile; `mtimes` (CSV, profile file) key
    the files' versions so an edited file is re-scored."""
    from planner.calibration.runs_table import read_runs

    try:
        df = read_runs(csv_path)
        if profile_choice == "baseline":
            prof = Profile()
        elif profile_choice == "shipped":
            prof = load_profile()
        else:
            prof = load_profile(profile_path)
        v = validate_runs(df, prof)
    except MeshplanError as exc:
        return {"ok": False, "error": str(exc)}
    rows = pd.DataFrame(v.rows)
    rows["source_id"] = df["source_id"].fillna("unknown").to_numpy()
    rows["gpu"] = df["gpu"].to_numpy()
    rows["model_name"] = df["model_name"].to_numpy()
    rows["model_type"] = df["model_type"].fillna("dense").to_numpy()
    by_source = breakdown(v, ["source_id"]) if len(v.table) else pd.DataFrame()
    by_gpu = breakdown(v, ["gpu"]) if len(v.table) else pd.DataFrame()
    return {"ok": True, "rows": rows, "summary": v.summary, "by_source": by_source,
            "by_gpu": by_gpu, "profile": prof.source}
