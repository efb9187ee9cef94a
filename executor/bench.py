"""Microbenchmarks of this machine: GEMM throughput at the shapes a transformer layer uses,
memory bandwidth, and every collective the cost model uses across message sizes, fitted to
the alpha-beta model (latency + bytes / bandwidth). Gloo between processes on the CPU; NCCL
between GPUs when CUDA is present.

The result is a hardware override for the cost model's profile (`Profile.hardware[key]`),
so `--gpu cpu` plans use what was measured here.
"""

from __future__ import annotations

import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from executor.host import host_cores

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Ring-algorithm bytes each rank moves per byte of message, for n ranks (Thakur et al. 2005):
# all-reduce 2(n-1)/n, all-gather / reduce-scatter / all-to-all (n-1)/n, p2p 1.
BUS_FACTOR: dict[str, Callable[[int], float]] = {
    "all_reduce": lambda n: 2 * (n - 1) / n,
    "all_gather": lambda n: (n - 1) / n,
    "reduce_scatter": lambda n: (n - 1) / n,
    "all_to_all": lambda n: (n - 1) / n,
    "send_recv": lambda n: 1.0,
}
# The same collectives issued the way tensor parallelism issues them (DTensor redistribute,
# functional collectives): their fixed cost per call is the DTensor dispatch on top of the
# backend's, which is what TP's many small per-layer collectives pay.
TP_OPS = {"tp_all_reduce": "all_reduce", "tp_all_gather": "all_gather", "tp_reduce_scatter": "reduce_scatter"}
BUS_FACTOR.update({tp: BUS_FACTOR[raw] for tp, raw in TP_OPS.items()})


@dataclass
class BenchResult:
    device: str
    threads: int
    gemm: list[dict[str, float]] = field(default_factory=list)
    memory_gb_s: float = 0.0
    # Out-of-place elementwise ops, as autograd runs them: all threads, then one thread.
    elementwise_gb_s: float = 0.0
    elementwise_gb_s_1core: float = 0.0
    # The host-speed probe's median GEMM rate while the rates above were measured
    # (`executor.host_probe`; CPU hosts)
    probe_fp32_tflops: float = 0.0
    collectives: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0

    def gemm_tflops(self, dtype: str, threads: int | None = None) -> float:
        """Median TFLOP/s over the layer's GEMM shapes (all threads, or `threads`)."""
        vals = [g["tflops"] for g in self.gemm if g["dtype"] == dtype and g.get("threads") == (threads or self.threads)]
        return float(np.median(vals)) if vals else 0.0

    def hardware_override(self) -> dict[str, float]:
        """The profile's hardware entry: measured peaks, bandwidth, link alpha-beta."""
        out: dict[str, float] = {}
        for dt in ("fp32", "bf16"):
            one = self.gemm_tflops(dt, 1) if self.device == "cpu" and self.threads > 1 else 0.0
            if self.gemm_tflops(dt):
                # A process can always run one thread: its rate is never below the 1-core one.
                out[f"{dt}_tflops"] = max(self.gemm_tflops(dt), one)
            if one:
                out[f"{dt}_tflops_1core"] = one
        if self.memory_gb_s:
            out["hbm_tb_s"] = self.memory_gb_s / 1000
        if self.elementwise_gb_s:
            out["elementwise_tb_s"] = self.elementwise_gb_s / 1000
        if self.elementwise_gb_s_1core:
            out["elementwise_tb_s_1core"] = self.elementwise_gb_s_1core / 1000
        if self.probe_fp32_tflops:
            out["probe_fp32_tflops"] = self.probe_fp32_tflops
        ar = self.collectives.get("all_reduce")
        if self.device == "cpu":
            out["host_cores"] = float(self.threads)
        if ar:
            n = ar.get("world", 2)
            out["scaleout_gbps"] = ar["bus_gbps"]
            out["scaleup_gbps"] = ar["bus_gbps"]
            # The cost model charges a ring all-reduce 2(n-1) latencies and an all-gather or
            # reduce-scatter n-1 (costmodels.comm): the fitted alpha is the whole fixed cost.
            out["link_latency_s"] = ar["alpha_s"] / (2 * (n - 1))
            for op, key, steps in (("all_gather", "allgather", n - 1),
                                   ("reduce_scatter", "reduce_scatter", n - 1),
                                   ("send_recv", "p2p", 1),
                                   ("tp_all_reduce", "tp_allreduce", 2 * (n - 1)),
                                   ("tp_all_gather", "tp_allgather", n - 1),
                                   ("tp_reduce_scatter", "tp_reduce_scatter", n - 1)):
                fit = self.collectives.get(op)
                if fit and ar["bus_gbps"] > 0:
                    out[f"{key}_bw_rel"] = fit["bus_gbps"] / ar["bus_gbps"]
                    out[f"{key}_latency_s"] = fit["alpha_s"] / steps
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device, "threads": self.threads, "seconds": self.seconds,
            "gemm": self.gemm, "memory_gb_s": self.memory_gb_s, "collectives": self.collectives,
            "elementwise_gb_s": self.elementwise_gb_s, "elementwise_gb_s_1core": self.elementwise_gb_s_1core,
            "probe_fp32_tflops": self.probe_fp32_tflops, "hardware_override": self.hardware_override(),
        }


