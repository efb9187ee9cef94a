"""Model parameter counts and the packed-attention backends against per-document attention."""

from __future__ import annotations

import pytest
import torch

from costmodels.errors import MeshplanError
from costmodels.presets import PRESETS
from costmodels.specs import ModelSpec
from executor.attention import (
    attend,
    cu_seqlens_from_doc_ids,
    make_context,
    reference_attention,
    resolve_backend,
)
from executor.model import build_model, count_params

SPECS = [
    PRESETS["tiny"],
    PRESETS["tiny-mha"],
    ModelSpec("gelu-ln-bias", layers=2, hidden=64, ffn_hidden=256, heads=4, kv_heads=4,
              vocab=300, seq_len=32, mlp="gelu", norm="layernorm", bias=True),
    ModelSpec("tied-gqa", layers=3, hidden=96, ffn_hidden=200, heads=6, kv_heads=2,
              vocab=500, seq_len=32, tied_embeddings=True),
    ModelSpec("swiglu-bias-tied-ln", layers=1, hidden=32, ffn_hidden=48, heads=2, kv_heads=1,
              vocab=97, seq_len=16, bias=True, norm="layernorm", tied_embeddings=True),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.name)
def test_param_count_matches_cost_model(spec: ModelSpec) -> None:
    model = build_model(spec)
    assert count_params(model) == spec.param_count()


def test_module_names_follow_torchtitan_convention() -> None:
    names = {n for n, _ in build_model(PRESETS["tiny-mha"]).named_parameters()}
    for n in ("tok_embeddings.weight", "layers.0.attention_norm.weight",
              "layers.0.attention.wq.weight", "layers.0.attention.wk.weight",
              "layers.0.attention.wv.weight", "layers.0.attention.wo.weight",
              "layers.1.ffn_norm.weight", "layers.1.feed_forward.w1.weight",
              "layers.1.feed_forward.w2.weight", "layers.1.feed_forward.w3.weight",
              "norm.weight", "output.weight"):
        assert n in names, n


def test_moe_spec_builds_expert_layers() -> None:
    spec = PRESETS["mixtral-8x7b"].with_(layers=1, hidden=64, ffn_hidden=64, heads=4, kv_heads=4,
                                         vocab=64)
    model = build_model(spec)
    names = dict(model.named_parameters())
    assert names["layers.0.feed_forward.experts.w1"].shape[0] == spec.num_experts
    assert count_params(model) == spec.param_count()


def _doc_ids() -> torch.Tensor:
    # Row 0: three documents (7, 1, 8 tokens); row 1: one; row 2: two.
    return torch.tensor([
        [0] * 7 + [1] + [2] * 8,
        [0] * 16,
        [0] * 5 + [1] * 11,
    ])


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2)])
def test_sdpa_packed_equals_per_document_forward_and_backward(causal: bool, hq: int,
                                                               hkv: int) -> None:
    torch.manual_seed(0)
    doc_ids = _doc_ids()
    b, t, d = doc_ids.shape[0], doc_ids.shape[1], 8
    q = torch.randn(b, t, hq, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, t, hkv, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, t, hkv, d, dtype=torch.float64, requires_grad=True)
    w = torch.randn(b, t, hq, d, dtype=torch.float64)
    out = attend(q, k, v, make_context(doc_ids, causal, "sdpa"))
    (out * w).sum().backward()
    grads = [x.grad.clone() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    ref = reference_attention(q, k, v, doc_ids, causal)
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref)
    for g, x in zip(grads, (q, k, v), strict=True):
        torch.testing.assert_close(g, x.grad)


def test_packing_changes_the_result_when_masks_are_wrong() -> None:
    """Guard for the test above: attending across documents gives a different answer."""
    torch.manual_seed(1)
    doc_ids = _doc_ids()
    q, k, v = (torch.randn(3, 16, 2, 8) for _ in range(3))
    one_doc = torch.zeros_like(doc_ids)
    packed = attend(q, k, v, make_context(doc_ids, True, "sdpa"))
    leaky = attend(q, k, v, make_context(one_doc, True, "sdpa"))
    assert not torch.allclose(packed, leaky)


def test_cu_seqlens_marks_every_document_and_row() -> None:
    cu, max_len = cu_seqlens_from_doc_ids(_doc_ids())
    assert cu.tolist() == [0, 7, 8, 16, 32, 37, 48]
    assert max_len == 16


def test_backend_resolution_on_cpu() -> None:
    assert resolve_backend("auto", "cpu") == "sdpa"
    with pytest.raises(MeshplanError, match="attention_backend=flash"):
        resolve_backend("flash", "cpu")


def test_model_documents_are_independent() -> None:
    """The full model's output for a document does not depend on its row neighbours."""
    spec = PRESETS["tiny-mha"].with_(vocab=64)
    for objective in ("clm", "mlm"):
        model = build_model(spec, objective=objective, seed=3).double()
        a = torch.randint(0, 64, (1, 6))
        b1, b2 = torch.randint(0, 64, (1, 10)), torch.randint(0, 64, (1, 10))
        pos = torch.cat([torch.arange(6), torch.arange(10)]).unsqueeze(0)
        docs = torch.tensor([[0] * 6 + [1] * 10])
        out1 = model(torch.cat([a, b1], 1), pos, docs)
        out2 = model(torch.cat([a, b2], 1), pos, docs)
        alone = model(a, torch.arange(6).unsqueeze(0), torch.zeros(1, 6, dtype=torch.long))
        torch.testing.assert_close(out1[:, :6], out2[:, :6])
        torch.testing.assert_close(out1[:, :6], alone)


def test_partial_model_stages_compose() -> None:
    """Pipeline stages (embeddings / norm / output set to None) compose to the full model."""
    spec = PRESETS["tiny-mha"].with_(vocab=64)
    full = build_model(spec, seed=5)
    ids = torch.randint(0, 64, (2, 12))
    pos = torch.arange(12).repeat(2, 1)
    docs = torch.zeros(2, 12, dtype=torch.long)
    ref = full(ids, pos, docs)
    first = build_model(spec, seed=5)
    first.norm, first.output = None, None
    del first.layers["1"]
    last = build_model(spec, seed=5)
    last.tok_embeddings = None
    del last.layers["0"]
    torch.testing.assert_close(last(first(ids, pos, docs), pos, docs), ref)
