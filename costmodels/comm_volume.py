"""Predicted communication volume of one optimizer step, by collective kind.

Pure arithmetic on (ModelSpec, Layout) — no torch. The unit is the PAYLOAD in bytes per rank
(averaged over ranks), the same convention `executor.parallel.comm.CommCounter` measures:
  all_reduce      bytes of the tensor reduced
  all_gather      bytes of the gathered (full) output
  reduce_scatter  bytes of the full input
  send_recv       bytes a rank sends (point-to-point, pipeline activations and gradients)
  all_to_all      bytes of the input
  broadcast       bytes of the tensor
Wire traffic follows from the payload by the algorithm's factor (ring all-reduce moves
2(n-1)/n of the payload per rank, all-gather and reduce-scatter (n-1)/n; Thakur et al. 2005);
the step-time model applies those factors and the link bandwidths.

Every term mirrors what the executor's strategies issue (executor/parallel/*), and the
tests compare both on CPU/gloo runs within 5%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from costmodels.specs import Layout, ModelSpec

KINDS: tuple[str, ...] = (
    "all_reduce", "all_gather", "reduce_scatter", "send_recv", "all_to_all", "broadcast",
)

# DeepSpeed ZeRO-3 keeps parameters smaller than this many elements unpartitioned
# (`stage3_param_persistence_threshold`, DeepSpeed config docs, default 1e5).
DS_PERSISTENCE_THRESHOLD = 100_000


@dataclass
class Term:
    kind: str
    bytes: float
    source: str


@dataclass
class CommVolume:
    """Predicted payload bytes per rank for one optimizer step."""

    terms: list[Term] = field(default_factory=list)
    exact: bool = True  # False where the executor's behaviour is only approximated

    def add(self, kind: str, nbytes: float, source: str) -> None:
        if nbytes:
            self.terms.append(Term(kind, float(nbytes), source))

    def by_kind(self) -> dict[str, float]:
        out = dict.fromkeys(KINDS, 0.0)
        for t in self.terms:
            out[t.kind] += t.bytes
        return out

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)


def _elem_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def param_shapes(model: ModelSpec, tp: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Each parameter's shape on one tensor-parallel rank (the executor's module names).

    Column-parallel weights split their output rows, row-parallel ones their input columns,
    the embedding its vocabulary rows (Shoeybi et al. 2019 §3); norms are replicated.
    """
    h, f, kv, v = model.hidden, model.ffn_hidden, model.kv_dim, model.vocab
    norm = [("weight", (h,))] + ([("bias", (h,))] if model.norm == "layernorm" else [])
    out: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (v // tp, h))]
    for i in range(model.layers):
        p = f"layers.{i}."
        out += [(p + "attention_norm." + n, s) for n, s in norm]
        cols = [("attention.wq", h), ("attention.wk", kv), ("attention.wv", kv),
                ("feed_forward.w1", f)]
        if model.mlp == "swiglu":
            cols.append(("feed_forward.w3", f))
        for name, rows in cols:
            out.append((p + name + ".weight", (rows // tp, h)))
            if model.bias:
                out.append((p + name + ".bias", (rows // tp,)))
        for name, inner in (("attention.wo", h), ("feed_forward.w2", f)):
            out.append((p + name + ".weight", (h, inner // tp)))
            if model.bias:
                out.append((p + name + ".bias", (h,)))
        out += [(p + "ffn_norm." + n, s) for n, s in norm]
    out += [("norm." + n, s) for n, s in norm]
    if not model.tied_embeddings:
        out.append(("output.weight", (v // tp, h)))
    return out


def _numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def _padded(shape: tuple[int, ...], shards: int) -> int:
    """FSDP2 pads dim 0 of each parameter to a multiple of the shard count."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / shards) * shards * rest


def pipeline_microbatches(layout: Layout) -> tuple[int, int]:
    """(micro-batches, rows each) the pipeline schedule runs per data-parallel rank: the
    plan's accumulation steps, re-split finely enough for 1F1B (>= pp micro-batches)."""
    rows = layout.global_batch // layout.dp
    n = layout.grad_accum
    need = 1 if layout.effective_schedule == "gpipe" else layout.pp
    if n < need:
        n = next((m for m in range(need, rows + 1) if rows % m == 0), n)
    return n, rows // n


def comm_volume(model: ModelSpec, layout: Layout) -> CommVolume:
    """Payload bytes per rank (mean over ranks) of one optimizer step of `layout`."""
    vol = CommVolume()
    s, h, L = model.seq_len, model.hidden, model.layers
    e_act = _elem_bytes(layout.precision)
    M, b = layout.grad_accum, layout.micro_batch
    P = model.param_count()
    replicas = layout.dp * layout.cp

    if layout.engine == "deepspeed":
        _deepspeed_terms(vol, model, layout)
        return vol

    # Loss and squared gradient norm: one fp32 scalar all-reduce each over the world.
    if layout.world_size > 1:
        vol.add("all_reduce", 8, "executor: loss sum + global grad-norm^2 (fp32 scalars)")

    fsdp = layout.sharding != "none" or layout.tp > 1
    if replicas > 1:
        if layout.pp > 1 and not fsdp:
            vol.add("all_reduce", P * 4 / layout.pp,
                    "DP x PP: each stage all-reduces its fp32 grads once; mean over stages P/pp "
                    "(Li et al. 2020 §3.2)")
        elif not fsdp:
            vol.add("all_reduce", P * 4,
                    "DDP: fp32 grads all-reduced once per step, no_sync on earlier "
                    "micro-batches (Li et al. 2020 §3.2)")
        else:
            if layout.pp > 1:
                vol.exact = False  # FSDP inside pipeline stages: gathers depend on the schedule
            local = sum(_padded(shape, replicas) for _, shape in param_shapes(model, layout.tp))
            local = local / layout.pp
            e_par = _elem_bytes(layout.precision)
            if layout.sharding == "zero3":
                vol.add("all_gather", 2 * M * local * e_par,
                        "FSDP2 zero3: params gathered for forward and again for backward, per "
                        "micro-batch (Rajbhandari et al. 2020 §5.3; Zhao et al. 2023 §3)")
            else:
                vol.add("all_gather", local * e_par,
                        "FSDP2 zero1/2 (reshard_after_forward=False, resharded after the last "
                        "backward only): params gathered once per step")
            vol.add("reduce_scatter", local * 4,
                    "FSDP2: fp32 grads reduce-scattered once per step, gradient sync only on "
                    "the last micro-batch (ZeRO §5.2)")

    if layout.tp > 1:
        act = b * s * h * e_act
        n_ln = 2 if model.norm == "layernorm" else 1
        if layout.sequence_parallel:
            vol.add("all_gather", M * (4 * L + 2) * act,
                    "TP+SP: per layer 2 sequence all-gathers forward + 2 in backward (the "
                    "reduce-scatters' adjoints), +1 before the output head, +1 embedding "
                    "backward (Korthikanti et al. 2022 §4.2.2)")
            vol.add("reduce_scatter", M * (4 * L + 2) * act,
                    "TP+SP: per layer 2 reduce-scatters after the row-parallel matmuls forward + "
                    "2 in backward, +1 embedding forward, +1 output-head input backward (ibid.)")
            vol.add("all_reduce", (2 * L + 1) * n_ln * h * 4,
                    "TP+SP: norm-weight grads are partial per sequence shard; one all-reduce "
                    "each per step (Korthikanti et al. 2022 §4.2.2)")
        else:
            vol.add("all_reduce", M * (4 * L + 2) * act,
                    "TP: per layer 2 all-reduces forward (after the row-parallel matmuls) + 2 "
                    "backward (the column-parallel inputs' grads), +1 embedding forward, +1 "
                    "output-head input backward (Shoeybi et al. 2019 §3, Fig. 4)")
        vol.add("all_reduce", M * 3 * b * s * 4,
                "TP: vocab-parallel cross entropy exchanges per-token fp32 max, sum of "
                "exponentials and target logit, never the logits (Shoeybi et al. 2019 §3)")

    if layout.cp > 1:
        kv = b * s * model.kv_dim * e_act
        vol.add("all_gather", M * L * 2 * kv,
                "CP: K and V of the whole sequence gathered per layer and micro-batch "
                "(Llama 3, Dubey et al. 2024 §3.3.2)")
        vol.add("reduce_scatter", M * L * 2 * kv,
                "CP: the K/V gradients reduce-scattered back in backward (adjoint of the gather)")

    if layout.pp > 1:
        stages = layout.pp * layout.vpp
        n, rows = pipeline_microbatches(layout)
        vol.add("send_recv", 2 * (stages - 1) * n * rows * s * h * e_act / layout.pp,
                "PP: each micro-batch's activations cross pp*vpp-1 stage boundaries forward and "
                "their grads backward (Narayanan et al. 2021 §2); mean over pp ranks")
    return vol


def _deepspeed_terms(vol: CommVolume, model: ModelSpec, layout: Layout) -> None:
    """DeepSpeed ZeRO on the data-parallel group (Rajbhandari et al. 2020)."""
    if layout.dp == 1:
        return
    M, P = layout.grad_accum, model.param_count()
    e_par = _elem_bytes(layout.precision)
    vol.add("all_reduce", 8, "executor: loss sum + DeepSpeed's grad-norm all-reduce")
    stage = {"none": 0, "zero1": 1, "zero2": 2, "zero3": 3}[layout.sharding]
    if stage == 0:
        vol.add("all_reduce", P * 4, "ZeRO-0: grads all-reduced at the accumulation boundary")
    elif stage == 1:
        vol.add("all_reduce", P * 4,
                "ZeRO-1: grads all-reduced at the accumulation boundary (ZeRO §5.1)")
        vol.add("all_gather", P * e_par, "ZeRO-1: updated partitions all-gathered after the step")
    elif stage == 2:
        vol.add("all_reduce", M * P * 4,
                "ZeRO-2: grads reduced into their owner's partition in every micro-batch's "
                "backward (ZeRO §5.2; DeepSpeed reduces per micro-step)")
        vol.add("all_gather", P * e_par, "ZeRO-2: updated partitions all-gathered after the step")
    else:
        shapes = param_shapes(model, 1)
        big = sum(_numel(sh) for _, sh in shapes if _numel(sh) >= DS_PERSISTENCE_THRESHOLD)
        small = P - big
        vol.add("all_gather", (M * big + small) * e_par,
                "ZeRO-3: large params gathered once per micro-batch (kept from forward to "
                "backward within the reuse distance); persistent small params re-gathered "
                "once after the step (DeepSpeed stage3_param_persistence_threshold)")
        vol.add("reduce_scatter", M * P * 4,
                "ZeRO-3: grads reduce-scattered in every micro-batch's backward (ZeRO §5.3)")
