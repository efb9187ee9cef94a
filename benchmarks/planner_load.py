"""Planner under load: N random valid layout-search requests in one process (as a planning
service would serve them), with latency percentiles and resident memory before / after.

    .venv/bin/python benchmarks/planner_load.py [--requests 1000] [--clients 4] [--json]

Each request draws a model preset, an accelerator, a GPU count (whole 8-GPU nodes, or a
single node), a sequence length and a global batch (sequences), then runs
`planner.search.search` with the default search space and the shipped profile, exactly as
`meshplan plan` does. A request the planner rejects with a one-line MeshplanError (no
layout fits, say) counts as served and is reported separately; any other exception fails
the benchmark. Memory is the process's resident set (VmRSS) after a warm-up of the first
10% of requests and after the last one: a planner that keeps state per request grows.
Then the same requests are served by `--clients` processes at once (a shared planning host):
p50 / p99 latency per request and requests per second, next to the run alone.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = ("tiny", "small", "llama3-8b", "llama2-7b", "llama2-70b", "llama3-70b", "mpt-30b",
          "gpt3-175b", "mixtral-8x7b", "nemotron4-15b", "llama3-405b")
GPUS = ("h100-sxm", "a100-80gb", "a100-40gb", "h200", "b200", "mi300x")
GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SEQ_LENS = (1024, 2048, 4096, 8192)
BATCHES = (8, 32, 64, 128, 256, 512, 1024, 2048)


@dataclass
class Request:
    model: str
    gpu: str
    gpus: int
    seq_len: int
    global_batch: int


@dataclass
class LoadReport:
    requests: int
    served: int
    rejected: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    first_half_p50_ms: float
    second_half_p50_ms: float
    rss_start_mb: float
    rss_warm_mb: float
    rss_end_mb: float
    rss_growth_after_warmup_mb: float
    seconds: float
    rss_samples_mb: list[float] = field(default_factory=list)  # every 10% of the requests
    rejections: dict[str, int] = field(default_factory=dict)


def rss_mb() -> float:
    """Resident set size of this process (Linux /proc; else the peak from getrusage)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def min_gpus(model: str, gpu: str) -> int:
    """Fewest GPUs whose memory holds the weights, gradients and Adam states fully sharded:
    16 bytes per parameter in mixed precision (Rajbhandari et al. 2020, ZeRO §3: 2 + 2 + 12
    bytes), at 80% of HBM to leave room for activations."""
    from costmodels.hardware import get_accelerator
    from costmodels.presets import get_preset

    need = 16 * get_preset(model).param_count() / (0.8 * get_accelerator(gpu).hbm_gb * 1e9)
    return next((g for g in GPU_COUNTS if g >= need), GPU_COUNTS[-1])


def random_requests(n: int, seed: int, max_gpus: int = GPU_COUNTS[-1],
                    models: tuple[str, ...] = MODELS) -> list[Request]:
    """Valid requests: the GPU count is at least `min_gpus` of the model (when that is
    within `max_gpus`; other models are not drawn)."""
    rng = random.Random(seed)
    combos = [(m, g) for m in models for g in GPUS if min_gpus(m, g) <= max_gpus]
    out = []
    for _ in range(n):
        model, gpu = rng.choice(combos)
        gpus = rng.choice([c for c in GPU_COUNTS if min_gpus(model, gpu) <= c <= max_gpus])
        out.append(Request(model, gpu, gpus, rng.choice(SEQ_LENS),
                           rng.choice([b for b in BATCHES if b % min(gpus, 8) == 0])))
    return out


def serve(req: Request, profile) -> bool:
    """One search; True when served with a ranked layout, False when cleanly rejected."""
    from costmodels.errors import MeshplanError
    from costmodels.presets import get_preset
    from costmodels.specs import ClusterSpec
    from planner.search import SearchSpace, search

    model = get_preset(req.model).with_(seq_len=req.seq_len)
    cluster = ClusterSpec(req.gpu, req.gpus, gpus_per_node=min(8, req.gpus))
    try:
        # planning for any stack (MoE and FP8 requests too); the executor's contract mask is
        # still computed for every candidate
        res = search(model, cluster, req.global_batch, profile, SearchSpace(executor_only=False), top=5)
    except MeshplanError as exc:
        reason = str(exc).split(":")[0][:60]
        serve.rejections[reason] = serve.rejections.get(reason, 0) + 1  # type: ignore[attr-defined]
        return False
    return len(res.ranked) > 0


