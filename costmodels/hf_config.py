"""ModelSpec's fields from a Hugging Face `config.json` (its parsed keys): the one reader the
planner's `--hf-config` (`planner.model_args`, which reads the file) and the executor's
checkpoint import (`executor.hf_format`) share."""

from __future__ import annotations

from typing import Any

from costmodels.spec_checks import require as _require

# model_type -> what its architecture adds beyond LLaMA's (transformers' modeling files)
_HF_QK_NORM = ("qwen3", "qwen3_moe")  # Qwen3Attention.q_norm / k_norm
_HF_QKV_BIAS = ("qwen2", "qwen2_moe")  # Qwen2Attention: bias on q, k, v only


def hf_config_fields(cfg: dict[str, Any], where: str, seq_len: int | None = None,
                     default_name: str = "hf-model") -> dict[str, Any]:
    """ModelSpec's fields from a Hugging Face config.json's keys."""

    def get(*names: str, default: Any = None) -> Any:
        for n in names:
            if n in cfg and cfg[n] is not None:
                return cfg[n]
        _require(default is not None, f"{where}: missing '{names[0]}'")
        return default

    def num(kind: type, key: str, value: Any) -> Any:
        try:
            return kind(value)
        except (TypeError, ValueError, OverflowError):
            _require(False, f"{where}: {key}={value!r} is not a number; fix the config")

    _require("kv_lora_rank" not in cfg and "q_lora_rank" not in cfg,
             f"{where}: kv_lora_rank: multi-head latent attention (MLA, DeepSeek-V2/V3) is not "
             "modelled; describe the model with grouped-query attention (num_key_value_heads) "
             "to plan it approximately")
    _require(num(int, "decoder_sparse_step", cfg.get("decoder_sparse_step", 1) or 1) == 1 and not cfg.get("mlp_only_layers"),
             f"{where}: decoder_sparse_step / mlp_only_layers: only the first layers may be "
             "dense (first_k_dense_replace) and the rest MoE; set decoder_sparse_step=1")
    model_type = str(cfg.get("model_type", ""))
    hidden = num(int, "hidden_size", get("hidden_size", "n_embd", "d_model"))
    heads = num(int, "num_attention_heads", get("num_attention_heads", "n_head"))
    act = str(get("hidden_act", "activation_function", default="silu"))
    _require(heads > 0 and hidden > 0, f"{where}: hidden_size and num_attention_heads must be > 0")
    head_dim = num(int, "head_dim", cfg.get("head_dim") or hidden // heads)
    experts = num(int, "num_local_experts", get("num_local_experts", "num_experts", "n_routed_experts", default=0) or 0)
    rope_raw = cfg.get("rope_parameters")
    rope: dict[str, Any] = rope_raw if isinstance(rope_raw, dict) else {}
    shared_width = num(int, "shared_expert_intermediate_size", cfg.get("shared_expert_intermediate_size") or 0)
    return {
        "name": str(get("_name_or_path", "model_type", default=default_name)),
        "layers": num(int, "num_hidden_layers", get("num_hidden_layers", "n_layer")),
        "hidden": hidden,
        "ffn_hidden": num(int, "intermediate_size", get("intermediate_size", "n_inner", default=4 * hidden)),
        "heads": heads,
        "kv_heads": num(int, "num_key_value_heads", get("num_key_value_heads", default=heads)),
        "vocab": num(int, "vocab_size", get("vocab_size")),
        "seq_len": num(int, "max_position_embeddings", seq_len or get("max_position_embeddings", "n_positions", default=2048)),
        "mlp": "swiglu" if act in ("silu", "swiglu", "swish") else "gelu",
        "norm": "rmsnorm" if "rms_norm_eps" in cfg else "layernorm",
        "tied_embeddings": bool(get("tie_word_embeddings", default=False)),
        "bias": bool(get("attention_bias", "mlp_bias", default=False)),
        "qkv_bias": model_type in _HF_QKV_BIAS,
        "num_experts": experts,
        "experts_topk": num(int, "num_experts_per_tok", get("num_experts_per_tok", "moe_topk", default=0) or 0) if experts else 0,
        "expert_ffn_hidden": num(int, "moe_intermediate_size", get("moe_intermediate_size", default=0) or 0) if experts else 0,
        # transformers >= 5 nests it: {"rope_parameters": {"rope_theta": ...}}
        "rope_theta": num(float, "rope_theta", get("rope_theta", default=rope.get("rope_theta", 10000.0))),
        "norm_eps": num(float, "rms_norm_eps", get("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon", default=1e-5)),
        "attn_head_dim": head_dim if head_dim != hidden // heads else 0,
        "qk_norm": model_type in _HF_QK_NORM,
        "router_score": str(cfg.get("scoring_func") or "softmax") if experts else "softmax",
        # Mixtral renormalises its top-k scores (and has no key); Qwen2-MoE does not
        "norm_topk": bool(cfg.get("norm_topk_prob", True)) if experts else True,
        "shared_experts": num(int, "n_shared_experts", cfg.get("n_shared_experts") or (1 if shared_width else 0)) if experts else 0,
        "shared_expert_ffn_hidden": shared_width if experts else 0,
        "shared_expert_gate": bool(shared_width) and experts > 0,
        "dense_layers": num(int, "first_k_dense_replace", cfg.get("first_k_dense_replace") or 0) if experts else 0,
        "moe_layer_freq": num(int, "moe_layer_freq", cfg.get("moe_layer_freq") or 1) if experts else 1,
    }
