"""Adversarial input at volume: the bad-input suite (`tests/reliability/test_bad_input.py`:
CLI flags, plan files, overrides, runs CSVs, HF config.json, calibration logs, checkpoint
manifests, unsafe YAML) with every hypothesis family scaled up until it generates at least
`--cases` cases. Each case must end in success or exit 2 with one line: the run counts the
cases, the tracebacks and the partial files they left.

    python benchmarks/bad_input.py --cases 10000 --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = "tests/reliability/test_bad_input.py"


def run_suite(scale: float) -> dict:
    """One pytest run of the suite at `scale` times its CI case counts."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        env = {**os.environ, "MESHPLAN_BAD_INPUT_SCALE": f"{scale:g}",
               "MESHPLAN_RELIABILITY_JSON": str(report), "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               SUITE], cwd=ROOT, env=env, capture_output=True, text=True)
        if not report.is_file():
            raise SystemExit(f"bad_input: the suite wrote no report:\n{proc.stdout[-3000:]}")
        res = json.loads(report.read_text())
    res["pytest_rc"] = proc.returncode
    res["pytest_tail"] = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=10_000, help="at least this many cases")
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = ap.parse_args(argv)
    if args.cases < 1:
        ap.error("--cases: must be >= 1")
    t0 = time.perf_counter()
    # The CI run generates ~1,100 cases at scale 1; scale up, and (at most twice) more if
    # the deduplicating generator fell short of the target.
    scale = max(args.cases / 1000, 0.05)
    for _ in range(3):
        res = run_suite(scale)
        cases = sum(res["bad_input_cases"].values())
        if cases >= args.cases or res["pytest_rc"] != 0:
            break
        scale *= 1.1 * args.cases / max(cases, 1)
    out = {
        "cases": cases,
        "tracebacks": len(res.get("tracebacks", [])),
        "partial_files": len(res.get("partial_files", [])),
        "by_family": res["bad_input_cases"],
        "scale": round(scale, 3),
        "suite_passed": res["pytest_rc"] == 0,
        "wall_s": round(time.perf_counter() - t0, 1),
        "examples": {"tracebacks": res.get("tracebacks", [])[:3],
                     "partial_files": res.get("partial_files", [])[:3]},
    }
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out["by_family"].items():
            print(f"{k:<24} {v:>7}")
        print(f"{'total':<24} {cases:>7}   tracebacks {out['tracebacks']}   partial files "
              f"{out['partial_files']}   suite {'passed' if out['suite_passed'] else 'FAILED'} "
              f"({out['wall_s']} s)")
    return 0 if out["suite_passed"] and not out["tracebacks"] and not out["partial_files"] else 1


if __name__ == "__main__":
    sys.exit(main())
