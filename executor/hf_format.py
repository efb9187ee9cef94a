"""Hugging Face checkpoints on disk (`config.json` + `model.safetensors`): LLaMA, Mistral,
Qwen2 (q/k/v bias) and Qwen3 (per-head q/k RMSNorm) decoders, tied embeddings included.

Import maps `model.layers.0.self_attn.q_proj.weight`-style names onto this executor's
torchtitan-style names (`layers.0.attention.wq.weight`); export writes the reverse, so a
model round-trips bit-exactly. Both layouts rotate the halves of each head (RoPE pairs
(i, i + D/2), Su et al. 2021 in the `rotate_half` form), so q/k need no permutation.
Nothing is downloaded: the files must already be on disk.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from costmodels.errors import MeshplanError
from costmodels.specs import ModelSpec
from planner.atomic import atomic_write

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Per-layer names: HF suffix -> ours (inside layers.{i}).
_LAYER_MAP: dict[str, str] = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "self_attn.q_norm": "attention.q_norm",  # Qwen3
    "self_attn.k_norm": "attention.k_norm",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP: dict[str, str] = {
    "model.embed_tokens.weight": "tok_embeddings.weight",
    "model.norm.weight": "norm.weight",
    "lm_head.weight": "output.weight",
}
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_OUR_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def is_hf_dir(path: str | Path) -> bool:
    p = Path(path)
    return (p / CONFIG_FILE).is_file() and (
        (p / WEIGHTS_FILE).is_file() or (p / INDEX_FILE).is_file())


def hf_name_to_ours(name: str) -> str | None:
    """Our parameter name for an HF tensor name (None: a buffer we do not keep)."""
    if name in _TOP_MAP:
        return _TOP_MAP[name]
    m = _HF_LAYER.match(name)
    if m is None:
        return None
    layer, mod, leaf = m.groups()
    ours = _LAYER_MAP.get(mod)
    return None if ours is None else f"layers.{layer}.{ours}.{leaf}"


def our_name_to_hf(name: str) -> str:
    for hf, ours in _TOP_MAP.items():
        if name == ours:
            return hf
    m = _OUR_LAYER.match(name)
    if m is not None:
        layer, mod, leaf = m.groups()
        for hf_mod, our_mod in _LAYER_MAP.items():
            if our_mod == mod:
                return f"model.layers.{layer}.{hf_mod}.{leaf}"
    raise MeshplanError(f"export: parameter {name!r} has no Hugging Face LLaMA name")


# --------------------------------------------------------------------------- config


def config_from_spec(spec: ModelSpec) -> dict[str, Any]:
    """A `config.json` for a dense RMSNorm + SwiGLU spec: Qwen3 where it has q/k norms,
    Qwen2 where it biases q/k/v only, LLaMA otherwise."""
    if spec.norm != "rmsnorm" or spec.mlp != "swiglu" or spec.is_moe:
        raise MeshplanError(
            f"export: model norm={spec.norm}, mlp={spec.mlp} is not LLaMA-style; the Hugging "
            "Face LLaMA format needs norm=rmsnorm, mlp=swiglu and no experts"
        )
    if spec.qk_norm:
        model_type = "qwen3"
    elif spec.qkv_bias and not spec.bias:
        model_type = "qwen2"
    else:
        model_type = "llama"
    cfg: dict[str, Any] = {
        "architectures": [IMPORTABLE[model_type]],
        "model_type": model_type,
        "hidden_size": spec.hidden,
        "intermediate_size": spec.ffn_hidden,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab,
        "max_position_embeddings": spec.seq_len,
        "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tied_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if model_type != "qwen2":  # Qwen2's q/k/v bias is implied by its model_type
        cfg.update(attention_bias=spec.bias or spec.qkv_bias, mlp_bias=spec.bias)
    if model_type == "qwen3" and spec.qkv_bias != spec.bias:
        raise MeshplanError("export: q/k norms with a q/k/v-only bias has no Hugging Face family")
    return cfg


# model_type -> its transformers class; the dense decoder families this executor's model
# expresses exactly (pre-norm RMSNorm, SwiGLU, RoPE; Qwen2's q/k/v bias, Qwen3's per-head
# q/k RMSNorm and free head_dim, tied embeddings where the config ties them).
IMPORTABLE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
              "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
# families whose arithmetic differs from every importable one, and why
_NOT_EXPRESSIBLE = {
    "gemma": "scales embeddings by sqrt(hidden), offsets RMSNorm weights by one and uses GeGLU",
    "gemma2": "adds soft-capping, sandwich norms and sliding-window layers",
    "gemma3": "adds sandwich norms, q/k norms with offsets and sliding-window layers",
    "phi3": "fuses q/k/v and gate/up projections and may use partial rotary embeddings",
}


def arch_from_config(cfg: dict[str, Any], where: str) -> dict[str, Any]:
    """The architecture of a Hugging Face config.json, in ModelSpec's names, read by the cost
    model's one reader (`costmodels.hf_config.hf_config_fields`); a family or setting the
    executor's model cannot express exactly is refused with one line."""
    from costmodels.hf_config import hf_config_fields
    from costmodels.specs import SpecError

    model_type = str(cfg.get("model_type") or "llama")  # old LLaMA exports carry none
    if model_type in _NOT_EXPRESSIBLE:
        raise MeshplanError(f"{where}: model_type={model_type}: {_NOT_EXPRESSIBLE[model_type]}; "
                            "the executor's model cannot express it exactly (it imports "
                            f"{', '.join(IMPORTABLE)})")
    if model_type not in IMPORTABLE:
        raise MeshplanError(f"{where}: model_type={model_type} is not importable; the executor "
                            f"imports {', '.join(IMPORTABLE)} checkpoints")
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size",
                "intermediate_size"):
        if key not in cfg:
            raise MeshplanError(f"{where}: missing {key!r}; not a {model_type} config.json")
    window = cfg.get("sliding_window")
    if window and (model_type == "mistral" or cfg.get("use_sliding_window")):
        raise MeshplanError(f"{where}: sliding_window={window}: the executor's attention is full "
                            "causal; set sliding_window to null (or use_sliding_window false)")
    act = str(cfg.get("hidden_act", "silu"))
    if act not in ("silu", "swish"):
        raise MeshplanError(f"{where}: hidden_act={act}: the executor's {model_type} MLP is SwiGLU "
                            "(silu)")
    if "attention_bias" in cfg and bool(cfg.get("mlp_bias", cfg["attention_bias"])) != bool(cfg["attention_bias"]):
        raise MeshplanError(f"{where}: attention_bias={cfg['attention_bias']} but mlp_bias="
                            f"{cfg.get('mlp_bias')}; the executor's model has one bias switch")
    if cfg.get("o_proj_bias") or (model_type == "qwen2" and cfg.get("attention_bias")):
        raise MeshplanError(f"{where}: an output-projection bias is not in the executor's "
                            f"{model_type} model (Qwen2 biases q, k and v only)")
    # transformers >= 5 nests RoPE settings in rope_parameters; older configs use rope_theta
    # and rope_scaling. Only plain RoPE (Su et al. 2021) is implemented here.
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, dict) else rope
    if kind not in (None, "default"):
        raise MeshplanError(f"{where}: RoPE scaling {kind!r} is not supported by the executor's "
                            "model (plain RoPE only); drop it from config.json to load anyway")
    if model_type in ("llama", "mistral") and cfg.get("head_dim") not in (
            None, cfg["hidden_size"] // cfg["num_attention_heads"]):
        raise MeshplanError(f"{where}: head_dim={cfg['head_dim']} differs from hidden_size / "
                            f"num_attention_heads; {model_type} checkpoints need them equal")
    try:
        fields = hf_config_fields({**cfg, "model_type": model_type, "rms_norm_eps":
                                   cfg.get("rms_norm_eps", 1e-6)}, where)
    except SpecError as exc:
        raise MeshplanError(str(exc)) from None
    if fields["num_experts"]:
        raise MeshplanError(f"{where}: num_experts={fields['num_experts']}: mixture-of-experts "
                            "checkpoints are not imported; start the MoE model from scratch")
    keep = ("hidden", "layers", "heads", "kv_heads", "vocab", "ffn_hidden", "mlp", "norm",
            "tied_embeddings", "bias", "qkv_bias", "qk_norm", "attn_head_dim", "rope_theta",
            "norm_eps")
    out = {k: fields[k] for k in keep}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if theta is not None:
        out["rope_theta"] = float(theta)
    return out


def read_config(directory: str | Path) -> dict[str, Any]:
    p = Path(directory) / CONFIG_FILE
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MeshplanError(f"{p}: unreadable config.json ({exc})") from None
    if not isinstance(cfg, dict):
        raise MeshplanError(f"{p}: config.json must hold a JSON object")
    return cfg


# --------------------------------------------------------------------------- tensors


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise MeshplanError(f"{path}: not a readable safetensors file ({exc})") from None


def read_hf_tensors(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint (one file, or the shards an index names)."""
    d = Path(directory)
    if (d / WEIGHTS_FILE).is_file():
        return _load_safetensors(d / WEIGHTS_FILE)
    try:
        index = json.loads((d / INDEX_FILE).read_text())
        files = sorted(set(index["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError, AttributeError) as exc:
        raise MeshplanError(f"{d / INDEX_FILE}: unreadable shard index ({exc})") from None
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(_load_safetensors(d / f))
    return out


def hf_state_to_ours(tensors: dict[str, torch.Tensor], tied: bool,
                     where: str) -> dict[str, torch.Tensor]:
    """Rename HF tensors to our state-dict keys (fp32); unknown names are an error."""
    state: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a recomputed buffer some exports carry
        ours = hf_name_to_ours(name)
        if ours is None:
            raise MeshplanError(f"{where}: tensor {name!r} is not part of a LLaMA model")
        state[ours] = t.to(torch.float32) if t.dtype != torch.float32 else t
    if tied:
        state.pop("output.weight", None)
        state["output.weight"] = state["tok_embeddings.weight"]
    return state


def export_hf(model: torch.nn.Module, spec: ModelSpec, directory: str | Path) -> Path:
    """Write `config.json` + `model.safetensors` for `model` into `directory` (atomic files)."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cfg = config_from_spec(spec)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        if spec.tied_embeddings and name == "output.weight":
            continue  # HF ties lm_head to embed_tokens through the config
        tensors[our_name_to_hf(name)] = t.detach().to("cpu").contiguous().clone()
    atomic_write(d / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    from planner.atomic import atomic_write_text

    atomic_write_text(d / CONFIG_FILE, json.dumps(cfg, indent=2))
    return d
