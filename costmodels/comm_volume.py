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

from costmodels.param_shapes import is_expert, numel, param_shapes
from costmodels.pipeline import placement, rank_layer_counts
from costmodels.specs import ZERO_STAGE, Layout, ModelSpec

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


def _padded(shape: tuple[int, ...], shards: int) -> int:
    """FSDP2 pads dim 0 of each parameter to a multiple of the shard count."""
    rest = math.prod(shape[1:])
    return math.ceil(shape[0] / shards) * shards * rest


def whole_tensor_grad_norm(layout: Layout) -> bool:
    """Whether every rank holds whole parameter tensors with whole gradients (no TP, ZeRO
    or expert split; pipeline stages and data-parallel replicas only): the executor then
    gathers one norm per tensor and clips exactly as one process would."""
    return (layout.tp == 1 and layout.sharding == "none" and layout.ep == 1
            and layout.engine == "torch" and layout.world_size > 1)


def _recomputed_layers_mean(model: ModelSpec, layout: Layout) -> float:
    """Blocks recomputed per pipeline rank, mean over ranks: every block under selective
    (its core), the first `recompute_layers` of each rank under full (0 = all)."""
    if layout.recompute == "none":
        return 0.0
    counts = rank_layer_counts(model.layers, layout.pp, layout.stages_per_rank,
                               placement(layout.effective_schedule))
    if layout.recompute == "full" and layout.recompute_layers:
        counts = [min(layout.recompute_layers, c) for c in counts]
    return sum(counts) / layout.pp


def comm_volume(model: ModelSpec, layout: Layout) -> CommVolume:
    """Payload bytes per rank (mean over ranks) of one optimizer step of `layout`: the sum of
    the loss / grad-norm, data-parallel, expert, TP, CP, recompute and pipeline terms."""
    vol = CommVolume()
    if layout.engine == "deepspeed":
        _deepspeed_terms(vol, model, layout)
        return vol
    _grad_norm_terms(vol, model, layout)
    shapes = param_shapes(model, layout.tp, layout.ep)
    own_experts = model.is_moe and (layout.ep > 1 or layout.tp > 1)
    _dp_terms(vol, model, layout, [(n, sh) for n, sh in shapes if not (own_experts and is_expert(n))])
    if own_experts:
        _expert_dp_terms(vol, model, layout, [sh for n, sh in shapes if is_expert(n)])
    if model.is_moe:
        _moe_token_terms(vol, model, layout)
    _tp_terms(vol, model, layout)
    _cp_terms(vol, model, layout)
    _recompute_terms(vol, model, layout)
    _pp_terms(vol, model, layout)
    return vol


def _stage_tokens(model: ModelSpec, layout: Layout) -> tuple[float, float]:
    """Micro-batches per step, and the tokens of one micro-batch a rank holds (s / cp of its
    rows under context parallelism)."""
    return layout.grad_accum, layout.micro_batch * model.seq_len / layout.cp


def _cp_kv_bytes(model: ModelSpec, layout: Layout) -> float:
    """K and V of one micro-batch's whole sequence on one tensor-parallel rank (a replicated
    head when tp > kv_heads)."""
    kv_local = model.kv_dim // layout.tp if model.kv_heads % layout.tp == 0 else model.head_dim
    return layout.micro_batch * model.seq_len * kv_local * _elem_bytes(layout.precision)


def _grad_norm_terms(vol: CommVolume, model: ModelSpec, layout: Layout) -> None:
    # Loss and gradient norm: an fp32 scalar all-reduce each over the world, or, where every
    # rank holds whole parameter tensors, one fp32 norm per parameter tensor (the executor
    # then combines them as torch.nn.utils.clip_grad_norm_ does in one process).
    if layout.world_size > 1:
        if whole_tensor_grad_norm(layout):
            vol.add("all_reduce", 4 + 4 * len(param_shapes(model)),
                    "executor: loss sum + one fp32 grad norm per parameter tensor")
        else:
            vol.add("all_reduce", 8, "executor: loss sum + global grad-norm^2 (fp32 scalars)")


