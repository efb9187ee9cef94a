"""Each parameter's shape on one tensor-parallel / expert-parallel rank, named as the
executor's modules name them: what the communication volume and the sharded states count."""

from __future__ import annotations

import math

from costmodels.specs import ModelSpec

KV_PROJECTIONS = ("attention.wk", "attention.wv")
EXPERT_WEIGHTS = ("feed_forward.experts.",)


def param_shapes(model: ModelSpec, tp: int = 1, ep: int = 1) -> list[tuple[str, tuple[int, ...]]]:
    """Each parameter's shape on one tensor-parallel rank (the executor's module names).

    Column-parallel weights split their output rows, row-parallel ones their input columns,
    the embedding its vocabulary rows (Shoeybi et al. 2019 §3); norms are replicated. An MoE
    layer's router (and shared-expert gate) is replicated, its experts are split over `ep`
    and each expert's hidden units over tp, like a dense MLP (`executor.parallel.ep`).
    """
    h, f, kv, v, q = model.hidden, model.ffn_hidden, model.kv_dim, model.vocab, model.q_dim
    norm = [("weight", (h,))] + ([("bias", (h,))] if model.norm == "layernorm" else [])
    qkv_bias = model.bias or model.qkv_bias
    out: list[tuple[str, tuple[int, ...]]] = [("tok_embeddings.weight", (v // tp, h))]
    for i in range(model.layers):
        p = f"layers.{i}."
        moe = model.is_moe_layer(i)
        out += [(p + "attention_norm." + n, s) for n, s in norm]
        cols = [("attention.wq", q), ("attention.wk", kv), ("attention.wv", kv)]
        if not moe:
            cols += [("feed_forward.w1", f)] + ([("feed_forward.w3", f)] if model.mlp == "swiglu" else [])
        for name, rows in cols:
            # tp > kv_heads: K / V replicated, each rank computes its queries' KV head in full
            split = 1 if name in KV_PROJECTIONS and model.kv_heads % tp else tp
            out.append((p + name + ".weight", (rows // split, h)))
            if model.bias or (qkv_bias and name.startswith("attention.")):
                out.append((p + name + ".bias", (rows // split,)))
        if model.qk_norm:
            out += [(p + "attention.q_norm.weight", (model.head_dim,)),
                    (p + "attention.k_norm.weight", (model.head_dim,))]
        for name, inner in (("attention.wo", q), ("feed_forward.w2", f))[: 1 if moe else 2]:
            out.append((p + name + ".weight", (h, inner // tp)))
            if model.bias:
                out.append((p + name + ".bias", (h,)))
        if moe:
            out += _moe_shapes(model, p + "feed_forward.", tp, ep)
        out += [(p + "ffn_norm." + n, s) for n, s in norm]
    out += [("norm." + n, s) for n, s in norm]
    if not model.tied_embeddings:
        out.append(("output.weight", (v // tp, h)))
    return out


def _moe_shapes(model: ModelSpec, p: str, tp: int, ep: int) -> list[tuple[str, tuple[int, ...]]]:
    h, fe, fs, e = model.hidden, model.expert_ffn, model.shared_ffn, model.num_experts // ep
    out = [(p + "gate.weight", (model.num_experts, h)),
           (p + "experts.w1", (e, h, fe // tp)), (p + "experts.w2", (e, fe // tp, h))]
    if model.mlp == "swiglu":
        out.append((p + "experts.w3", (e, h, fe // tp)))
    if fs:
        out += [(p + "shared_experts.w1", (h, fs // tp)), (p + "shared_experts.w2", (fs // tp, h))]
        if model.mlp == "swiglu":
            out.append((p + "shared_experts.w3", (h, fs // tp)))
        if model.shared_expert_gate:
            out.append((p + "shared_experts.gate.weight", (1, h)))
    return out


def is_expert(name: str) -> bool:
    """An MoE expert weight (sharded over ep, reduced over its own replicas)."""
    return any(k in name for k in EXPERT_WEIGHTS)


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