def _timeit(fn: Callable[[], object], repeats: int, sync: Callable[[], None], best: bool = False) -> float:
    """Median time of `repeats` calls, or the best (what the hardware can do when nothing
    else is running: `timeit`'s convention for compute kernels)."""
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times) if best else statistics.median(times)


def layer_gemm_shapes(hidden: int, ffn: int, tokens: int, kv_dim: int | None = None) -> list[tuple[int, int, int]]:
    """(m, n, k) of a transformer layer's GEMMs: QKV, output projection, MLP up, MLP down."""
    kv = kv_dim or hidden
    return [(tokens, hidden + 2 * kv, hidden), (tokens, hidden, hidden), (tokens, ffn, hidden), (tokens, hidden, ffn)]


def gemm_repeats(dtype: str, device: str, quick: bool) -> int:
    """Timed calls per GEMM shape. The best of many: a shared host's speed moves by ~10%
    over seconds (best of 3 read 0.073-0.100 TFLOP/s here where best of 30 read 0.096-0.117),
    and the fit can only lower the rate it is given. CPU bf16 is emulated (~0.5 s a call at
    these shapes) and no CPU run uses it: a few calls."""
    if device == "cpu" and dtype != "fp32":
        return 3 if quick else 5
    return 20 if quick else 30


def bench_gemm(
    shapes: list[tuple[int, int, int]], dtypes: list[str], device: str = "cpu", quick: bool = False,
    between: Callable[[], None] | None = None,
) -> list[dict[str, float]]:
    """Best-of-`gemm_repeats` TFLOP/s per shape and dtype; `between` runs after each shape."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    out = []
    for dt in dtypes:
        repeats = gemm_repeats(dt, device, quick)
        for m, n, k in shapes:
            a = torch.randn(m, k, device=device, dtype=DTYPES[dt])
            b = torch.randn(k, n, device=device, dtype=DTYPES[dt])
            t = _timeit(lambda a=a, b=b: a @ b, repeats, sync, best=True)
            out.append({"dtype": dt, "m": m, "n": n, "k": k, "seconds": t, "tflops": 2 * m * n * k / t / 1e12,
                        "threads": torch.get_num_threads()})
            if between is not None:
                between()
    return out


def bench_memory(device: str = "cpu", mbytes: int = 64, repeats: int = 20) -> float:
    """GB/s of an in-place add (reads two arrays, writes one): the STREAM 'add' kernel."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n = mbytes * 1024 * 1024 // 4
    a = torch.ones(n, device=device)
    b = torch.ones(n, device=device)
    t = _timeit(lambda: a.add_(b), repeats, sync, best=True)
    return 3 * n * 4 / t / 1e9


