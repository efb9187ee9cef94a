"""Hugging Face import of the common decoder families, against transformers' own models built
here (random weights, no download): LLaMA with tied embeddings, Mistral, Qwen2 (q/k/v bias
without o / MLP bias) and Qwen3 (per-head q/k RMSNorm, head_dim != hidden / heads). The
executor's model must hold the same parameter count and give the same logits; a family it
cannot express is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from costmodels.errors import MeshplanError
from costmodels.specs import ModelSpec
from executor.continual import load_weights, resolve_init, source_state_dict
from executor.hf_format import arch_from_config, export_hf
from executor.model import build_model, count_params

transformers = pytest.importorskip("transformers")

COMMON = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=64, rms_norm_eps=1e-6,
              rope_theta=10000.0, hidden_act="silu")


def _reference(family: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if family == "qwen2":
        cfg = transformers.Qwen2Config(**COMMON, tie_word_embeddings=False, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "qwen2-tied":
        cfg = transformers.Qwen2Config(**COMMON, tie_word_embeddings=True, use_sliding_window=False)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif family == "qwen3":
        cfg = transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=False,
                                       attention_bias=False, use_sliding_window=False)
        model = transformers.Qwen3ForCausalLM(cfg)
    elif family == "mistral":
        cfg = transformers.MistralConfig(**COMMON, sliding_window=None, tie_word_embeddings=False)
        model = transformers.MistralForCausalLM(cfg)
    elif family == "llama-tied":
        cfg = transformers.LlamaConfig(**COMMON, tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        raise AssertionError(family)
    with torch.no_grad():  # biases are zero at init: make them count in the comparison
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _import(model: torch.nn.Module, out: Path) -> tuple[torch.nn.Module, ModelSpec]:
    model.save_pretrained(out, safe_serialization=True)
    src = resolve_init(str(out))
    spec = ModelSpec(name="imported", seq_len=64, **src.arch)
    ours = build_model(spec, seed=99)
    load_weights(ours, source_state_dict(src), str(out))
    return ours.eval(), spec


@pytest.mark.parametrize("family", ["qwen2", "qwen2-tied", "qwen3", "mistral", "llama-tied"])
def test_imported_family_matches_transformers(family, tmp_path):
    ref = _reference(family)
    ours, spec = _import(ref, tmp_path / family)
    unique = sum(p.numel() for p in {id(p): p for p in ref.parameters()}.values())
    assert count_params(ours) == unique == spec.param_count()
    if family.startswith("qwen2"):
        assert spec.qkv_bias and not spec.bias
        assert ours.layers["0"].attention.wq.bias is not None and ours.layers["0"].attention.wo.bias is None
    if family == "qwen3":
        assert spec.qk_norm and spec.head_dim == 24
    x = torch.randint(0, spec.vocab, (2, 32), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(32).unsqueeze(0).expand(2, -1)
    doc = torch.zeros(2, 32, dtype=torch.long)
    with torch.no_grad():
        want = ref(input_ids=x).logits
        got = ours(x, pos, doc)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_export_round_trips_through_transformers(family, tmp_path):
    """Our export of an imported model loads in transformers with the same logits."""
    ref = _reference(family)
    ours, spec = _import(ref, tmp_path / "in")
    out = export_hf(ours, spec, tmp_path / "out")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == family
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    x = torch.randint(0, spec.vocab, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=x).logits, ref(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_families_the_model_cannot_express_are_refused():
    base = {**COMMON}
    for model_type, needle in (("gemma", r"sqrt\(hidden\)"), ("gemma2", "soft-capping"), ("phi3", "fuses"),
                               ("falcon", "not importable")):
        with pytest.raises(MeshplanError, match=needle) as exc:
            arch_from_config({**base, "model_type": model_type}, "config.json")
        assert "\n" not in str(exc.value)
    with pytest.raises(MeshplanError, match="sliding_window=4096"):
        arch_from_config({**base, "model_type": "mistral", "sliding_window": 4096}, "c")
    with pytest.raises(MeshplanError, match="mixture-of-experts"):
        arch_from_config({**base, "model_type": "qwen2", "num_experts": 8, "num_experts_per_tok": 2,
                          "moe_intermediate_size": 32}, "c")
    with pytest.raises(MeshplanError, match="hidden_act=gelu"):
        arch_from_config({**base, "model_type": "llama", "hidden_act": "gelu"}, "c")
