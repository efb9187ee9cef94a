"""How fast this host runs right now: one fixed GEMM, timed on every core. A shared CPU
host (a VM's vCPUs, a busy workstation) changes speed from minute to minute: on the 2-vCPU
CI host the one-process micro-batch-8 step of the tiny model took 0.44 s in one run and
0.57 s in another, and over 3 minutes this probe's rate and the step rate moved together
(correlation 0.72 over 258 steps). The bench runs the probe between its phases
(`BenchResult.probe_fp32_tflops`); a run with `train.host_probe` logs it after each step
(`host_fp32_tflops`), and calibration prices that run at the speed it saw
(`costmodels.hardware.at_host_speed`)."""

from __future__ import annotations

import time

import torch

from executor.bench import BENCH_MODEL_DIMS, layer_gemm_shapes
from executor.host import host_cores

# The bench's MLP up-projection GEMM (2048 x 688 x 256): ~6 ms a call here, short beside a step.
PROBE_GEMM = layer_gemm_shapes(*BENCH_MODEL_DIMS)[2]
PROBE_CALLS = 3  # best of: one call can land on a descheduled slice


class HostProbe:
    """Holds its operands, so each probe times the GEMM and its output's allocation, as the
    bench's GEMM timings do."""

    def __init__(self) -> None:
        m, n, k = PROBE_GEMM
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(m, k, generator=gen)
        self.b = torch.randn(k, n, generator=gen)

    def measure(self) -> float:
        """TFLOP/s of the probe GEMM on all of the host's cores (best of `PROBE_CALLS`)."""
        before = torch.get_num_threads()
        torch.set_num_threads(host_cores())
        try:
            best = float("inf")
            for _ in range(PROBE_CALLS):
                t0 = time.perf_counter()
                self.a @ self.b
                best = min(best, time.perf_counter() - t0)
        finally:
            torch.set_num_threads(before)
        m, n, k = PROBE_GEMM
        return 2 * m * n * k / best / 1e12