def bench_elementwise(device: str = "cpu", mbytes: int = 32, repeats: int = 20) -> float:
    """GB/s of an out-of-place add (c = a + b, a fresh output each call): how the forward and
    backward passes' elementwise kernels run. On a CPU host every fresh activation-sized
    buffer is page-faulted in, so this is far below the in-place STREAM figure."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    n = mbytes * 1024 * 1024 // 4
    a = torch.ones(n, device=device)
    b = torch.ones(n, device=device)
    t = _timeit(lambda: torch.add(a, b), repeats, sync, best=True)
    return 3 * n * 4 / t / 1e9


_ALL_GATHER = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _collective_worker(rank: int, world: int, port: int, sizes: list[int], repeats: int, out_path: str, backend: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world)
    device = f"cuda:{rank}" if backend == "nccl" else "cpu"
    sync = torch.cuda.synchronize if backend == "nccl" else (lambda: None)
    results: dict[str, list[tuple[int, float]]] = {k: [] for k in BUS_FACTOR}
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cuda" if backend == "nccl" else "cpu", (world,))
    for nbytes in sizes:
        n = max(world, nbytes // 4 // world * world)
        x = torch.ones(n, device=device)
        out_g = torch.empty(n * world, device=device)
        out_rs = torch.empty(n // world, device=device)
        out_a2a = torch.empty(n, device=device)

        def p2p(x=x):
            if rank % 2 == 0 and rank + 1 < world:
                dist.send(x, rank + 1)
            elif rank % 2 == 1:
                dist.recv(x, rank - 1)

        ops = {
            "all_reduce": lambda x=x: dist.all_reduce(x),
            "all_gather": lambda x=x, o=out_g: _ALL_GATHER(o, x),
            "reduce_scatter": lambda x=x, o=out_rs: _REDUCE_SCATTER(o, x),
            "all_to_all": lambda x=x, o=out_a2a: dist.all_to_all_single(o, x),
            "send_recv": p2p,
        }
        ops.update(_dtensor_ops(mesh, x))
        for name, fn in ops.items():
            dist.barrier()
            t = _timeit(fn, repeats, sync)
            # All-gather moves the gathered size; the others the message size.
            moved = n * 4 * (world if name in ("all_gather", "tp_all_gather") else 1)
            results[name].append((moved, t))
    if rank == 0:
        torch.save(results, out_path)
    dist.barrier()
    dist.destroy_process_group()


def _dtensor_ops(mesh: Any, x: torch.Tensor) -> dict[str, Callable[[], object]]:
    """All-reduce, all-gather and reduce-scatter of `x` as DTensor redistributions."""
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

    def run(src: Any, dst: Any) -> object:
        out = src.redistribute(mesh, [dst]).to_local()
        return out.wait() if hasattr(out, "wait") else out  # functional collectives are async

    partial = DTensor.from_local(x, mesh, [Partial()], run_check=False)
    shard = DTensor.from_local(x, mesh, [Shard(0)], run_check=False)
    return {
        "tp_all_reduce": lambda: run(partial, Replicate()),
        "tp_all_gather": lambda: run(shard, Replicate()),
        "tp_reduce_scatter": lambda: run(partial, Shard(0)),
    }


def fit_alpha_beta(points: list[tuple[int, float]], bus_factor: float) -> dict[str, float]:
    """Non-negative least squares t = alpha + bus_factor * bytes / beta over message sizes, on
    the relative error (times span orders of magnitude: an absolute fit would ignore the small
    messages that set alpha)."""
    from scipy.optimize import nnls

    x = np.array([p[0] * bus_factor for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    scale = x.max() or 1.0  # condition the two columns alike
    a = np.stack([1 / y, x / scale / y], axis=1)
    (alpha, inv_beta_scaled), _ = nnls(a, np.ones_like(y))
    inv_beta = inv_beta_scaled / scale
    if inv_beta <= 0:  # timing noise swamped the size dependence: charge half the largest
        i = int(np.argmax(x))  # message's time to its bytes
        inv_beta = max(0.5 * y[i] / x[i], 1e-15)
    return {"alpha_s": float(alpha), "bus_gbps": float(1 / inv_beta / 1e9), "points": len(points)}


def bench_collectives(world: int = 2, sizes: list[int] | None = None, repeats: int = 5, timeout_s: float = 300) -> dict[str, dict[str, float]]:
    sizes = sizes or [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]
    backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= world else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "coll.pt")
        ctx = mp.start_processes(
            _collective_worker, args=(world, _free_port(), sizes, repeats, out, backend),
            nprocs=world, join=False, start_method="spawn",
        )
        deadline = time.monotonic() + timeout_s
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                raise TimeoutError(f"collective benchmark exceeded {timeout_s:.0f} s")
        raw = torch.load(out, weights_only=True)
    result = {}
    for name, pts in raw.items():
        fit = fit_alpha_beta(pts, BUS_FACTOR[name](world))
        fit["world"] = world
        fit["backend"] = backend
        result[name] = fit
    return result


# The tiny model's layer (hidden, ffn, tokens at micro-batch 16 x 128): the quick bench's GEMMs
BENCH_MODEL_DIMS = (256, 688, 128 * 16)


def run_bench(
    quick: bool = False, world: int = 2, device: str | None = None,
    model_dims: tuple[int, int, int] = BENCH_MODEL_DIMS,
) -> BenchResult:
    """Benchmark GEMMs at a layer's shapes (hidden, ffn, tokens), memory and collectives."""
    t0 = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    h, f, tokens = model_dims
    shapes = layer_gemm_shapes(h, f, tokens)
    if not quick:
        shapes += layer_gemm_shapes(1024, 2816, 2048)
    before = torch.get_num_threads()
    threads = host_cores() if device == "cpu" else before
    res = BenchResult(device=device, threads=threads)
    # On a CPU host the speed probe runs between the phases, so its reference figure is the
    # host's speed while the rates were measured, not a moment before or after.
    from executor.host_probe import HostProbe

    probe = HostProbe() if device == "cpu" else None
    probes: list[float] = []

    def between() -> None:
        if probe is not None:
            probes.extend(probe.measure() for _ in range(3))

    try:
        torch.set_num_threads(threads)  # the whole host, whatever OMP_NUM_THREADS says
        between()
        res.gemm = bench_gemm(shapes, ["fp32"], device, quick, between=between)
        res.gemm += bench_gemm(shapes, ["bf16"], device, quick)
        between()
        res.memory_gb_s = bench_memory(device, mbytes=32 if quick else 128)
        between()
        res.elementwise_gb_s = bench_elementwise(device, mbytes=32)
        between()
        if device == "cpu" and threads > 1:
            # Ranks of a multi-process run split the cores (down to one thread each): the
            # cost model interpolates between the one-thread and all-cores rates.
            torch.set_num_threads(1)
            res.gemm += bench_gemm(shapes, ["fp32"], device, quick, between=between)
            res.gemm += bench_gemm(shapes, ["bf16"], device, quick)
            res.elementwise_gb_s_1core = bench_elementwise(device, mbytes=32)
            between()
        if probes:
            res.probe_fp32_tflops = statistics.median(probes)
    finally:
        torch.set_num_threads(before)
    if world > 1:
        sizes = [16 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20] if quick else None
        res.collectives = bench_collectives(world, sizes, repeats=7)
    res.seconds = time.perf_counter() - t0
    return res
