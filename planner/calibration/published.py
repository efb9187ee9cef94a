"""Score the cost model against measured runs (`meshplan validate`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from costmodels.cases import subset_cases
from costmodels.fit import (
    PUBLISHED_FIXED,
    PUBLISHED_PRIORS,
    ape_pct,
    cross_validate,
    random_halves,
)
from costmodels.profile import Profile
from costmodels.steptime import evaluate
from planner.calibration.runs_table import cases_from_runs

NO_MEASUREMENT = "no measured_tokens_per_sec_per_gpu to score against"


def _num(v: Any) -> float | None:
    if v is None:
        return None
    f = float(v)
    return None if np.isnan(f) else f


@dataclass
class Validation:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    table: pd.DataFrame  # scored rows with source, gpu, model type, predictions

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "summary": self.summary}


def validate_runs(df: pd.DataFrame, profile: Profile, cross_validated: bool = False, seed: int = 0) -> Validation:
    """Predict every row; score throughput and memory where measured.

    With `cross_validated`, each half of the scored rows is predicted by a profile fitted on
    the other half (random halves from `seed`), so no row is scored by a fit that saw it.
    """
    cases, used, skipped, assumed = cases_from_runs(df)
    pred_tps = np.full(len(df), np.nan)
    pred_mem = np.full(len(df), np.nan)
    pred_logged = np.full(len(df), np.nan)  # what the run's framework would log (its ranks, its unit)
    pred_mfu = np.full(len(df), np.nan)
    if cases is not None:
        out = evaluate(cases, profile)
        pred_tps[used] = out["tokens_per_sec_per_gpu"]
        pred_mem[used] = out["peak_memory_gb"]
        pred_logged[used] = out["peak_memory_as_logged"]
        pred_mfu[used] = out["mfu"]
        if cross_validated:
            meas = df["measured_tokens_per_sec_per_gpu"].to_numpy(dtype=float)[used]
            ok = np.flatnonzero(np.isfinite(meas) & (meas > 0))
            if len(ok) >= 4:
                cv = cross_validate(subset_cases(cases, ok), meas[ok], random_halves(len(ok), seed), profile,
                                    fixed=PUBLISHED_FIXED)
                pred_tps[np.asarray(used)[ok]] = cv
    rows: list[dict[str, Any]] = []
    used_set = {u: k for k, u in enumerate(used)}
    for i in range(len(df)):
        r = df.iloc[i]
        measured = _num(r["measured_tokens_per_sec_per_gpu"])
        mem_meas = _num(r.get("measured_peak_memory_gb"))
        reason = skipped.get(i)
        if reason is None and (measured is None or measured <= 0):
            reason = NO_MEASUREMENT
        predicted = _num(pred_tps[i]) if i in used_set else None
        ape = ape_pct(predicted, measured).item() if (predicted and measured and measured > 0) else None
        rows.append({
            "run_id": str(r["run_id"]),
            "predicted_tokens_per_sec_per_gpu": None if predicted is None else round(predicted, 2),
            "measured_tokens_per_sec_per_gpu": measured,
            "ape_pct": None if ape is None else round(ape, 3),
            "predicted_peak_memory_gb": None if i not in used_set else round(float(pred_mem[i]), 3),
            "predicted_peak_memory_as_logged": None if i not in used_set else round(float(pred_logged[i]), 3),
            "measured_peak_memory_gb": mem_meas,
            "predicted_mfu_pct": None if i not in used_set else round(float(pred_mfu[i]) * 100, 2),
            "assumed": assumed[used_set[i]] if i in used_set else [],
            "skipped_reason": reason if ape is None else None,
        })
    table = pd.DataFrame(rows)
    table["source_id"] = df["source_id"].fillna("unknown").to_numpy()
    table["gpu"] = df["gpu"].to_numpy()
    table["model_type"] = df["model_type"].fillna("dense").to_numpy()
    scored = table[table["ape_pct"].notna()]
    # a measured figure is the framework's own (`costmodels.stacks.Stack.memory_log_rank`)
    mem = table[table["measured_peak_memory_gb"].notna() & table["predicted_peak_memory_as_logged"].notna()]
    mem_ape = ape_pct(mem["predicted_peak_memory_as_logged"], mem["measured_peak_memory_gb"]) if len(mem) else np.zeros(0)
    dense = scored[scored["model_type"] == "dense"]
    dense_measured = table[(table["model_type"] == "dense") & table["measured_tokens_per_sec_per_gpu"].notna()]

    def stats(a: pd.Series) -> dict[str, float | None]:
        if len(a) == 0:
            return {"mape_pct": None, "median_ape_pct": None}
        return {"mape_pct": round(float(a.mean()), 3), "median_ape_pct": round(float(a.median()), 3)}

    summary = {
        "n_scored": int(len(scored)),
        "n_skipped": int(len(table) - len(scored)),
        **stats(scored["ape_pct"]),
        "within_10pct_share": round(float((scored["ape_pct"] <= 10).mean()), 4) if len(scored) else None,
        "within_20pct_share": round(float((scored["ape_pct"] <= 20).mean()), 4) if len(scored) else None,
        "memory_mape_pct": round(float(np.mean(mem_ape)), 3) if len(mem) else None,
        "n_memory_scored": int(len(mem)),
        "dense_mape_pct": stats(dense["ape_pct"])["mape_pct"],
        "dense_scored_share": round(len(dense) / len(dense_measured), 4) if len(dense_measured) else None,
        "cross_validated": cross_validated,
        "profile": profile.source,
    }
    return Validation(rows, summary, scored.copy())


def breakdown(v: Validation, by: list[str]) -> pd.DataFrame:
    g = v.table.groupby(by)["ape_pct"]
    return pd.DataFrame({"n": g.size(), "mape_pct": g.mean().round(2), "median_ape_pct": g.median().round(2)}).reset_index()


def fit_on_runs(df: pd.DataFrame, base: Profile | None = None, dense_only: bool = True,
                source: str = "fit on published runs") -> Profile:
    """Fit throughput parameters (and memory parameters where memory was measured) to runs."""
    from costmodels.fit import fit_memory, fit_throughput

    base = (base or Profile()).with_(**PUBLISHED_PRIORS)
    cases, used, _, _ = cases_from_runs(df)
    if cases is None:
        return base
    sub = df.iloc[used]
    meas = sub["measured_tokens_per_sec_per_gpu"].to_numpy(dtype=float)
    ok = np.isfinite(meas) & (meas > 0)
    if dense_only:
        ok &= sub["model_type"].fillna("dense").to_numpy() == "dense"
    idx = np.flatnonzero(ok)
    prof = fit_throughput(subset_cases(cases, idx), meas[idx], base, fixed=PUBLISHED_FIXED, source=source).profile
    mem = sub["measured_peak_memory_gb"].to_numpy(dtype=float)
    midx = np.flatnonzero(np.isfinite(mem) & (mem > 0))
    if len(midx) >= 2:
        prof = fit_memory(subset_cases(cases, midx), mem[midx], prof)
    return prof