def _dp_terms(vol: CommVolume, model: ModelSpec, layout: Layout,
              dense_shapes: list[tuple[str, tuple[int, ...]]]) -> None:
    """Gradient sync and parameter gathers of the parameters every dp x cp replica holds."""
    M, replicas = layout.grad_accum, layout.dp * layout.cp
    # Every term below is per rank of one pipeline stage; the mean over stages divides the
    # model's (tensor-parallel-local) parameters by pp. MoE experts sharded over ep (or on
    # the expert mesh under TP) are reduced over their own replicas (`_expert_dp_terms`).
    local = sum(numel(shape) for _, shape in dense_shapes) / layout.pp
    if replicas > 1 and layout.sharding in ("none", "zero1"):
        vol.add("all_reduce", local * 4,
                "DP: fp32 grads all-reduced once per step over dp x cp (DDP with no_sync on "
                "earlier micro-batches, or one flat bucket; Li et al. 2020 §3.2)")
        if layout.sharding == "zero1" and layout.shard_group > 1:
            vol.add("all_gather", local * 4,
                    "ZeRO-1: the updated fp32 ranges (1/N of the elements each) all-gathered "
                    "over the shard group after the step (Rajbhandari et al. 2020 §5.1)")
    elif replicas > 1:
        shards = layout.shard_group
        padded = sum(_padded(shape, shards) for _, shape in dense_shapes) / layout.pp
        e_par = _elem_bytes(layout.precision)
        if layout.sharding == "zero3" and layout.pp > 1:
            vol.add("all_gather", (M + 1) * padded * e_par,
                    "FSDP2 zero3 in a pipeline stage: a forward reshards, a backward keeps the "
                    "params (torch.distributed.pipelining reshards after the last one), so an "
                    "op gathers unless a backward precedes it: 2M ops - (M - 1) = M + 1 gathers")
        elif layout.sharding == "zero3":
            vol.add("all_gather", 2 * M * padded * e_par,
                    "FSDP2 zero3: params gathered for forward and again for backward, per "
                    "micro-batch (Rajbhandari et al. 2020 §5.3; Zhao et al. 2023 §3)")
        else:
            vol.add("all_gather", padded * e_par,
                    "FSDP2 zero2 (reshard_after_forward=False, resharded after the last "
                    "backward only): params gathered once per step")
        vol.add("reduce_scatter", padded * 4,
                "FSDP2: fp32 grads reduce-scattered once per step over the shard group, gradient "
                "sync only on the last micro-batch (ZeRO §5.2)")
        if replicas > shards:
            vol.add("all_reduce", padded / shards * 4,
                    "HSDP: each fp32 grad shard all-reduced across the replica groups "
                    "(Zhao et al. 2023 §3.2.1)")


def _tp_terms(vol: CommVolume, model: ModelSpec, layout: Layout) -> None:
    """Tensor parallelism's activation collectives, partial-gradient all-reduces and the
    vocab-parallel cross entropy's exchanges. Per rank of one stage, then the mean over the
    pp stages: every layer lives on one stage (L / pp), the embedding on the first, the
    output head and the loss on the last (1 / pp)."""
    M, tokens = _stage_tokens(model, layout)
    h, L, pp, e_act = model.hidden, model.layers, layout.pp, _elem_bytes(layout.precision)
    if layout.tp > 1:
        act = tokens * h * e_act
        n_ln = 2 if model.norm == "layernorm" else 1
        if layout.sequence_parallel:
            vol.add("all_gather", M * (4 * L + 2) * act / pp,
                    "TP+SP: per layer 2 sequence all-gathers forward + 2 in backward (the "
                    "reduce-scatters' adjoints), +1 before the output head, +1 embedding "
                    "backward (Korthikanti et al. 2022 §4.2.2)")
            vol.add("reduce_scatter", M * (4 * L + 2) * act / pp,
                    "TP+SP: per layer 2 reduce-scatters after the row-parallel matmuls forward + "
                    "2 in backward, +1 embedding forward, +1 output-head input backward (ibid.)")
            vol.add("all_reduce", (2 * L + 1) * n_ln * h * 4 / pp,
                    "TP+SP: norm-weight grads are partial per sequence shard; one all-reduce "
                    "each per step (Korthikanti et al. 2022 §4.2.2)")
        else:
            vol.add("all_reduce", M * (4 * L + 2) * act / pp,
                    "TP: per layer 2 all-reduces forward (after the row-parallel matmuls) + 2 "
                    "backward (the column-parallel inputs' grads), +1 embedding forward, +1 "
                    "output-head input backward (Shoeybi et al. 2019 §3, Fig. 4)")
        if model.kv_heads % layout.tp:
            kv_params = 2 * model.kv_dim * (h + (1 if model.bias else 0))
            vol.add("all_reduce", L * kv_params * 4 / pp,
                    "TP > kv_heads: the replicated K / V projections' fp32 grads are partial per "
                    "rank (each used one head) and all-reduced over TP once per step")
        vol.add("all_reduce", M * 3 * tokens * 4 / pp,
                "TP: vocab-parallel cross entropy exchanges per-token fp32 max, sum of "
                "exponentials and target logit, never the logits (Shoeybi et al. 2019 §3)")


