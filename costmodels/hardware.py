"""Accelerator catalog.

Figures are transcribed from `shared/data/accelerators_reference.csv` (vendor datasheets,
dense peaks, not the sparsity numbers); `tests/costmodels/test_hardware.py` checks this
table against that file so the two cannot drift apart. `cpu` describes this kind of
development machine (2 cores, gloo between processes); its defaults were measured here
with `torch.matmul` on 1024x1024 operands and are replaced by `meshplan bench`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from costmodels.specs import SpecError


@dataclass(frozen=True)
class Accelerator:
    key: str
    bf16_tflops: float  # dense peak
    fp8_tflops: float  # dense peak (0 = unsupported)
    fp32_tflops: float  # plain FP32 (non-tensor-core) peak, used for fp32 runs
    hbm_gb: float
    hbm_tb_s: float
    scaleup_gbps: float  # GB/s per GPU per direction (NVLink / xGMI)
    scaleout_gbps: float  # GB/s per GPU per direction (NIC), from Gb/s / 8
    gpus_per_node: int
    tdp_w: float
    # Relative sustained clock under the power cap vs the catalog peak's assumption.
    power_derate: float = 1.0
    fp4_tflops: float = 0.0  # dense FP4 (NVFP4 / MXFP4) peak (0 = unsupported)
    sms: int = 0  # streaming multiprocessors (NVIDIA) / compute units (AMD): GEMM wave size
    nvlink_domain: int = 0  # GPUs in one scale-up domain (NVL72: 72); 0 = gpus_per_node

    def peak_tflops(self, precision: str) -> float:
        """Dense peak for the precision a run computes in (fp16 equals bf16 on these parts)."""
        if precision == "fp8":
            if self.fp8_tflops <= 0:
                raise SpecError(f"precision=fp8: {self.key} has no FP8 tensor cores; use bf16")
            return self.fp8_tflops
        if precision == "fp4":
            if self.fp4_tflops <= 0:
                raise SpecError(f"precision=fp4: {self.key} has no FP4 tensor cores; use fp8 or bf16")
            return self.fp4_tflops
        if precision == "fp32":
            return self.fp32_tflops
        return self.bf16_tflops


# bf16/fp8 dense TFLOP/s, HBM GB, HBM TB/s, NVLink GB/s per direction, NIC Gb/s per GPU / 8.
# SM / CU counts: NVIDIA A100 (108), H100 SXM (132) and Blackwell (B200 148, B300 160)
# architecture whitepapers; AMD CDNA3 (MI300X, 304 CUs) and CDNA4 (MI350 series, 256 CUs)
# datasheets.
ACCELERATORS: dict[str, Accelerator] = {
    a.key: a
    for a in (
        Accelerator("a100-40gb", 312.0, 0.0, 19.5, 40, 1.555, 300, 200 / 8, 8, 400, sms=108),
        Accelerator("a100-80gb", 312.0, 0.0, 19.5, 80, 2.039, 300, 200 / 8, 8, 400, sms=108),
        Accelerator("h100-sxm", 989.4, 1978.9, 66.9, 80, 3.35, 450, 400 / 8, 8, 700, sms=132),
        # Meta's 96 GB HBM2e H100 capped at 500 W: same die, lower sustained clock. The
        # derate (500 W / 700 W)^(1/3) assumes power ~ f^3 under DVFS (a physics prior,
        # not a fit); the reference CSV only bounds its peak between H100 NVL and SXM.
        Accelerator(
            "h100-hbm2e-lowpower", 989.4, 1978.9, 66.9, 96, 2.4, 450, 400 / 8, 8, 500,
            power_derate=(500 / 700) ** (1 / 3), sms=132,
        ),
        Accelerator("h800", 989.4, 1978.9, 66.9, 80, 3.35, 200, 400 / 8, 8, 700, sms=132),
        Accelerator("h200", 989.4, 1978.9, 66.9, 141, 4.8, 450, 400 / 8, 8, 700, sms=132),
        Accelerator("b200", 2250.0, 4500.0, 80.0, 180, 7.7, 900, 400 / 8, 8, 1000, fp4_tflops=9000.0,
                    sms=148),
        # GB200 NVL72 (reference CSV): 72 GPUs in one NVLink domain, 4 GPUs per compute tray.
        Accelerator("gb200", 2450.0, 4900.0, 80.0, 186, 8.0, 900, 400 / 8, 4, 1200, fp4_tflops=9800.0,
                    sms=148, nvlink_domain=72),
        # Blackwell Ultra (not in the reference CSV): NVIDIA HGX B300 and GB300 NVL72 product
        # pages, dense figures (half the sparse ones quoted): B300 2.25 / 4.5 / 13.5 PFLOP/s
        # bf16 / fp8 / fp4, 288 GB HBM3e at 8 TB/s, NVLink 5 (1.8 TB/s bidirectional);
        # GB300 2.5 / 5 / 15 PFLOP/s, ConnectX-8 800 Gb/s per GPU, 72-GPU NVLink domain.
        Accelerator("b300", 2250.0, 4500.0, 75.0, 288, 8.0, 900, 800 / 8, 8, 1100, fp4_tflops=13500.0,
                    sms=160),
        Accelerator("gb300", 2500.0, 5000.0, 80.0, 288, 8.0, 900, 800 / 8, 4, 1400, fp4_tflops=15000.0,
                    sms=160, nvlink_domain=72),
        Accelerator("mi300x", 1307.4, 2614.9, 163.4, 192, 5.3, 448, 400 / 8, 8, 750, sms=304),
        # AMD Instinct MI355X / MI350X datasheets (not in the reference CSV): dense bf16 2516.6 /
        # 2307.2, fp8 5033 / 4614, MXFP4 10066 / 9228 TFLOP/s, 288 GB HBM3E at 8 TB/s, 7 Infinity
        # Fabric links of 76.8 GB/s per direction (537.6 GB/s per GPU), 1400 / 1000 W.
        Accelerator("mi355x", 2516.6, 5033.0, 157.3, 288, 8.0, 537.6, 400 / 8, 8, 1400,
                    fp4_tflops=10066.0, sms=256),
        Accelerator("mi350x", 2307.2, 4614.0, 144.2, 288, 8.0, 537.6, 400 / 8, 8, 1000,
                    fp4_tflops=9228.0, sms=256),
        # This development machine: 2 cores; 0.18 TFLOP/s fp32 and 0.42 bf16 measured with
        # torch.matmul (1024^3) here; "HBM" is host memory, 10 GB/s, within the 6-54 GB/s
        # that `meshplan bench` (STREAM add) measured here; 1 GB/s gloo links, within the
        # 0.7-2.9 GB/s all-reduce bus bandwidth it measured. `meshplan bench` replaces all.
        Accelerator("cpu", 0.42, 0.0, 0.18, 24, 0.01, 1.0, 1.0, 1, 0),
    )
}


def cpu_threads_per_rank(ranks_on_host: int, cores: int) -> int:
    """Threads each rank of a CPU run uses: the host's cores split evenly among its ranks
    (what `meshplan run` sets unless OMP_NUM_THREADS says otherwise; the executor counts the
    cores, `executor.host.host_cores`)."""
    return max(1, cores // max(1, ranks_on_host))


def is_host_rate(key: str) -> bool:
    """A hardware entry's compute (`*_tflops`) or memory (`*_tb_s`) rate, all-core or
    one-thread: what moves with a host's speed. Links, latencies and counts do not."""
    return key.endswith(("_tflops", "_tflops_1core", "_tb_s", "_tb_s_1core")) and not key.startswith("probe_")


def at_host_speed(hw: Mapping[str, float], probe_fp32_tflops: float | None) -> dict[str, float]:
    """A measured host's hardware entry at the speed a run's probe saw (`executor.host_probe`):
    its compute and memory rates (`is_host_rate`) scaled by the run's probe rate over the
    probe rate measured beside them (`probe_fp32_tflops`: one factor, as a shared host slows
    all its work alike; the all-core probe scales the one-thread rates too). Links and the
    fitted per-call and per-layer overheads stay as measured. Unchanged where the entry or
    the run has no probe."""
    ref = hw.get("probe_fp32_tflops")
    if not (probe_fp32_tflops and ref):
        return dict(hw)
    return {k: v * probe_fp32_tflops / ref if is_host_rate(k) else v for k, v in hw.items()}


def get_accelerator(key: str) -> Accelerator:
    k = key.strip().lower()
    if k not in ACCELERATORS:
        raise SpecError(
            f"--gpu {key!r}: unknown accelerator; choose one of {', '.join(sorted(ACCELERATORS))}"
        )
    return ACCELERATORS[k]
