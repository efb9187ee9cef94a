"""Layout-search speed: candidates evaluated per second, from 8B on 8 GPUs to 405B on 16,384.

    python benchmarks/search_speed.py

Each row runs the same `planner.search.search` that `meshplan plan` runs (best of 3), and
prints the winner's predicted MFU so speed is never bought with a different answer.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from costmodels.presets import get_preset  # noqa: E402
from costmodels.specs import ClusterSpec  # noqa: E402
from planner.profiles import load_profile  # noqa: E402
from planner.search import search  # noqa: E402

CASES = [
    ("llama3-8b", "h100-sxm", 8, 8192, 2**20),
    ("llama3-8b", "h100-sxm", 128, 8192, 2**22),
    ("llama3-70b", "h100-sxm", 1024, 8192, 2**22),
    ("llama3-70b", "a100-80gb", 512, 4096, 2**22),
    ("llama3-405b", "h100-sxm", 2048, 8192, 2**23),
    ("llama3-405b", "h100-sxm", 16384, 8192, 2**24),
    ("llama3-405b", "h100-sxm", 16384, 131072, 2**24),
]


def main() -> int:
    profile = load_profile()
    print(f"{'model':12} {'gpu':10} {'GPUs':>6} {'seq':>7} {'candidates':>11} {'seconds':>8} {'cand/s':>10}  winner")
    for name, gpu, n, seq, tokens in CASES:
        model = get_preset(name).with_(seq_len=seq)
        cluster = ClusterSpec(gpu, n)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            res = search(model, cluster, tokens // seq, profile)
            best = min(best, time.perf_counter() - t0)
        w = res.ranked.iloc[0]
        print(f"{name:12} {gpu:10} {n:>6} {seq:>7} {res.candidates_evaluated:>11,} {best:>8.3f} "
              f"{res.candidates_evaluated / best:>10,.0f}  tp{w.tp} pp{w.pp} dp{w.dp} cp{w.cp} "
              f"vpp{w.vpp} {w.sharding} MFU {w.mfu_pct:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