def _cp_terms(vol: CommVolume, model: ModelSpec, layout: Layout) -> None:
    """Context parallelism's K / V gathers and their gradients' reduce-scatters."""
    M, L, pp = layout.grad_accum, model.layers, layout.pp
    if layout.cp > 1:
        kv = _cp_kv_bytes(model, layout)
        vol.add("all_gather", M * L * 2 * kv / pp,
                "CP: K and V of the whole sequence gathered per layer and micro-batch "
                "(Llama 3, Dubey et al. 2024 §3.3.2)")
        vol.add("reduce_scatter", M * L * 2 * kv / pp,
                "CP: the K/V gradients reduce-scattered back in backward (adjoint of the gather)")


def _recompute_terms(vol: CommVolume, model: ModelSpec, layout: Layout) -> None:
    # Recomputation re-runs forward collectives in the backward. Non-reentrant checkpointing
    # stops once the saved tensors are rebuilt (torch.utils.checkpoint early stop), so a
    # fully recomputed block repeats its input gathers and the attention half's reduction,
    # not the MLP's: per block and micro-batch, SP: 2 all-gathers + 1 reduce-scatter; plain
    # TP: 1 all-reduce; CP: the K / V gathers (also under selective, inside the core).
    M, tokens = _stage_tokens(model, layout)
    recomputed = _recomputed_layers_mean(model, layout)
    if layout.recompute == "full" and layout.tp > 1:
        act = tokens * model.hidden * _elem_bytes(layout.precision)
        if layout.sequence_parallel:
            vol.add("all_gather", M * recomputed * 2 * act, "TP+SP full recompute: input gathers re-run")
            vol.add("reduce_scatter", M * recomputed * act, "TP+SP full recompute: attention output reduce-scatter re-run")
        else:
            vol.add("all_reduce", M * recomputed * act, "TP full recompute: attention output all-reduce re-run")
    if layout.cp > 1 and layout.recompute in ("full", "selective"):
        vol.add("all_gather", M * recomputed * 2 * _cp_kv_bytes(model, layout),
                "CP recompute: K / V gathered again when the attention core re-runs")


def _pp_terms(vol: CommVolume, model: ModelSpec, layout: Layout) -> None:
    M, tokens = _stage_tokens(model, layout)
    h, pp, e_act = model.hidden, layout.pp, _elem_bytes(layout.precision)
    if layout.pp > 1:
        stages = layout.pp * layout.stages_per_rank
        # a V turns on the last rank: stages pp - 1 and pp sit together, nothing is sent
        crossings = stages - 1 - (placement(layout.effective_schedule) == "v")
        boundary = tokens * h * e_act / (layout.tp if layout.sequence_parallel else 1)
        vol.add("send_recv", 2 * crossings * M * boundary / pp,
                "PP: each micro-batch's activations (this rank's sequence shard under CP / SP) "
                "cross the rank boundaries between its stages forward and their grads "
                "backward (Narayanan et al. 2021 §2); mean over pp ranks")


