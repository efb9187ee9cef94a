"""FLOP formulas pinned to published numbers."""

import numpy as np
import pytest

from costmodels.flops import (
    megatron_flops_per_token,
    mfu,
    model_flops_per_token,
    model_flops_per_token_spec,
)
from costmodels.presets import get_preset


def test_megatron_readme_row_reproduced():
    # Megatron-LM README H100 weak-scaling table: GPT 7.1B (30 layers, h 4096, s 4096,
    # V 131072) on 96 H100s, 465.9 TFLOP/s per GPU at 10239.6 tokens/s/GPU
    # (published_runs.csv r-row "GPT-7.1B (Megatron weak-scaling)").
    f = megatron_flops_per_token(30, 4096, 4096, 131072, full_recompute=False)
    assert f * 10239.6 / 1e12 == pytest.approx(465.9, rel=2e-3)


def test_narayanan_table1_row_reproduced():
    # Narayanan et al. 2021 Table 1: 1T model (128 layers, h 25600, s 2048, V 51200) at
    # 163 TFLOP/s per GPU on 3072 A100s, counted with full recomputation (eq. 3).
    f = megatron_flops_per_token(128, 25600, 2048, 51200, full_recompute=True)
    assert f * 20.0 / 1e12 == pytest.approx(163, rel=0.01)


def test_general_formula_equals_megatron_for_gpt():
    # GELU MLP with FFN = 4h, MHA, full (non-causal) attention: our count must equal
    # Megatron's 72 l h^2 (1 + s/6h + V/12lh) exactly.
    n_layers, h, s, v = 96, 12288, 2048, 51200
    ours = model_flops_per_token(n_layers, h, 4 * h, h, 2, v, s, causal=False)
    assert ours == pytest.approx(megatron_flops_per_token(n_layers, h, s, v, False), rel=1e-12)


def test_causal_attention_halves_score_flops():
    m = get_preset("llama3-8b")
    full = model_flops_per_token_spec(m, causal=False)
    causal = model_flops_per_token_spec(m, causal=True)
    attn_full = 3 * m.layers * 4 * m.seq_len * m.hidden
    assert full - causal == pytest.approx(attn_full / 2)


def test_six_n_for_dense_llama():
    # Without attention and logits the count is 6 x matmul params (Kaplan et al. 2020).
    m = get_preset("llama3-70b")
    f = model_flops_per_token_spec(m, seq=1)  # negligible attention
    non_embed = m.param_count() - m.embedding_params() - m.norm_params() * (2 * m.layers + 1)
    assert f == pytest.approx(6 * non_embed + 6 * m.hidden * m.vocab, rel=1e-3)


def test_mfu_definition():
    assert mfu(1000.0, 6e11, 1e15) == pytest.approx(0.6)
    assert np.allclose(mfu(np.array([1.0, 2.0]), 1e12, 1e12), [1.0, 2.0])
