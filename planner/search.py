"""Layout search: enumerate every valid TP x PP x DP x CP x VPP x ZeRO x micro-batch x
recompute x SP layout as numpy columns, evaluate them all in one call of the cost model,
prune by memory, rank, and explain.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from costmodels.capabilities import RULES, Rule, refused_mask
from costmodels.cases import build_cases
from costmodels.errors import MeshplanError
from costmodels.pipeline import SCHEDULE_NAMES, microbatches_admitted
from costmodels.profile import Profile
from costmodels.specs import PRECISIONS, RECOMPUTES, SHARDINGS, ClusterSpec, Layout, ModelSpec
from costmodels.stack_contracts import stack_rules
from costmodels.steptime import evaluate_schedules
from costmodels.uncertainty import interval

BREAKDOWN = (
    "compute_s", "tp_comm_s", "moe_comm_s", "cp_comm_s", "pp_bubble_s", "pp_p2p_s", "dp_exposed_s", "optimizer_s", "sync_s",
)
CP_AUTO_MIN_SEQ = 16384
RANK_KEYS = {
    "throughput": ("step_time_s", True),
    "memory": ("peak_memory_gb", True),
}


@dataclass(frozen=True)
class SearchSpace:
    max_tp: int = 0  # 0: the scale-up (NVLink) domain
    tp_across_nodes: bool = False
    # Context parallelism is a long-context tool: Llama 3 trained with CP = 1 at 8K and
    # CP = 16 at 128K tokens (Dubey et al. 2024, Table 4). Searched from 16K tokens on, or
    # always with --allow-cp.
    allow_cp: bool | None = None
    max_cp: int = 32
    max_pp: int = 128
    max_vpp: int = 32  # Megatron allows down to one layer per virtual stage
    micro_batches: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)
    shardings: tuple[str, ...] = SHARDINGS
    recomputes: tuple[str, ...] = RECOMPUTES
    # Pipeline schedules to try (`costmodels.pipeline`): the vpp axis gives 1f1b its
    # interleaved form and zbh1 interleaved_zb; zbv and dualpipev hold two stages per rank.
    schedules: tuple[str, ...] = SCHEDULE_NAMES
    hsdp: bool = True  # also search sharding-group sizes (HSDP / MiCS / dist-opt instances)
    # Share of each stage's layers that full recompute applies to, in eighths.
    recompute_fractions: tuple[float, ...] = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
    precision: str = "bf16"
    memory_headroom: float = 0.05  # keep this share of HBM free
    framework: str = "meshplan"  # the stack the plan is for (`costmodels.stacks`)
    engine: str = "torch"  # the executor's engine (layout.engine)
    # Rank only layouts meshplan's executor runs exactly (`costmodels.capabilities`); False
    # with --any-framework or a plan for another stack.
    executor_only: bool = True
    # For a plan for another stack: rank only layouts that stack runs exactly, where it has
    # a contract (`costmodels.stack_contracts`: Megatron-Core, NeMo); False with --any-framework.
    stack_contract: bool = False
    # The loss in this many sequence chunks on every candidate (`Layout.loss_chunks`).
    loss_chunks: int = 1


@dataclass
class SearchResult:
    model: ModelSpec
    cluster: ClusterSpec
    global_batch: int
    table: pd.DataFrame  # all evaluated candidates with predictions
    candidates_evaluated: int
    search_seconds: float
    ranked: pd.DataFrame  # fitting candidates, best first
    pareto: pd.DataFrame
    notes: list[str] = field(default_factory=list)
    # pipeline schedule -> candidates evaluated under it
    schedules_evaluated: dict[str, int] = field(default_factory=dict)

    def layout(self, i: int = 0) -> Layout:
        return row_to_layout(self.ranked.iloc[i], self.global_batch, self.table.attrs["precision"])


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _powers_of_two_up_to(n: int) -> list[int]:
    out, v = [], 1
    while v <= n:
        out.append(v)
        v *= 2
    return out


def enumerate_layouts(model: ModelSpec, cluster: ClusterSpec, global_batch: int, space: SearchSpace) -> dict[str, np.ndarray]:
    """All degree combinations as columns, then vectorised validity filtering."""
    axes = _degree_axes(model, cluster, space)
    base = _valid_grid(model, cluster.num_gpus, global_batch, space, axes)
    cols = _expand_shards_and_recompute(model, base, global_batch, space)
    return _expand_expert_parallel(model, cols)


def _degree_axes(model: ModelSpec, cluster: ClusterSpec, space: SearchSpace) -> list[list[int]]:
    """The values each searched degree may take: tp, pp, cp, vpp, micro-batch, sharding,
    recompute, sequence parallelism, schedule."""
    g = cluster.num_gpus
    domain = cluster.domain_size
    max_tp = space.max_tp or (g if space.tp_across_nodes else domain)
    tps = [t for t in _divisors(model.heads) if t <= max_tp and g % t == 0 and (
        model.kv_heads % t == 0 or t % model.kv_heads == 0)]
    pps = [p for p in _divisors(g) if p <= min(model.layers, space.max_pp)]
    allow_cp = space.allow_cp if space.allow_cp is not None else model.seq_len >= CP_AUTO_MIN_SEQ
    cps = [c for c in _powers_of_two_up_to(min(space.max_cp, g)) if allow_cp or c == 1]
    cps = [c for c in cps if c == 1 or model.seq_len % (2 * c) == 0]
    vpps = list(range(1, space.max_vpp + 1))
    shard = [SHARDINGS.index(s) for s in space.shardings]
    rec = [RECOMPUTES.index(r) for r in space.recomputes]
    single = {"interleaved": "1f1b", "interleaved_zb": "zbh1"}
    sched = sorted({SCHEDULE_NAMES.index(single.get(s, s)) for s in space.schedules})
    if not tps:
        raise MeshplanError(
            f"no tensor-parallel degree divides {model.heads} heads and {g} GPUs within max TP "
            f"{max_tp}; raise --max-tp or change --gpus"
        )
    return [tps, pps, cps, vpps, list(space.micro_batches), shard, rec, [0, 1], sched]


def _valid_grid(model: ModelSpec, g: int, global_batch: int, space: SearchSpace,
                axes: list[list[int]]) -> dict[str, np.ndarray]:
    """The axes' product, kept where the layout is whole and its schedule admits it."""
    mesh = np.meshgrid(*[np.asarray(a, dtype=np.int64) for a in axes], indexing="ij")
    tp, pp, cp, vpp, mb, sh, rc, sp, sc = (x.reshape(-1) for x in mesh)
    dp = g // (tp * pp * cp)
    ok = (tp * pp * cp * dp == g) & (dp >= 1)
    ok &= (global_batch % np.maximum(mb * dp, 1) == 0)
    ok &= (sp == 0) | (tp > 1)  # sequence parallel only means something with TP
    # Interleaving needs PP; chunks may be uneven (the slowest stage gets ceil(L/(p v)) layers
    # per chunk, as Megatron-Core's uneven pipeline split does), but every chunk needs a layer.
    ok &= (vpp == 1) | (pp > 1)
    code = {name: SCHEDULE_NAMES.index(name) for name in SCHEDULE_NAMES}
    # interleaving: 1F1B -> interleaved 1F1B, ZB-H1 -> interleaved zero bubble
    ok &= (vpp == 1) | (sc == code["1f1b"]) | (sc == code["zbh1"])
    ok &= (sc == code["1f1b"]) | (pp > 1)  # the other schedules only differ under PP
    ok &= (sh == 0) | (dp * cp > 1)  # ZeRO needs replicas to shard over
    v_shape = (sc == code["zbv"]) | (sc == code["dualpipev"])
    vpp = np.where(v_shape, 2, vpp)  # a V holds two stages per rank (enumerated once, at vpp=1)
    ok &= ~v_shape | (mesh[3].reshape(-1) == 1)
    ok &= pp * vpp <= model.layers
    m = global_batch // np.maximum(mb * dp, 1)
    ok &= (pp == 1) | (m >= 1)
    eff = np.where((vpp > 1) & (sc == code["1f1b"]), code["interleaved"],
                   np.where((vpp > 1) & (sc == code["zbh1"]), code["interleaved_zb"], sc))
    ok &= microbatches_admitted(eff, pp, m)  # the schedule's micro-batch rules
    ok &= np.isin(eff, [code[name] for name in space.schedules]) | (pp == 1)  # what the stack runs
    # GPipe has 1F1B's bubble and holds more micro-batches: it can only win where 1F1B cannot run
    ok &= (eff != code["gpipe"]) | (m < pp)
    base = {
        "tp": tp[ok], "pp": pp[ok], "dp": dp[ok], "cp": cp[ok], "vpp": vpp[ok], "micro": mb[ok],
        "sharding": sh[ok], "recompute": rc[ok], "sp": sp[ok].astype(bool), "schedule": eff[ok],
    }
    return base