def _expert_dp_terms(vol: CommVolume, model: ModelSpec, layout: Layout,
                     expert_shapes: list[tuple[int, ...]]) -> None:
    """Experts on the expert mesh: gradients reduced over their dp x cp / ep replicas (none
    when every replica holds other experts), FSDP over the same group."""
    edp = layout.dp * layout.cp // layout.ep
    if edp == 1:
        return
    M = layout.grad_accum
    if layout.sharding == "none":
        vol.add("all_reduce", sum(numel(sh) for sh in expert_shapes) * 4 / layout.pp,
                "EP: expert fp32 grads all-reduced over the expert replicas (dp x cp / ep)")
        return
    padded = sum(_padded(sh, edp) for sh in expert_shapes) / layout.pp
    e_par = _elem_bytes(layout.precision)
    gathers = (M + 1 if layout.pp > 1 else 2 * M) if layout.sharding == "zero3" else 1
    vol.add("all_gather", gathers * padded * e_par,
            "EP + FSDP2: experts gathered over their replicas (as the dense weights, per stage)")
    vol.add("reduce_scatter", padded * 4, "EP + FSDP2: expert fp32 grads reduce-scattered over their replicas")


def _moe_token_terms(vol: CommVolume, model: ModelSpec, layout: Layout) -> None:
    """Token dispatch and combine (expert parallelism) and the replicated router's
    gradients (tensor parallelism) of the MoE layers, mean over pipeline ranks."""
    M, pp = layout.grad_accum, layout.pp
    moe_layers = model.moe_layers
    if layout.ep > 1:
        # each rank sends its tokens' k routed copies (its sequence shard under CP; the
        # whole micro-batch on every TP rank), in the compute dtype, to the experts' ranks
        slots = layout.micro_batch * model.seq_len / layout.cp * model.experts_topk
        payload = slots * model.hidden * _elem_bytes(layout.precision)
        counts = model.num_experts * 8  # int64 tokens per expert, exchanged before dispatch
        vol.add("all_to_all", M * moe_layers * (4 * payload + counts) / pp,
                "EP: per MoE layer and micro-batch, dispatch + combine forward and their "
                "adjoints backward (Lepikhin et al. 2021 §2.2), after the per-expert counts")
        recomputed = _recomputed_layers_mean(model, layout) * moe_layers / model.layers
        if layout.recompute == "full":
            vol.add("all_to_all", M * recomputed * (2 * payload + counts),
                    "EP full recompute: dispatch and combine re-run in the backward")
    if layout.tp > 1:
        router = model.num_experts * model.hidden + (model.hidden if model.shared_ffn and model.shared_expert_gate else 0)
        vol.add("all_reduce", moe_layers * router * 4 / pp,
                "TP: the replicated router's fp32 grads, partial per rank (each saw the partial "
                "expert outputs), all-reduced once per step")


def _deepspeed_terms(vol: CommVolume, model: ModelSpec, layout: Layout) -> None:
    """DeepSpeed ZeRO on the data-parallel group (Rajbhandari et al. 2020)."""
    if layout.dp == 1:
        return
    M, P = layout.grad_accum, model.param_count()
    e_par = _elem_bytes(layout.precision)
    vol.add("all_reduce", 8, "executor: loss sum + DeepSpeed's grad-norm all-reduce")
    stage = ZERO_STAGE[layout.sharding]
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
        big = sum(numel(sh) for _, sh in shapes if numel(sh) >= DS_PERSISTENCE_THRESHOLD)
        small = P - big
        vol.add("all_gather", (M * big + small) * e_par,
                "ZeRO-3: large params gathered once per micro-batch (kept from forward to "
                "backward within the reuse distance); persistent small params re-gathered "
                "once after the step (DeepSpeed stage3_param_persistence_threshold)")
        vol.add("reduce_scatter", M * P * 4,
                "ZeRO-3: grads reduce-scattered in every micro-batch's backward (ZeRO §5.3)")
