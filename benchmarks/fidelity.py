"""Cost-model fidelity on published runs, and prediction speed.

    python benchmarks/fidelity.py            # score the shipped profile, CV halves, speed
    python benchmarks/fidelity.py --refit    # refit and rewrite costmodels/profiles/default.yaml

Prints: MAPE of tokens/s/GPU (all / dense), with the shipped profile and with profiles fitted
on a random half and scored on the other half (5 seeds); peak-memory error; the error by
source and GPU; microseconds per predicted configuration in a batch of 100k candidates.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodels.cases import build_cases  # noqa: E402
from costmodels.presets import get_preset  # noqa: E402
from costmodels.profile import dump_profile, load_profile  # noqa: E402
from costmodels.specs import ClusterSpec  # noqa: E402
from costmodels.steptime import evaluate  # noqa: E402
from planner.planfile import atomic_write_text  # noqa: E402
from planner.runs_table import read_runs  # noqa: E402
from planner.validate import breakdown, fit_on_runs, validate_runs  # noqa: E402

DEFAULT_CSV = ROOT.parent / "shared" / "data" / "published_runs.csv"


def speed(n: int = 100_000) -> float:
    """Microseconds per configuration when evaluating n candidates in one batch."""
    model = get_preset("llama3-70b")
    cluster = ClusterSpec("h100-sxm", 1024)
    rng = np.random.default_rng(0)
    cols = {
        "tp": rng.choice([1, 2, 4, 8], n), "pp": rng.choice([1, 2, 4, 8], n),
        "cp": np.ones(n, int), "ep": np.ones(n, int), "vpp": np.ones(n, int),
        "sharding": rng.integers(0, 4, n), "micro": rng.choice([1, 2, 4], n),
        "recompute": rng.integers(0, 3, n), "sp": rng.integers(0, 2, n).astype(bool),
        "schedule": np.ones(n, int), "precision_idx": np.zeros(n, int),
    }
    cols["dp"] = 1024 // (cols["tp"] * cols["pp"])
    cols["gbs"] = cols["dp"] * cols["micro"] * 8
    t0 = time.perf_counter()
    cases = build_cases(model, cluster, cols)
    evaluate(cases, load_profile(machine=False))
    return (time.perf_counter() - t0) / n * 1e6


def leave_one_source_out(df) -> dict:
    """Each source's dense rows predicted by a profile fitted on all other sources."""
    import pandas as pd

    from costmodels.fit import _subset, cross_validate
    from planner.runs_table import cases_from_runs

    cases, used, _, _ = cases_from_runs(df)
    sub = df.iloc[used]
    meas = sub["measured_tokens_per_sec_per_gpu"].to_numpy(dtype=float)
    ok = np.flatnonzero(np.isfinite(meas) & (meas > 0) & (sub["model_type"].fillna("dense").to_numpy() == "dense"))
    sources = sub["source_id"].to_numpy()[ok]
    codes = pd.factorize(sources)[0]
    pred = cross_validate(_subset(cases, ok), meas[ok], codes)
    ape = np.abs(pred / meas[ok] - 1) * 100
    by = pd.DataFrame({"source_id": sources, "ape": ape}).groupby("source_id")["ape"]
    table = pd.DataFrame({"n": by.size(), "mape_pct": by.mean().round(2)}).reset_index()
    return {"mape": float(ape.mean()), "median": float(np.median(ape)), "by_source": table}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--csv", default=str(DEFAULT_CSV))
    ap.add_argument("--refit", action="store_true", help="refit and rewrite the default profile")
    args = ap.parse_args()
    df = read_runs(args.csv)
    if args.refit:
        prof = fit_on_runs(df, source=f"fitted on {Path(args.csv).name} (dense rows) by benchmarks/fidelity.py --refit")
        atomic_write_text(ROOT / "costmodels" / "profiles" / "default.yaml", dump_profile(prof))
        print("wrote costmodels/profiles/default.yaml")
    prof = load_profile(machine=False)
    v = validate_runs(df, prof)
    s = v.summary
    print(f"shipped profile: n_scored={s['n_scored']} skipped={s['n_skipped']} "
          f"MAPE={s['mape_pct']:.2f}% dense MAPE={s['dense_mape_pct']:.2f}% "
          f"median={s['median_ape_pct']:.2f}% within10={s['within_10pct_share']:.2%} "
          f"within20={s['within_20pct_share']:.2%} dense scored share={s['dense_scored_share']:.2%}")
    print(f"peak memory: MAPE={s['memory_mape_pct']:.2f}% over {s['n_memory_scored']} rows")
    cv_all, cv_dense = [], []
    for seed in range(5):
        cv = validate_runs(df, prof, cross_validated=True, seed=seed).summary
        cv_all.append(cv["mape_pct"])
        cv_dense.append(cv["dense_mape_pct"])
    print(f"fit on a random half, scored on the other (5 seeds): MAPE={np.mean(cv_all):.2f}% "
          f"(range {min(cv_all):.2f}-{max(cv_all):.2f}), dense MAPE={np.mean(cv_dense):.2f}%")
    print(breakdown(v, ["source_id", "gpu"]).to_string(index=False))
    loso = leave_one_source_out(df)
    print(f"leave-one-source-out (fit on the other sources, dense rows): MAPE={loso['mape']:.2f}% "
          f"median={loso['median']:.2f}%")
    print(loso["by_source"].to_string(index=False))
    us = speed()
    print(f"prediction speed: {us:.2f} us per configuration in a batch of 100,000 (target <= 1000 us)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
