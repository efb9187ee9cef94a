"""Model presets: the LLaMA-3 family, the models in `published_runs.csv`, and tiny models
for this CPU machine. Architectures are from each model's paper or config.json.
"""

from __future__ import annotations

from costmodels.specs import ModelSpec, SpecError

_L3_VOCAB = 128256  # LLaMA-3 tokenizer (Dubey et al. 2024, Table 3)

PRESETS: dict[str, ModelSpec] = {
    m.name: m
    for m in (
        # CPU-sized models for the executor (vocab matches the locally trained BPE).
        ModelSpec("tiny", layers=4, hidden=256, ffn_hidden=688, heads=4, kv_heads=2,
                  vocab=8192, seq_len=128, rope_theta=10000.0),
        ModelSpec("tiny-mha", layers=2, hidden=128, ffn_hidden=344, heads=4, kv_heads=4,
                  vocab=8192, seq_len=128, rope_theta=10000.0),
        ModelSpec("small", layers=8, hidden=512, ffn_hidden=1376, heads=8, kv_heads=4,
                  vocab=8192, seq_len=256, rope_theta=10000.0),
        # A CPU-sized mixture of experts: 8 SwiGLU experts, top-2 (Mixtral's routing).
        ModelSpec("tiny-moe", layers=4, hidden=128, ffn_hidden=344, heads=4, kv_heads=2,
                  vocab=8192, seq_len=128, rope_theta=10000.0, num_experts=8, experts_topk=2,
                  expert_ffn_hidden=128),
        # LLaMA-3 / 3.1 (Dubey et al. 2024, Table 3).
        ModelSpec("llama3-8b", 32, 4096, 14336, 32, 8, _L3_VOCAB, 8192),
        ModelSpec("llama3-70b", 80, 8192, 28672, 64, 8, _L3_VOCAB, 8192),
        ModelSpec("llama3-405b", 126, 16384, 53248, 128, 8, _L3_VOCAB, 8192),
        ModelSpec("llama2-7b", 32, 4096, 11008, 32, 32, 32000, 4096, rope_theta=10000.0),
        ModelSpec("llama2-70b", 80, 8192, 28672, 64, 8, 32000, 4096, rope_theta=10000.0),
        # GPT-3 (Brown et al. 2020, Table 2.1), GELU MLP with biases, LayerNorm.
        ModelSpec("gpt3-175b", 96, 12288, 49152, 96, 96, 51200, 2048, mlp="gelu",
                  norm="layernorm", bias=True),
        # Megatron-Turing NLG (Smith et al. 2022).
        ModelSpec("mt-nlg-530b", 105, 20480, 81920, 128, 128, 51200, 2048, mlp="gelu",
                  norm="layernorm", bias=True),
        # Nemotron-4 (NVIDIA 2024): squared-ReLU MLP (two matrices, like GELU).
        ModelSpec("nemotron4-15b", 32, 6144, 24576, 48, 8, 256000, 4096, mlp="gelu",
                  norm="layernorm"),
        ModelSpec("nemotron4-340b", 96, 18432, 73728, 96, 8, 256000, 4096, mlp="gelu",
                  norm="layernorm"),
        # MosaicML MPT (llm-foundry yamls): GELU MLP, no biases, tied embeddings.
        ModelSpec("mpt-7b", 32, 4096, 16384, 32, 32, 50368, 2048, mlp="gelu",
                  norm="layernorm", tied_embeddings=True),
        ModelSpec("mpt-30b", 48, 7168, 28672, 56, 56, 50368, 2048, mlp="gelu",
                  norm="layernorm", tied_embeddings=True),
        ModelSpec("mpt-70b", 80, 8192, 32768, 64, 64, 50368, 2048, mlp="gelu",
                  norm="layernorm", tied_embeddings=True),
        # Chinchilla (Hoffmann et al. 2022, Table 4).
        ModelSpec("chinchilla-70b", 80, 8192, 32768, 64, 64, 32000, 2048, mlp="gelu",
                  norm="rmsnorm"),
        # Mixtral 8x7B (Jiang et al. 2024; config.json of mistralai/Mixtral-8x7B-v0.1).
        ModelSpec("mixtral-8x7b", 32, 4096, 14336, 32, 8, 32000, 4096, num_experts=8,
                  experts_topk=2, rope_theta=1e6),
        # Qwen3-30B-A3B (Qwen Team 2025; config.json of Qwen/Qwen3-30B-A3B): 128 experts,
        # top-8, 128-wide heads apart from hidden / heads, q/k RMSNorm.
        ModelSpec("qwen3-30b-a3b", 48, 2048, 6144, 32, 4, 151936, 4096, num_experts=128,
                  experts_topk=8, expert_ffn_hidden=768, attn_head_dim=128, qk_norm=True,
                  rope_theta=1e6, norm_eps=1e-6),
        # DeepSeek-V3's MoE (Liu et al. 2024, Table 1 / §4.2: 256 routed experts of width 2048,
        # top-8, sigmoid scores, one shared expert, the first 3 layers dense) with multi-head
        # attention in place of MLA (not modelled): 128 heads over hidden 7168.
        ModelSpec("deepseek-v3-style", 61, 7168, 18432, 128, 128, 129280, 4096,
                  num_experts=256, experts_topk=8, expert_ffn_hidden=2048, shared_experts=1,
                  router_score="sigmoid", dense_layers=3, rope_theta=10000.0, norm_eps=1e-6),
    )
}


def get_preset(name: str) -> ModelSpec:
    key = name.strip().lower()
    if key not in PRESETS:
        raise SpecError(
            f"--model {name!r}: unknown preset; choose one of {', '.join(sorted(PRESETS))} "
            "or pass --hf-config PATH"
        )
    return PRESETS[key]