def _expand_shards_and_recompute(model: ModelSpec, base: dict[str, np.ndarray], global_batch: int,
                                 space: SearchSpace) -> dict[str, np.ndarray]:
    # Expand each row over its sharding-group sizes (powers of two dividing dp, below dp;
    # 0 = all of dp) and, for full recompute, the recomputed share of each stage's layers.
    shard_opts = [0] + ([2**k for k in range(1, 16)] if space.hsdp else [])
    frac_opts = sorted(set(space.recompute_fractions) | {1.0})
    n0 = len(base["tp"])
    ls0 = np.ceil(model.layers / (base["pp"] * base["vpp"])) * base["vpp"]
    rows, shards, fracs = [], [], []
    for d in shard_opts:
        keep = np.ones(n0, dtype=bool) if d == 0 else (
            (base["sharding"] > 0) & (base["dp"] % d == 0) & (base["dp"] > d))
        last = np.zeros(n0)  # the recompute count the previous fraction gave each row
        for f in frac_opts:
            if f == 1.0:
                k2 = keep
            else:  # a fraction is a new candidate only where it recomputes a new, partial count
                rl = np.maximum(1, np.round(f * ls0 / base["vpp"])) * base["vpp"]
                k2 = keep & (base["recompute"] == RECOMPUTES.index("full")) & (rl > last) & (rl < ls0)
                last = np.where(k2, rl, last)
            idx = np.flatnonzero(k2)
            rows.append(idx)
            shards.append(np.full(len(idx), d))
            fracs.append(np.full(len(idx), f))
    idx = np.concatenate(rows)
    cols = {k: v[idx] for k, v in base.items()}
    n = len(idx)
    layers_stage = np.ceil(model.layers / (cols["pp"] * cols["vpp"])) * cols["vpp"]
    frac = np.concatenate(fracs)
    cols.update({
        "ep": np.ones(n, dtype=np.int64), "gbs": np.full(n, global_batch),
        "precision_idx": np.full(n, PRECISIONS.index(space.precision)),
        "dp_shard": np.concatenate(shards),
        "loss_chunks": np.full(n, space.loss_chunks, dtype=np.int64),
        # the same count in each of a rank's virtual chunks (Megatron's per-chunk flag)
        "recompute_layers": np.where(frac < 1.0, np.maximum(1, np.round(frac * layers_stage / cols["vpp"]))
                                     * cols["vpp"], 0).astype(np.int64),
    })
    return cols


