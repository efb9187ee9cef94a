"""Calibration profile: the cost model's few free efficiency parameters, kept in a YAML file,
not in code. `costmodels/profiles/default.yaml` is fitted on `published_runs.csv`
(`benchmarks/fidelity.py --refit` reproduces it); `meshplan calibrate` writes new ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from importlib import resources
from typing import Any

import yaml

from costmodels.errors import MeshplanError

# Accelerator generation of each catalog key: GEMM efficiency is a property of the chip's
# tensor-core pipeline and its software stack, shared by parts of one generation.
GENERATION = {
    "a100-40gb": "ampere", "a100-80gb": "ampere",
    "h100-sxm": "hopper", "h100-hbm2e-lowpower": "hopper", "h800": "hopper", "h200": "hopper",
    "b200": "blackwell", "gb200": "blackwell", "b300": "blackwell", "gb300": "blackwell",
    "mi300x": "cdna3", "mi355x": "cdna4", "mi350x": "cdna4", "cpu": "cpu",
}


@dataclass(frozen=True)
class Profile:
    """Free parameters of the step-time and memory model. Bounds are physical ranges."""

    # Fraction of dense peak a large, compute-bound GEMM sustains, per generation (before
    # the shape terms of `costmodels.gemm`). Generations without published runs carry the
    # nearest fitted generation's figure (Blackwell: Hopper's) or a prior (CDNA: 0.55).
    gemm_eff: dict[str, float] = field(
        default_factory=lambda: {
            "ampere": 0.80, "hopper": 0.70, "blackwell": 0.70, "cdna3": 0.55, "cdna4": 0.55,
            "cpu": 0.80,
        }
    )
    # Realised share of the attention kernel's published utilisation (`costmodels.stacks`)
    # at training shapes (head dim 128, causal masking, the run's sequence length).
    attn_eff: float = 1.0
    # Share of HBM bandwidth streaming elementwise kernels achieve (STREAM-like copies reach
    # ~0.8-0.9 of peak on HBM parts).
    elementwise_eff: float = 0.8
    # Share of the overlap window (backward of the last micro-batch; all compute for ZeRO-3)
    # during which DP collectives progress.
    dp_overlap: float = 1.0
    # Achieved fraction of link bandwidth by NCCL collectives (bus bandwidth / link rate).
    link_eff: float = 0.8
    # Relative per-node step-time jitter; synchronous steps pay sigma sqrt(2 ln nodes).
    sync_jitter: float = 0.0
    # Fixed host-side cost per optimizer step (loop, optimizer launch, logging) (s).
    step_overhead_s: float = 0.0
    # GPU idle time per kernel launched back to back (launch latency and tail; ~2 us on
    # recent NVIDIA parts, NVIDIA's "Getting started with CUDA Graphs" measurements).
    kernel_gap_s: float = 2e-6
    # Host time per op the framework dispatches, autograd included (eager PyTorch ~10 us an
    # op; PyTorch 2, Ansel et al. 2024, gives it as the reason for CUDA graphs).
    host_op_s: float = 1e-5
    # Fixed host overhead per layer per micro-batch on a CPU host (s), fitted per machine.
    layer_overhead_s: float = 0.0
    # CPU hosts: time per meeting of the ranks at a collective that the measured link rates
    # miss (the first to arrive waits for the last, gloo works on a compute core, DTensor
    # dispatches around each sharded op; `costmodels.step_dp.cpu_sync_calls` counts the
    # meetings). Fitted per machine by `meshplan calibrate` (4-22 ms here); on an accelerator
    # the host queues kernels ahead and this is hidden, so it applies to CPU runs only.
    cpu_sync_call_s: float = 0.0
    # MoE: the share of the dense GEMM rate a grouped expert GEMM sustains at the same
    # shapes (scheduling of unequal groups, the permutation kernels' launch), and the load
    # imbalance, max / mean tokens per expert (1.0: balanced, as vendor benchmarks force;
    # the executor logs it per step as moe_imbalance, which `meshplan calibrate` reads).
    grouped_gemm_eff: float = 1.0
    moe_imbalance: float = 1.0
    # Memory: allocator fragmentation and workspace, as a factor on tensor bytes, plus a
    # constant (CUDA context is outside max_memory_allocated; cuBLAS/NCCL workspaces are in).
    memory_factor: float = 1.1
    memory_constant_gb: float = 1.0
    # Measured hardware by accelerator key (`meshplan bench`): any of bf16_tflops,
    # fp32_tflops, fp8_tflops, hbm_tb_s, scaleup_gbps, scaleout_gbps, link_latency_s, and for
    # CPU hosts host_cores and the one-thread rates fp32/bf16_tflops_1core (processes on one
    # host share its cores and memory bandwidth; threads_per_rank pins a run's thread count).
    hardware: dict[str, dict[str, float]] = field(default_factory=dict)
    # Cross-validated residual quantiles, log(measured / predicted) (`costmodels.uncertainty`):
    # "throughput" by model-size regime, "memory" pooled. Empty: predictions carry no band.
    uncertainty: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    source: str = "built-in starting values"

    # -- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "profile") -> Profile:
        if not isinstance(data, dict):
            raise MeshplanError(f"{source}: expected a mapping of profile parameters")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MeshplanError(
                f"{source}: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        base = cls()
        values: dict[str, Any] = {}
        for k, v in data.items():
            if k == "gemm_eff":
                if not isinstance(v, dict):
                    raise MeshplanError(f"{source}: gemm_eff must map generation -> fraction")
                merged = dict(base.gemm_eff)
                for gen, frac in v.items():
                    merged[str(gen)] = _fraction(frac, f"{source}: gemm_eff.{gen}")
                values[k] = merged
            elif k == "source":
                values[k] = str(v)
            elif k == "hardware":
                values[k] = _hardware(v, source)
            elif k == "uncertainty":
                values[k] = _uncertainty(v, source)
            else:
                try:
                    values[k] = float(v)
                except (TypeError, ValueError):
                    raise MeshplanError(f"{source}: {k}={v!r} is not a number") from None
        return replace(base, **values)

    def with_(self, **changes: Any) -> Profile:
        return replace(self, **changes)


HARDWARE_KEYS = (
    "bf16_tflops", "fp32_tflops", "fp8_tflops", "fp4_tflops", "hbm_tb_s", "scaleup_gbps", "scaleout_gbps",
    "link_latency_s", "host_cores", "threads_per_rank", "fp32_tflops_1core", "bf16_tflops_1core",
    "allgather_bw_rel", "allgather_latency_s", "reduce_scatter_bw_rel", "reduce_scatter_latency_s",
    "p2p_bw_rel", "p2p_latency_s", "elementwise_tb_s", "elementwise_tb_s_1core",
    "tp_allreduce_bw_rel", "tp_allreduce_latency_s", "tp_allgather_bw_rel", "tp_allgather_latency_s",
    "tp_reduce_scatter_bw_rel", "tp_reduce_scatter_latency_s", "probe_fp32_tflops",
)


def _hardware(v: Any, source: str) -> dict[str, dict[str, float]]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise MeshplanError(f"{source}: hardware must map accelerator -> measured figures")
    out: dict[str, dict[str, float]] = {}
    for acc, figs in v.items():
        if not isinstance(figs, dict):
            raise MeshplanError(f"{source}: hardware.{acc} must be a mapping")
        bad = sorted(set(figs) - set(HARDWARE_KEYS))
        if bad:
            raise MeshplanError(f"{source}: hardware.{acc}: unknown key(s) {', '.join(bad)}")
        entry = {}
        for key, val in figs.items():
            try:
                f = float(val)
            except (TypeError, ValueError):
                raise MeshplanError(f"{source}: hardware.{acc}.{key}={val!r} is not a number") from None
            if not f >= 0 or f == float("inf"):
                raise MeshplanError(f"{source}: hardware.{acc}.{key}={val!r} must be >= 0 and finite")
            entry[key] = f
        out[str(acc)] = entry
    return out


def _uncertainty(v: Any, source: str) -> dict[str, dict[str, list[float]]]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise MeshplanError(f"{source}: uncertainty must map quantity -> regime -> [low, high]")
    out: dict[str, dict[str, list[float]]] = {}
    for quantity, regimes in v.items():
        if not isinstance(regimes, dict):
            raise MeshplanError(f"{source}: uncertainty.{quantity} must map regime -> [low, high]")
        out[str(quantity)] = {}
        for regime, pair in regimes.items():
            try:
                lo, hi = (float(x) for x in pair)
            except (TypeError, ValueError):
                raise MeshplanError(f"{source}: uncertainty.{quantity}.{regime} must be [low, high]") from None
            if not lo <= hi:
                raise MeshplanError(f"{source}: uncertainty.{quantity}.{regime}: low {lo} > high {hi}")
            out[str(quantity)][str(regime)] = [lo, hi]
    return out


def _fraction(v: Any, where: str) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise MeshplanError(f"{where}={v!r} is not a number") from None
    if not 0 < f <= 1.5:
        raise MeshplanError(f"{where}={f} must be in (0, 1.5]")
    return f


def shipped_profile() -> Profile:
    """The profile shipped with the package (`profiles/default.yaml`), exactly. Where a plan's
    profile comes from otherwise (a file, this machine's measurements) is the planner's
    business (`planner.profiles`): the cost model reads nothing of the host or the user."""
    text = resources.files("costmodels").joinpath("profiles/default.yaml").read_text()
    return Profile.from_dict(yaml.safe_load(text), "default profile")


def parse_hardware(v: Any, source: str) -> dict[str, dict[str, float]]:
    """A profile's `hardware:` section, validated (accelerator -> measured figures)."""
    return _hardware(v, source)


def dump_profile(profile: Profile) -> str:
    return yaml.safe_dump(profile.to_dict(), sort_keys=False)
