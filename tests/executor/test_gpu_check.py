"""`benchmarks/gpu_check.py --dry --json`, the script a lent GPU runs, end to end on this
CPU: packed attention equals per-document attention, the planned model trains eager and
compiled through `meshplan run` beside its predictions, `meshplan bench` measures the host,
and the report is one JSON (also written to --out) with every backend accounted for."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")),
                    reason="the compiled run needs inductor's C++ compiler")
@pytest.mark.timeout(400)
def test_gpu_check_dry_runs_end_to_end_on_the_cpu(tmp_path):
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry", "--json", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=380, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert report == json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] and report["dry"] and report["bench"]["ok"]
    parity = {r["backend"]: r for r in report["varlen_parity"]}
    assert set(parity) == {"flash", "torch_varlen", "sdpa"}
    assert parity["sdpa"]["ok"] and parity["sdpa"]["max_abs_err"] <= 1e-5
    runs = {(r["backend"], r["compiled"]): r for r in report["runs"]}
    assert len(runs) == 6  # three backends, eager and compiled: each ran or says why not
    for compiled in (False, True):
        r = runs[("sdpa", compiled)]
        assert r["ok"] and r["steps"] == 4 and r["tokens_per_s"] > 0 and 0 < r["mfu_pct"] < 100
        assert r["predicted_step_s"] > 0 and r["predicted_peak_memory_gb"] > 0
    assert runs[("sdpa", True)]["compiled_blocks"] == 2 and runs[("sdpa", False)]["compiled_blocks"] == 0
    assert "needs CUDA" in runs[("flash", False)]["skipped"]
