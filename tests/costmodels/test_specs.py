"""Specs validate themselves; the hardware catalog matches the reference CSV."""

import json
from pathlib import Path

import pandas as pd
import pytest

from costmodels.errors import MeshplanError
from costmodels.hardware import ACCELERATORS, get_accelerator
from costmodels.presets import PRESETS, get_preset
from costmodels.specs import ClusterSpec, Layout, ModelSpec, SpecError
from planner.model_args import model_from_hf_config

REF = Path(__file__).resolve().parents[3] / "shared" / "data" / "accelerators_reference.csv"


def test_llama3_parameter_counts():
    # Dubey et al. 2024: 8.03B, 70.6B, 405B (meta-llama config.json totals).
    assert get_preset("llama3-8b").param_count() == 8_030_261_248
    assert get_preset("llama3-70b").param_count() == 70_553_706_496
    assert abs(get_preset("llama3-405b").param_count() / 1e9 - 405.85) < 0.01


def test_tiny_preset_is_a_few_million():
    assert 1e6 < get_preset("tiny").param_count() < 2e7


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden=100, heads=3), "divisible by heads"),
        (dict(kv_heads=3), "kv_heads"),
        (dict(layers=0), "layers"),
    ],
)
def test_model_spec_errors(kwargs, match):
    base = dict(name="m", layers=2, hidden=128, ffn_hidden=256, heads=4, kv_heads=2, vocab=100, seq_len=64)
    base.update(kwargs)
    with pytest.raises(SpecError, match=match):
        ModelSpec(**base)


def test_layout_checks():
    m = get_preset("llama3-8b")
    with pytest.raises(SpecError, match="divide the model's 32 attention heads"):
        Layout(tp=3, dp=1).check_against(m)
    with pytest.raises(SpecError, match="cluster has 16 GPUs"):
        Layout(tp=2, dp=2, global_batch=4).check_against(m, 16)
    with pytest.raises(SpecError, match="multiple of micro_batch x dp"):
        Layout(dp=4, micro_batch=2, global_batch=6)
    with pytest.raises(SpecError, match="exceeds the model's 32 layers"):
        Layout(pp=64).check_against(m)
    Layout(tp=8, pp=4, dp=2, global_batch=16).check_against(m, 64)


def test_cluster_checks():
    with pytest.raises(SpecError, match="whole number"):
        ClusterSpec("h100-sxm", 12)
    assert ClusterSpec("h100-sxm", 16).num_nodes == 2
    with pytest.raises(SpecError, match="unknown accelerator"):
        get_accelerator("tpu-v9")


def test_hf_config_import(tmp_path):
    cfg = {
        "hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32,
        "num_key_value_heads": 8, "num_hidden_layers": 32, "vocab_size": 128256,
        "max_position_embeddings": 131072, "hidden_act": "silu", "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False,
    }
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    m = model_from_hf_config(p, seq_len=8192)
    assert m.param_count() == get_preset("llama3-8b").param_count()
    with pytest.raises(MeshplanError, match="not found"):
        model_from_hf_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(MeshplanError, match="not valid JSON"):
        model_from_hf_config(tmp_path / "bad.json")


@pytest.mark.skipif(not REF.exists(), reason="shared reference data not present")
def test_catalog_matches_reference_csv():
    ref = pd.read_csv(REF)
    rows = {
        "a100-40gb": "A100-SXM4-40GB", "a100-80gb": "A100-SXM4-80GB", "h100-sxm": "H100-SXM5-80GB",
        "h800": "H800-SXM5-80GB", "h200": "H200-SXM-141GB", "b200": "B200 (HGX/DGX B200)", "mi300x": "MI300X",
    }
    for key, name in rows.items():
        r = ref[ref.gpu == name].iloc[0]
        a = ACCELERATORS[key]
        assert a.bf16_tflops == pytest.approx(float(r.bf16_dense_tflops)), key
        assert a.hbm_gb == pytest.approx(float(r.hbm_capacity_gb)), key
        assert a.hbm_tb_s == pytest.approx(float(r.hbm_bandwidth_tb_s)), key
        assert a.scaleup_gbps == pytest.approx(float(r.scaleup_bw_per_gpu_GB_s_per_dir)), key
        assert a.scaleout_gbps == pytest.approx(float(r.typical_scaleout_per_gpu_Gb_s) / 8), key
        if str(r.fp8_dense_tflops) not in ("n/a", "nan", ""):
            assert a.fp8_tflops == pytest.approx(float(r.fp8_dense_tflops)), key


def test_presets_are_valid():
    for name, m in PRESETS.items():
        assert m.param_count() > 0, name


def test_hf_config_nested_rope_parameters(tmp_path):
    # transformers >= 5 writes {"rope_parameters": {"rope_theta": ...}} instead of rope_theta.
    cfg = {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4,
           "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 1000,
           "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}, "rms_norm_eps": 1e-5}
    p = tmp_path / "config.json"
    p.write_text(json.dumps(cfg))
    assert model_from_hf_config(p, seq_len=128).rope_theta == 500000.0
