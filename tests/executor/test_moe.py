"""The mixture-of-experts feed-forward against Hugging Face's Mixtral / Qwen-MoE blocks
(outputs and gradients), its grouped GEMM against a per-expert loop, routing (capacity,
forced balance), the balance / z losses' gradient, and parameter counts equal to
transformers' for the published Mixtral-8x7B and Qwen3-30B-A3B configs."""

from __future__ import annotations

import json

import pytest
import torch

from costmodels.specs import ModelSpec
from executor.model import Transformer, count_params
from executor.moe import MoEFeedForward, grouped_mm, grouped_mm_fallback
from planner.model_args import model_from_hf_config

transformers = pytest.importorskip("transformers")

# config.json of mistralai/Mixtral-8x7B-v0.1 and Qwen/Qwen3-30B-A3B (architecture keys)
MIXTRAL_8X7B = {
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
    "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-5, "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2,
    "tie_word_embeddings": False, "hidden_act": "silu", "router_aux_loss_coef": 0.02,
}
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "vocab_size": 151936,
    "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
    "rope_theta": 1e6, "tie_word_embeddings": False, "attention_bias": False, "hidden_act": "silu",
}


def _hf_count(cfg: dict, cls_name: str, config_cls: str) -> int:
    conf = getattr(transformers, config_cls)(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        model = getattr(transformers, cls_name)(conf)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("cfg, cls_name, config_cls", [
    (MIXTRAL_8X7B, "MixtralForCausalLM", "MixtralConfig"),
    (QWEN3_30B_A3B, "Qwen3MoeForCausalLM", "Qwen3MoeConfig"),
])
def test_param_counts_equal_transformers(tmp_path, cfg, cls_name, config_cls):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    spec = model_from_hf_config(path)
    hf_total = _hf_count(cfg, cls_name, config_cls)
    assert spec.param_count() == hf_total
    with torch.device("meta"):
        ours = Transformer(spec.with_(seq_len=128))
    assert count_params(ours) == hf_total
    # active: all but the (experts - top-k) unused routed experts of every MoE layer
    idle = (spec.num_experts - spec.experts_topk) * spec.mlp_matrices * spec.hidden * spec.expert_ffn
    assert spec.param_count(active_only=True) == hf_total - spec.moe_layers * idle


def _tiny(**kw) -> ModelSpec:
    base = dict(name="t", layers=2, hidden=32, ffn_hidden=64, heads=4, kv_heads=2, vocab=64,
                seq_len=16, num_experts=8, experts_topk=2, expert_ffn_hidden=48)
    return ModelSpec(**{**base, **kw})


def _copy_experts(ours: MoEFeedForward, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """HF's fused experts (gate_up_proj [E, 2F, H], down_proj [E, H, F]) into ours."""
    f = down.shape[-1]
    with torch.no_grad():
        ours.experts.w1.copy_(gate_up[:, :f, :].transpose(1, 2))
        ours.experts.w3.copy_(gate_up[:, f:, :].transpose(1, 2))
        ours.experts.w2.copy_(down.transpose(1, 2))


def _compare(ours: MoEFeedForward, theirs: torch.nn.Module) -> None:
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    ours.double()
    theirs.double()
    y, y2 = ours(x), theirs(x2)
    y2 = y2[0] if isinstance(y2, tuple) else y2
    torch.testing.assert_close(y, y2, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-10, atol=1e-10)


def test_mixtral_block_matches_transformers():
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    conf = transformers.MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=8,
                                      num_experts_per_tok=2)
    theirs = MixtralSparseMoeBlock(conf)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoEFeedForward(_tiny())
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.gate.weight)
    _copy_experts(ours, theirs.experts.gate_up_proj, theirs.experts.down_proj)
    _compare(ours, theirs)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_qwen2_moe_block_with_gated_shared_expert_matches_transformers(norm_topk):
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(1)
    conf = transformers.Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=48, num_experts=8,
                                       num_experts_per_tok=2, shared_expert_intermediate_size=40,
                                       norm_topk_prob=norm_topk)
    theirs = Qwen2MoeSparseMoeBlock(conf)
    for p in theirs.parameters():
        torch.nn.init.normal_(p, std=0.3)
    ours = MoEFeedForward(_tiny(norm_topk=norm_topk, shared_expert_ffn_hidden=40, shared_experts=1,
                                shared_expert_gate=True))
    with torch.no_grad():
        ours.gate.weight.copy_(theirs.gate.weight)
        sh = theirs.shared_expert
        ours.shared_experts.w1.copy_(sh.gate_proj.weight.T)
        ours.shared_experts.w3.copy_(sh.up_proj.weight.T)
        ours.shared_experts.w2.copy_(sh.down_proj.weight.T)
        ours.shared_experts.gate.weight.copy_(theirs.shared_expert_gate.weight)
    _copy_experts(ours, theirs.experts.gate_up_proj, theirs.experts.down_proj)
    _compare(ours, theirs)


def test_grouped_mm_equals_one_matmul_per_expert():
    torch.manual_seed(2)
    counts = [3, 0, 5, 2]
    x = torch.randn(sum(counts), 16, requires_grad=True)
    w = torch.randn(4, 16, 8, requires_grad=True)
    x2, w2 = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    y, y2 = grouped_mm(x, w, counts), grouped_mm_fallback(x2, w2, counts)
    torch.testing.assert_close(y, y2)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_forced_balance_loads_every_expert_equally():
    moe = MoEFeedForward(_tiny())
    moe.force_balance = True
    moe(torch.randn(4, 16, 32))
    loads = moe.tokens_per_expert
    assert loads.sum() == 4 * 16 * 2 and loads.max() == loads.min()


def test_capacity_factor_drops_overflow_in_token_order():
    moe = MoEFeedForward(_tiny(capacity_factor=1.0))
    with torch.no_grad():
        moe.gate.weight.zero_()
        moe.gate.weight[0].fill_(1.0)  # every token prefers experts 0 (then the tie order)
    x = torch.rand(1, 16, 32) + 0.1
    moe(x)
    cap = 16 * 2 // 8  # ceil(1.0 * tokens * k / experts)
    assert moe.tokens_per_expert.max() <= cap
    assert moe.dropped == 16 * 2 - moe.tokens_per_expert.sum()
    assert moe.dropped > 0


def test_balance_and_z_loss_gradients_reach_the_router():
    torch.manual_seed(3)
    moe = MoEFeedForward(_tiny())
    moe.aux_loss_coef, moe.z_loss_coef, moe.loss_grad_scale = 0.1, 0.01, 0.5
    x = torch.randn(2, 8, 32)
    moe(x).sum().backward()
    attached = moe.gate.weight.grad.clone()
    # the same objective written out: out.sum() + 0.5 * (0.1 * aux + 0.01 * z)
    moe.zero_grad()
    moe.aux_loss_coef = moe.z_loss_coef = 0.0
    out = moe(x)
    logits = moe.gate(x.reshape(-1, 32)).float()
    scores = torch.softmax(logits, -1)
    idx = torch.topk(scores, 2, -1).indices
    f = torch.bincount(idx.reshape(-1), minlength=8).float() / idx.numel()
    aux = 8 * (f * scores.mean(0)).sum()
    z = torch.logsumexp(logits, -1).pow(2).mean()
    (out.sum() + 0.5 * (0.1 * aux + 0.01 * z)).backward()
    torch.testing.assert_close(moe.gate.weight.grad, attached)