def _expand_expert_parallel(model: ModelSpec, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """MoE models: each row once per expert-parallel degree, the divisors of the expert
    count that divide dp x cp (the ranks EP is carved from, Megatron-Core's convention)."""
    if not model.is_moe:
        return cols
    replicas = cols["dp"] * cols["cp"]
    parts = []
    for e in _divisors(model.num_experts):
        idx = np.flatnonzero(replicas % e == 0)
        if len(idx):
            part = {k: v[idx] for k, v in cols.items()}
            part["ep"] = np.full(len(idx), e, dtype=np.int64)
            parts.append(part)
    return {k: np.concatenate([p[k] for p in parts]) for k in cols}


def _nothing_runs(model: ModelSpec, cols: dict[str, np.ndarray], contract_cols: dict[str, np.ndarray],
                  global_batch: int, precision: str, rules: tuple[Rule, ...] = RULES,
                  runner: str = "meshplan's executor") -> MeshplanError:
    """The rule refusing the most candidates, in the words of the first one it refuses."""
    counts = {r.name: np.asarray(r.refused(model, contract_cols), dtype=bool) for r in rules}
    name = max(counts, key=lambda k: int(counts[k].sum()))
    i = int(np.flatnonzero(counts[name])[0])
    rule = next(r for r in rules if r.name == name)
    row = {k: v[i] for k, v in cols.items()}
    row.update(sharding=SHARDINGS[row["sharding"]], recompute=RECOMPUTES[row["recompute"]],
               schedule=SCHEDULE_NAMES[row["schedule"]])
    why = rule.message(model, row_to_layout(pd.Series(row), global_batch, precision))
    hint = "" if "--any-framework" in why or "loss_chunks" in why \
        else "; or pass --any-framework to plan for another stack"
    return MeshplanError(f"no layout {runner} can run: {why}{hint}")


def _nothing_fits(cols: dict[str, np.ndarray], pred: dict[str, np.ndarray], cand: np.ndarray,
                  loss_chunks: int = 1) -> MeshplanError:
    mem = pred["peak_memory_gb"]
    i = int(cand[np.argmin(mem[cand])])
    # a chunked loss runs without TP and PP (`costmodels.capabilities`): say so
    chunks = (f" (--loss-chunks {loss_chunks} rules out TP and PP; drop it to search them)"
              if loss_chunks > 1 else "")
    return MeshplanError(
        f"no layout fits in memory: the smallest needs {mem[i]:.1f} GB per GPU of "
        f"{pred['hbm_gb'][i]:.0f} GB (tp={cols['tp'][i]} pp={cols['pp'][i]} "
        f"{SHARDINGS[cols['sharding'][i]]} recompute={RECOMPUTES[cols['recompute'][i]]}){chunks}; "
        "use more GPUs, a larger-memory accelerator, or a shorter sequence"
    )


def _predict(model: ModelSpec, cluster: ClusterSpec, cols: dict[str, np.ndarray], profile: Profile,
             space: SearchSpace) -> dict[str, np.ndarray]:
    """The cost model over every candidate, with its throughput interval. Rows that differ
    only in their pipeline schedule are adjacent (the schedule is the enumeration's
    innermost axis): their schedule-free terms are evaluated once."""
    n_rows = len(cols["tp"])
    same = np.ones(max(n_rows - 1, 0), dtype=bool)
    for k, v in cols.items():
        if k != "schedule":
            same &= v[1:] == v[:-1]
    new_run = np.r_[True, ~same] if n_rows else np.zeros(0, dtype=bool)
    base = {k: v[new_run] for k, v in cols.items()}
    cases = build_cases(model, cluster, base, space.precision, hardware=profile.hardware.get(cluster.accelerator),
                        framework=space.framework)
    pred = evaluate_schedules(cases, profile, np.cumsum(new_run) - 1, cols["schedule"])
    lo, hi = interval(pred["tokens_per_sec_per_gpu"], profile.uncertainty.get("throughput"), model.param_count())
    pred["tokens_per_sec_per_gpu_low"], pred["tokens_per_sec_per_gpu_high"] = lo, hi
    return pred


def search(
    model: ModelSpec, cluster: ClusterSpec, global_batch: int, profile: Profile,
    space: SearchSpace | None = None, top: int = 10, rank_by: str = "throughput",
) -> SearchResult:
    space = space or SearchSpace()
    if global_batch < 1:
        raise MeshplanError("--global-batch-tokens must give at least one sequence per step")
    t0 = time.perf_counter()
    cols = enumerate_layouts(model, cluster, global_batch, space)
    n = len(cols["tp"])
    if n == 0:
        raise MeshplanError(
            f"no layout divides {cluster.num_gpus} GPUs with a global batch of {global_batch} sequences; "
            "make the global batch a multiple of the GPU count (or of a divisor of it)"
        )
    contract_cols = {**cols, "precision": np.full(n, space.precision), "engine": np.full(n, space.engine)}
    refused = refused_mask(model, contract_cols)
    if space.executor_only and refused.all():
        raise _nothing_runs(model, cols, contract_cols, global_batch, space.precision)
    n_refused = int(refused.sum())
    if space.executor_only:  # only what the executor runs is evaluated and ranked
        keep = np.flatnonzero(~refused)
        cols, refused = {k: v[keep] for k, v in cols.items()}, refused[keep]
    rules = stack_rules(space.framework) if space.stack_contract and not space.executor_only else ()
    n_stack_refused = 0
    if rules:  # only what the plan's stack runs is evaluated and ranked
        by_stack = refused_mask(model, contract_cols, rules)
        if by_stack.all():
            raise _nothing_runs(model, cols, contract_cols, global_batch, space.precision, rules,
                                space.framework)
        keep = np.flatnonzero(~by_stack)
        n_stack_refused = int(by_stack.sum())
        cols, refused = {k: v[keep] for k, v in cols.items()}, refused[keep]
    pred = _predict(model, cluster, cols, profile, space)
    elapsed_eval = time.perf_counter() - t0
    mem = pred["peak_memory_gb"]
    pred["runnable"] = ~refused
    allowed = ~refused
    if not space.executor_only:
        allowed = np.ones(len(refused), dtype=bool)
    fits = np.flatnonzero((mem <= pred["hbm_gb"] * (1 - space.memory_headroom)) & allowed)
    if fits.size == 0:
        raise _nothing_fits(cols, pred, np.flatnonzero(allowed), space.loss_chunks)
    key, _ = RANK_KEYS.get(rank_by, RANK_KEYS["throughput"])
    order = fits[np.lexsort((mem[fits], pred[key][fits]))]
    # Pareto front of (peak memory, step time) among fitting layouts.
    by_mem = fits[np.lexsort((pred["step_time_s"][fits], mem[fits]))]
    st = pred["step_time_s"][by_mem]
    best_before = np.r_[np.inf, np.minimum.accumulate(st)[:-1]]
    front = by_mem[st < best_before]
    ranked = _frame(cols, pred, order[: max(top, 1) * 20])
    ranked = ranked.drop_duplicates(subset=list(BREAKDOWN) + ["peak_memory_gb"]).head(max(top, 1))
    table = _frame(cols, pred, fits)
    table.attrs["precision"] = space.precision
    elapsed = time.perf_counter() - t0
    per_schedule = np.bincount(np.asarray(cols["schedule"], dtype=np.int64)[np.asarray(cols["pp"]) > 1],
                               minlength=len(SCHEDULE_NAMES))
    # every schedule the space tries, with the pipelined candidates evaluated under it
    tried = set(space.schedules)
    res = SearchResult(model, cluster, global_batch, table, n, elapsed, ranked.reset_index(drop=True),
                       _frame(cols, pred, front).reset_index(drop=True),
                       schedules_evaluated={name: int(k) for name, k in zip(SCHEDULE_NAMES, per_schedule, strict=True)
                                            if name in tried})
    res.notes.append(f"{n} candidates, {len(refused)} evaluated in {elapsed_eval:.3f} s; {fits.size} fit in memory"
                     + (f" and run on meshplan's executor ({n_refused} refused by its "
                        "capability contract first)" if space.executor_only else "")
                     + (f" and run on {space.framework} ({n_stack_refused} refused by its "
                        "contract first, costmodels.stack_contracts)" if rules else ""))
    return res


def _frame(cols: dict[str, np.ndarray], pred: dict[str, np.ndarray], idx: np.ndarray) -> pd.DataFrame:
    df = pd.DataFrame({**{k: v[idx] for k, v in cols.items() if k != "precision_idx"},
                       **{k: v[idx] for k, v in pred.items()}})
    df["sharding"] = np.array(SHARDINGS)[df["sharding"].to_numpy()]
    df["recompute"] = np.array(RECOMPUTES)[df["recompute"].to_numpy()]
    df["schedule"] = np.array(SCHEDULE_NAMES)[df["schedule"].to_numpy()]
    df["mfu_pct"] = df["mfu"] * 100
    return df


def row_to_layout(row: pd.Series, global_batch: int, precision: str) -> Layout:
    """The Layout of one search row (the columns `enumerate_layouts` writes)."""
    return Layout.from_dict({
        "tp": int(row["tp"]), "pp": int(row["pp"]), "dp": int(row["dp"]), "cp": int(row["cp"]),
        "ep": int(row.get("ep", 1)), "vpp": int(row["vpp"]), "sharding": str(row["sharding"]),
        "micro_batch": int(row["micro"]), "global_batch": global_batch,
        "recompute": str(row["recompute"]), "sequence_parallel": bool(row["sp"]),
        "precision": precision, "schedule": str(row["schedule"]), "dp_shard": int(row["dp_shard"]),
        "recompute_layers": int(row["recompute_layers"]),
        "loss_chunks": int(row.get("loss_chunks", 1)),
    })
