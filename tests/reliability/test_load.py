"""The planner under a (short) sweep of random valid search requests: clean answers, flat
memory across repeated passes, and latency that does not drift (benchmarks/planner_load.py
runs the full 1,000-request sweep)."""

from __future__ import annotations

import gc
import importlib.util
import sys
import time
import tracemalloc

from tests.reliability.helpers import ROOT

QUICK_MODELS = ("tiny", "small", "llama3-8b", "llama2-7b", "mixtral-8x7b", "nemotron4-15b")


def _bench():
    spec = importlib.util.spec_from_file_location("planner_load",
                                                  ROOT / "benchmarks" / "planner_load.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["planner_load"] = mod  # dataclasses look their module up
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def test_planner_sweep_keeps_memory_and_latency_flat() -> None:
    """The same 12 random requests four times: Python-level allocations (tracemalloc) must
    not grow after the first pass (a per-request leak grows with every pass), resident
    memory must level off, and the median latency must not drift."""
    from planner.profiles import load_profile

    pl = _bench()
    pl.serve.rejections = {}
    reqs = pl.random_requests(12, seed=3, max_gpus=32, models=QUICK_MODELS)
    profile = load_profile()
    medians: list[float] = []
    rss: list[float] = []
    traced: list[int] = []
    tracemalloc.start()
    try:
        for _ in range(4):
            lat = []
            for r in reqs:
                t = time.perf_counter()
                assert pl.serve(r, profile) in (True, False)
                lat.append(time.perf_counter() - t)
            medians.append(sorted(lat)[len(lat) // 2])
            gc.collect()
            rss.append(pl.rss_mb())
            traced.append(tracemalloc.get_traced_memory()[0])
    finally:
        tracemalloc.stop()
    assert traced[3] - traced[0] <= 1 << 20, traced  # bytes: < 1 MB over three more passes
    assert rss[3] - rss[1] <= 32, rss  # MB: the allocator's arenas level off
    assert medians[3] <= 2 * medians[0] + 0.02, medians  # seconds: no drift
    assert sum(pl.serve.rejections.values()) <= 4 * 1, pl.serve.rejections


def test_planner_load_report_fields() -> None:
    rep = _bench().run_load(20, seed=5, max_gpus=16, models=("tiny", "llama3-8b"))
    assert rep.requests == 20 and rep.served + rep.rejected == 20
    assert 0 < rep.p50_ms <= rep.p99_ms <= rep.max_ms
    assert len(rep.rss_samples_mb) == 10


def test_planner_load_with_concurrent_clients() -> None:
    many = _bench().run_clients(12, clients=2, seed=5, max_gpus=16)
    assert many["clients"] == 2 and many["requests"] == 12
    assert 0 < many["p50_ms"] <= many["p99_ms"] <= many["max_ms"]
    assert many["requests_per_s"] == 12 / many["seconds"]
