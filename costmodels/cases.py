"""The case table: one row per (model, layout, system) to evaluate, as a dict of numpy
columns. The step-time and memory model is a set of array expressions over these columns,
so the planner evaluates hundreds of thousands of candidate layouts in one call (Calculon
evaluates one Python object graph at a time; STYLE.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace

import numpy as np

from costmodels.comm import group_link
from costmodels.hardware import cpu_threads_per_rank, get_accelerator
from costmodels.pipeline import SCHEDULE_NAMES
from costmodels.profile import GENERATION
from costmodels.specs import PRECISIONS, RECOMPUTES, SHARDINGS, ClusterSpec, Layout, ModelSpec
from costmodels.stacks import stack_columns, stack_for

Cases = dict[str, np.ndarray]

GEN_ORDER = ("ampere", "hopper", "blackwell", "cdna3", "cpu", "cdna4")
TP_COLLECTIVE_FALLBACK = {"tp_allgather": "allgather", "tp_reduce_scatter": "reduce_scatter"}


def model_columns(model: ModelSpec, seq_len: int | None = None) -> dict[str, float]:
    """Scalar columns describing a model (broadcast against layout columns). Per-layer
    figures of a model mixing dense and MoE layers are means over its layers."""
    moe = model.is_moe
    frac = model.moe_layers / model.layers if moe else 0.0
    attn_norms = model.attention_params() + 2 * model.norm_params()
    routed = model.num_experts * model.mlp_params(model.expert_ffn) if moe else 0
    moe_dense_part = model.moe_mlp_params() - routed if moe else 0  # router, shared experts, gate
    k = model.experts_topk if moe else 1
    return {
        "layers": model.layers,
        "hidden": model.hidden,
        "q_dim": model.q_dim,
        "ffn": model.expert_ffn if moe else model.ffn_hidden,
        "heads": model.heads,
        "kv_dim": model.kv_dim,
        "vocab": model.vocab,
        "seq": seq_len or model.seq_len,
        "swiglu": model.mlp == "swiglu",
        "mlp_mats": model.mlp_matrices,
        "experts": max(model.num_experts, 1),
        "active_experts": k,
        # MoE models: the share of layers with experts, the dense layers' MLP width and the
        # shared experts' total width; "ffn_active" is the MLP width a token's GEMMs see,
        # averaged over layers (k routed experts + shared ones, or a dense MLP).
        "moe_frac": frac,
        "dense_ffn": model.ffn_hidden,
        "shared_ffn": model.shared_ffn,
        "ffn_active": (frac * (k * model.expert_ffn + model.shared_ffn) + (1 - frac) * model.ffn_hidden
                       if moe else model.ffn_hidden),
        # Per layer: what every rank of a TP group holds a slice of (attention, norms, a
        # dense MLP, an MoE layer's router and shared experts), and the routed experts
        # (sharded further over EP).
        "params_layer_dense": attn_norms + (frac * moe_dense_part + (1 - frac) * model.mlp_params()
                                            if moe else model.mlp_params()),
        "params_layer_expert": frac * routed,
        "params_embed": model.vocab * model.hidden,
        "params_output": 0 if model.tied_embeddings else model.vocab * model.hidden,
        "params_total": model.param_count(),
        "params_active": model.param_count(active_only=True),
    }


def hardware_columns(accelerator: str, precision: str) -> dict[str, float]:
    acc = get_accelerator(accelerator)
    bf16 = acc.peak_tflops("fp32" if precision == "fp32" else "bf16") * 1e12 * acc.power_derate
    gemm = acc.peak_tflops(precision) * 1e12 * acc.power_derate
    return {
        "peak_gemm": gemm,  # GEMMs run in the run's precision (FP8 where asked)
        "peak_bf16": bf16,  # attention and the MFU denominator of non-FP8 runs
        "peak_mfu": acc.peak_tflops(precision) * 1e12,  # MFU is quoted against catalog peak
        "hbm_bytes": acc.hbm_gb * 1e9,
        "hbm_bw": acc.hbm_tb_s * 1e12,
        # Elementwise kernels (norms, activations, softmax): streaming at HBM bandwidth on an
        # accelerator; `meshplan bench` measures them where that does not hold (CPU hosts).
        "elem_bw": acc.hbm_tb_s * 1e12,
        "gen_idx": GEN_ORDER.index(GENERATION[acc.key]),
        "sms": acc.sms,
        "act_bytes": 4.0 if precision == "fp32" else 2.0,
    }


def expert_link_columns(cluster: ClusterSpec, tp: np.ndarray, ep: np.ndarray) -> dict[str, np.ndarray]:
    """The expert-parallel group's links for its all-to-all: `ep` ranks at stride tp (carved
    from dp x cp, innermost). Each rank sends to every other rank directly, so its traffic
    splits by destination: to the `ep_local` members of its scale-up domain over the
    scale-up fabric (`ep_up_bw`), to the rest through its own NIC (`ep_out_bw`)."""
    from costmodels.comm import NET_LATENCY_S, NVLINK_LATENCY_S
    from costmodels.hardware import get_accelerator

    acc = get_accelerator(cluster.accelerator)
    up = cluster.scaleup_gbps or acc.scaleup_gbps
    out = cluster.scaleout_gbps or acc.scaleout_gbps
    tp, ep = np.asarray(tp, dtype=np.float64), np.asarray(ep, dtype=np.float64)
    local = np.minimum(ep, np.maximum(np.floor(cluster.domain_size / tp), 1.0))
    crosses = local < ep
    return {
        "ep_local": local,
        "ep_up_bw": np.full(len(tp), float(up)),
        "ep_out_bw": np.full(len(tp), float(out)),
        "ep_lat": np.where(crosses, NET_LATENCY_S, NVLINK_LATENCY_S),
    }


def link_columns(
    cluster: ClusterSpec, tp: np.ndarray, cp: np.ndarray, dp: np.ndarray, pp: np.ndarray,
    dp_shard: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """Bandwidth / latency of each process group, ranks ordered tp -> cp -> dp -> pp.

    `shard` is the ZeRO sharding group (cp x dp_shard consecutive ranks at stride tp) and
    `rep` the replica group across sharding groups (HSDP)."""
    shard = dp if dp_shard is None else np.where(dp_shard > 0, dp_shard, dp)
    out: dict[str, np.ndarray] = {}
    groups = {
        "tp": (np.ones_like(tp), tp),
        "cp": (tp, cp),
        "dp": (tp * cp, dp),
        "pp": (tp * cp * dp, pp),
        "shard": (tp, cp * shard),
        "rep": (tp * cp * shard, dp // shard),
    }
    for name, (stride, size) in groups.items():
        keys = np.asarray(stride, dtype=np.int64) * (1 << 32) + np.asarray(size, dtype=np.int64)
        uniq, inv = np.unique(keys, return_inverse=True)
        p2p = name in ("pp", "cp")  # point-to-point sends, not collectives
        vals = np.array([group_link(cluster, int(k >> 32), int(k & 0xFFFFFFFF), not p2p) for k in uniq])
        out[f"{name}_bw"] = vals[inv.reshape(-1), 0]
        out[f"{name}_lat"] = vals[inv.reshape(-1), 1]
    # A DP collective over dp*cp replicas (CP ranks hold the same weights) rides the slower
    # of the two groups.
    return out


def layout_columns(layouts: Iterable[Layout]) -> dict[str, np.ndarray]:
    rows = list(layouts)
    col = lambda f: np.array([f(r) for r in rows])  # noqa: E731
    return {
        "tp": col(lambda r: r.tp), "pp": col(lambda r: r.pp), "dp": col(lambda r: r.dp),
        "cp": col(lambda r: r.cp), "ep": col(lambda r: r.ep), "vpp": col(lambda r: r.stages_per_rank),
        "sharding": col(lambda r: SHARDINGS.index(r.sharding)),
        "micro": col(lambda r: r.micro_batch), "gbs": col(lambda r: r.global_batch),
        "recompute": col(lambda r: RECOMPUTES.index(r.recompute)),
        "sp": col(lambda r: r.sequence_parallel),
        "schedule": col(lambda r: SCHEDULE_NAMES.index(r.effective_schedule)),
        "precision_idx": col(lambda r: PRECISIONS.index(r.precision)),
        "dp_shard": col(lambda r: r.dp_shard),
        "recompute_layers": col(lambda r: r.recompute_layers),
        "loss_chunks": col(lambda r: r.loss_chunks),
    }


def loss_chunks_column(c: Mapping[str, object]) -> np.ndarray:
    """`Layout.loss_chunks` per row of a case or candidate table (1, the whole micro-batch,
    where the table carries none)."""
    if "loss_chunks" in c:
        return np.asarray(c["loss_chunks"], dtype=np.int64)
    return np.ones(len(np.asarray(c["tp"])), dtype=np.int64)


def _thread_rate(hw: Mapping[str, float], key: str, threads: float, cores: float) -> float:
    """A figure `meshplan bench` measured with all cores (`key`) and with one thread
    (`key`_1core), for a process running `threads` threads: interpolated linearly between
    the two (0 if neither was measured)."""
    full, one = hw.get(key, 0.0), hw.get(f"{key}_1core", 0.0)
    if not one or not full:
        return one or full
    t = min(max(threads, 1.0), cores)
    return one + (full - one) * (t - 1) / max(cores - 1, 1)


def _measured(cluster: ClusterSpec, precision: str, hw: Mapping[str, float]) -> tuple[ClusterSpec, dict[str, float]]:
    """Apply a profile's measured hardware figures (`meshplan bench`) to the cluster and
    the hardware columns."""
    cols = hardware_columns(cluster.accelerator, precision)
    key = {"fp32": "fp32_tflops", "fp8": "fp8_tflops", "fp4": "fp4_tflops"}.get(precision, "bf16_tflops")
    if hw.get(key):
        cols["peak_gemm"] = cols["peak_mfu"] = hw[key] * 1e12
    bf = hw.get("fp32_tflops" if precision == "fp32" else "bf16_tflops")
    if bf:
        cols["peak_bf16"] = bf * 1e12
    if hw.get("hbm_tb_s"):
        cols["hbm_bw"] = hw["hbm_tb_s"] * 1e12
    if hw.get("elementwise_tb_s"):
        cols["elem_bw"] = hw["elementwise_tb_s"] * 1e12
    cores = hw.get("host_cores", 0.0)
    if cores and cluster.accelerator == "cpu":
        ranks = cluster.num_gpus  # a CPU run's ranks share one host
        threads = hw.get("threads_per_rank") or cpu_threads_per_rank(ranks, int(cores))
        # Oversubscribed cores (ranks x threads > cores) time-share; and ranks running at once
        # share what the host delivers with every core busy (caches, memory bandwidth, SMT
        # siblings): the ranks together never exceed the all-core figure `meshplan bench`
        # measured, so each gets at most its share of it.
        share = min(1.0, cores / (ranks * threads))
        cols["core_share"] = share
        cols["core_capacity"] = cores / threads  # ranks the host runs at full speed at once
        busy = 1.0 / ranks  # this rank's share of the host's all-core figure
        key = "fp32_tflops" if precision == "fp32" else "bf16_tflops"
        rate = _thread_rate(hw, key, threads, cores)
        if rate:
            rate = min(rate * share, hw.get(key, rate) * busy)
            cols["peak_gemm"] = cols["peak_bf16"] = cols["peak_mfu"] = rate * 1e12
        elem = _thread_rate(hw, "elementwise_tb_s", threads, cores)
        if elem:
            cols["elem_bw"] = min(elem * share, hw.get("elementwise_tb_s", elem) * busy) * 1e12
        cols["hbm_bw"] = cols["hbm_bw"] * busy  # the ranks share the host's streaming bandwidth
    up, out = hw.get("scaleup_gbps", 0.0), hw.get("scaleout_gbps", 0.0)
    if up or out:
        cluster = replace(cluster, scaleup_gbps=up or cluster.scaleup_gbps,
                          scaleout_gbps=out or cluster.scaleout_gbps)
    return cluster, cols


def build_cases(
    model: ModelSpec, cluster: ClusterSpec, layout_cols: Mapping[str, np.ndarray], precision: str = "bf16",
    seq_len: int | None = None, hardware: Mapping[str, float] | None = None,
    framework: str | None = None,
) -> Cases:
    """Cases for one model on one cluster over many layouts (the planner's table).
    `hardware`: measured figures overriding the catalog (a profile's `hardware[key]`);
    `framework`: the training stack (`costmodels.stacks`; default: meshplan's executor)."""
    n = len(layout_cols["tp"])
    cases: Cases = {k: np.asarray(v) for k, v in layout_cols.items()}
    cluster, hw_cols = _measured(cluster, precision, hardware or {})
    cols = {**model_columns(model, seq_len), **hw_cols, **stack_columns(stack_for(framework))}
    cols["precision_idx"] = PRECISIONS.index(precision) if precision in PRECISIONS else 0
    for k, v in cols.items():
        cases[k] = np.full(n, v)
    n_rows = len(cases["tp"])
    cases.setdefault("dp_shard", np.zeros(n_rows, dtype=np.int64))
    cases.setdefault("recompute_layers", np.zeros(n_rows, dtype=np.int64))
    cases.setdefault("loss_chunks", np.ones(n_rows, dtype=np.int64))
    cases.update(link_columns(cluster, cases["tp"], cases["cp"], cases["dp"], cases["pp"], cases["dp_shard"]))
    cases.setdefault("ep", np.ones(n_rows, dtype=np.int64))
    cases.update(expert_link_columns(cluster, cases["tp"], cases["ep"]))
    hw = hardware or {}
    lat = hw.get("link_latency_s")
    if lat:
        for g in ("tp", "cp", "dp", "pp", "shard", "rep"):
            cases[f"{g}_lat"] = np.where(np.isfinite(cases[f"{g}_bw"]), lat, 0.0)
        cases["ep_lat"] = np.full(n, lat)
    # Per-collective figures measured by `meshplan bench` (relative bandwidth, latency).
    # TP's collectives as DTensor issues them fall back to the plain collective's figures;
    # a latency of -1 means the link's own.
    for key in ("allgather", "reduce_scatter", "p2p", "tp_allreduce", "tp_allgather", "tp_reduce_scatter"):
        plain = TP_COLLECTIVE_FALLBACK.get(key)
        rel = hw.get(f"{key}_bw_rel", hw.get(f"{plain}_bw_rel", 1.0) if plain else 1.0)
        lat = hw.get(f"{key}_latency_s", hw.get(f"{plain}_latency_s", -1.0) if plain else -1.0)
        cases[f"{key}_bw_rel"] = np.full(n, rel)
        cases[f"{key}_lat"] = np.full(n, lat)
    cases["gpus"] = np.full(n, cluster.num_gpus)
    cases["gpus_per_node"] = np.full(n, cluster.gpus_per_node)
    return cases


def concat_cases(parts: list[Cases]) -> Cases:
    keys = parts[0].keys()
    return {k: np.concatenate([np.atleast_1d(p[k]) for p in parts]) for k in keys}


def single_case(
    model: ModelSpec, layout: Layout, cluster: ClusterSpec, hardware: Mapping[str, float] | None = None,
    framework: str | None = None,
) -> Cases:
    return build_cases(model, cluster, layout_columns([layout]), layout.precision, hardware=hardware,
                       framework=framework)


def subset_cases(c: Cases, idx: np.ndarray) -> Cases:
    """The rows `idx` of a case table."""
    return {k: np.asarray(v)[idx] for k, v in c.items()}