def percentile(sorted_ms: list[float], p: float) -> float:
    """Nearest-rank percentile (the p-th percentile is the ceil(p/100 * n)-th value)."""
    return sorted_ms[max(0, min(len(sorted_ms) - 1, -(-len(sorted_ms) * p // 100) - 1))]


def _client(reqs: list[Request]) -> list[float]:
    """One client process: serve its requests in turn; their latencies (s)."""
    from planner.profiles import load_profile

    serve.rejections = {}  # type: ignore[attr-defined]
    profile = load_profile()
    lat = []
    for req in reqs:
        t = time.perf_counter()
        serve(req, profile)
        lat.append(time.perf_counter() - t)
    return lat


def run_clients(n: int, clients: int, seed: int = 0, max_gpus: int = GPU_COUNTS[-1]) -> dict:
    """The same n requests served by `clients` processes at once (n / clients each)."""
    import multiprocessing

    reqs = random_requests(n, seed, max_gpus, MODELS)
    chunks = [reqs[i::clients] for i in range(clients)]
    t0 = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(clients) as pool:
        lats = pool.map(_client, chunks)
    seconds = time.perf_counter() - t0
    ms = sorted(x * 1000 for lat in lats for x in lat)
    return {"clients": clients, "requests": n, "p50_ms": percentile(ms, 50),
            "p99_ms": percentile(ms, 99), "max_ms": ms[-1], "seconds": seconds,
            "requests_per_s": n / seconds}


def run_load(n: int = 1000, seed: int = 0, max_gpus: int = GPU_COUNTS[-1],
             models: tuple[str, ...] = MODELS) -> LoadReport:
    from planner.profiles import load_profile

    serve.rejections = {}  # type: ignore[attr-defined]
    rss_start = rss_mb()
    profile = load_profile()
    reqs = random_requests(n, seed, max_gpus, models)
    warm = max(1, n // 10)
    lat: list[float] = []
    served = 0
    rss_warm = rss_start
    samples: list[float] = []
    t0 = time.perf_counter()
    for i, req in enumerate(reqs):
        t = time.perf_counter()
        served += serve(req, profile)
        lat.append(time.perf_counter() - t)
        if i + 1 == warm:
            gc.collect()
            rss_warm = rss_mb()
        if (i + 1) % warm == 0:
            samples.append(round(rss_mb(), 1))
    seconds = time.perf_counter() - t0
    gc.collect()
    rss_end = rss_mb()
    ms = sorted(x * 1000 for x in lat)

    def pct(p: float) -> float:
        return percentile(ms, p)

    half = len(lat) // 2
    return LoadReport(
        requests=n, served=served, rejected=n - served, p50_ms=pct(50), p90_ms=pct(90),
        p99_ms=pct(99), max_ms=ms[-1], mean_ms=statistics.fmean(ms),
        first_half_p50_ms=statistics.median(lat[:half]) * 1000 if half else ms[0],
        second_half_p50_ms=statistics.median(lat[half:]) * 1000,
        rss_start_mb=rss_start, rss_warm_mb=rss_warm, rss_end_mb=rss_end,
        rss_growth_after_warmup_mb=rss_end - rss_warm, seconds=seconds, rss_samples_mb=samples,
        rejections=dict(serve.rejections),  # type: ignore[attr-defined]
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-gpus", type=int, default=GPU_COUNTS[-1],
                    help="largest GPU count drawn (default 1024)")
    ap.add_argument("--clients", type=int, default=4,
                    help="concurrent client processes for the second measurement (0: none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.requests < 1:
        ap.error("--requests must be >= 1")
    if args.clients < 0:
        ap.error("--clients must be >= 0")
    # The clients first, forked from a process that has served nothing (no warm caches).
    many = run_clients(args.requests, args.clients, args.seed, args.max_gpus) if args.clients else None
    rep = run_load(args.requests, args.seed, args.max_gpus)
    alone = {"clients": 1, "requests": rep.requests, "p50_ms": rep.p50_ms, "p99_ms": rep.p99_ms,
             "max_ms": rep.max_ms, "seconds": rep.seconds,
             "requests_per_s": rep.requests / rep.seconds}
    if args.json:
        print(json.dumps({**asdict(rep), "alone": alone,
                          f"clients_{args.clients}": many}, indent=1))
        return 0
    print(f"{rep.requests} search requests in {rep.seconds:.1f} s: {rep.served} served, "
          f"{rep.rejected} rejected with a one-line error")
    print(f"latency ms: p50 {rep.p50_ms:.1f}, p90 {rep.p90_ms:.1f}, p99 {rep.p99_ms:.1f}, "
          f"max {rep.max_ms:.1f} (median first half {rep.first_half_p50_ms:.1f}, second half "
          f"{rep.second_half_p50_ms:.1f})")
    print(f"RSS MB: start {rep.rss_start_mb:.0f}, after warm-up {rep.rss_warm_mb:.0f}, end "
          f"{rep.rss_end_mb:.0f} (growth after warm-up {rep.rss_growth_after_warmup_mb:+.1f}); "
          f"every 10%: {', '.join(f'{x:.0f}' for x in rep.rss_samples_mb)}")
    if many:
        print(f"{args.clients} concurrent clients, the same {many['requests']} requests: p50 "
              f"{many['p50_ms']:.1f} ms, p99 {many['p99_ms']:.1f} ms, "
              f"{many['requests_per_s']:.1f} requests/s (alone {alone['requests_per_s']:.1f})")
    for reason, count in sorted(rep.rejections.items(), key=lambda kv: -kv[1]):
        print(f"  rejected x{count}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
