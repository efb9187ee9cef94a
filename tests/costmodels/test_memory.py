"""Memory formulas pinned to the ZeRO and Korthikanti papers."""

import numpy as np
import pytest

from costmodels.memory import (
    korthikanti_layer_activation_bytes,
    layer_activation_bytes,
    model_state_bytes,
)
from costmodels.pipeline import CODE, inflight_microbatches

GB = 1e9


@pytest.mark.parametrize("stage,expected", [(0, 120.0), (1, 31.4), (2, 16.6), (3, 1.9)])
def test_zero_paper_7_5b_on_64_gpus(stage, expected):
    # Rajbhandari et al. 2020, Fig. 1: 7.5B params, Nd = 64, K = 12:
    # 120 GB baseline -> 31.4 / 16.6 / 1.9 GB per GPU for stages 1 / 2 / 3.
    parts = model_state_bytes(7.5e9, 64, stage, weight_bytes=2, grad_bytes=2, optim_bytes=12)
    total = sum(float(v) for v in parts.values()) / GB
    assert total == pytest.approx(expected, abs=0.05)


def test_korthikanti_table2_rows():
    s, b, h, a, t = 2048, 1, 12288, 96, 8  # GPT-3 175B as in Korthikanti et al. 2022, Table 3
    sbh = s * b * h
    none = korthikanti_layer_activation_bytes(s, b, h, a, t, False, 0)
    assert none == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    sp = korthikanti_layer_activation_bytes(s, b, h, a, t, True, 0)
    assert sp == pytest.approx(sbh * (34 / t + 5 * a * s / (h * t)))
    sel = korthikanti_layer_activation_bytes(s, b, h, a, t, True, 1)
    assert sel == pytest.approx(sbh * 34 / t)
    full = korthikanti_layer_activation_bytes(s, b, h, a, t, False, 2)
    assert full == pytest.approx(2 * sbh)
    # Without any parallelism: sbh (34 + 5 a s / h) (Sec. 4.1, eq. 1).
    assert korthikanti_layer_activation_bytes(s, b, h, a, 1, False, 0) == pytest.approx(sbh * (34 + 5 * a * s / h))


@pytest.mark.parametrize("t,sp,rc", [(1, False, 0), (8, False, 0), (8, True, 0), (8, True, 1), (4, False, 2), (4, True, 2)])
def test_generalised_formula_reduces_to_korthikanti(t, sp, rc):
    # GPT layer: kv = h, FFN = 4h, GELU, dropout on, explicit attention scores (no flash).
    s, b, h, a = 2048, 2, 12288, 96
    ours = layer_activation_bytes(s, b, h, a, h, 4 * h, False, t, 1, sp, rc, flash=False, dropout=True)
    assert ours == pytest.approx(korthikanti_layer_activation_bytes(s, b, h, a, t, sp, rc))


def test_gqa_swiglu_flash_is_smaller_than_mha_gelu():
    s, b, h = 8192, 1, 8192
    llama = layer_activation_bytes(s, b, h, 64, 1024, 28672, True, 8, 1, True, 0, flash=True)
    # per token: (4h replicated + h + 2kv + h + 3f) x 2 bytes / t
    expected = s * b * 2 * (4 * h + 2 * h + 2 * 1024 + 3 * 28672) / 8
    assert llama == pytest.approx(expected)


def test_context_parallel_divides_tokens():
    a = layer_activation_bytes(8192, 1, 4096, 32, 1024, 14336, True, 1, 1, False, 0)
    b = layer_activation_bytes(8192, 1, 4096, 32, 1024, 14336, True, 1, 4, False, 0)
    assert a == pytest.approx(4 * b)


def test_inflight_microbatches():
    # 1F1B: p in flight on stage 1; interleaved: p (1 + (p-1)/(p v)); GPipe: m.
    one_f_one_b, interleaved, gpipe = (CODE[n] for n in ("1f1b", "interleaved", "gpipe"))
    assert inflight_microbatches(one_f_one_b, 8, 1, 32) == 8
    assert inflight_microbatches(interleaved, 8, 2, 32) == pytest.approx(8 * (1 + 7 / 16))
    assert inflight_microbatches(gpipe, 8, 1, 32) == 32
    assert inflight_microbatches(one_f_one_b, 8, 1, 4) == 4  # never more than m
    assert np.allclose(inflight_microbatches(one_f_one_b, np.array([1, 4]), 1, 16), [1, 4])


def _one(model, layout, cluster, framework=None):
    from costmodels.cases import single_case
    from costmodels.profile import Profile
    from costmodels.steptime import evaluate

    out = evaluate(single_case(model, layout, cluster, framework=framework), Profile())
    return {k: float(v[0]) for k, v in out.items()}


def test_tied_embeddings_put_a_copy_on_each_end_stage():
    from dataclasses import replace

    from costmodels.presets import get_preset
    from costmodels.specs import ClusterSpec, Layout

    untied = get_preset("llama3-8b")
    tied = replace(untied, tied_embeddings=True)
    c = ClusterSpec("h100-sxm", 8)
    vh = untied.vocab * untied.hidden
    one = Layout(dp=8, micro_batch=1, global_batch=8)
    # one stage: tied embeddings are one matrix fewer
    assert _one(untied, one, c)["params_local"] - _one(tied, one, c)["params_local"] == pytest.approx(vh)
    # two stages: the first holds the embedding, the last the head or (tied) its own copy of it
    two = Layout(pp=2, dp=4, micro_batch=1, global_batch=8)
    assert _one(tied, two, c)["params_local"] == pytest.approx(_one(untied, two, c)["params_local"])
    assert _one(tied, two, c)["params_local"] == pytest.approx(untied.layers // 2 * (
        _one(untied, one, c)["params_local"] - 2 * vh) / untied.layers + vh)


def test_peak_memory_as_the_framework_logs_it():
    from costmodels.presets import get_preset
    from costmodels.specs import ClusterSpec, Layout
    from costmodels.stacks import GIB_GB

    m, c = get_preset("llama3-8b"), ClusterSpec("h100-sxm", 8)
    lay = Layout(pp=2, dp=4, micro_batch=1, global_batch=64, sharding="zero1")
    nano = _one(m, lay, c, "nanotron")
    assert nano["mem_first_stage_gb"] != pytest.approx(nano["mem_last_stage_gb"])
    # nanotron's benchmark table: rank 0 (the first stage), in GiB
    assert nano["peak_memory_as_logged"] == pytest.approx(nano["mem_first_stage_gb"] / GIB_GB)
    # torchtitan: the maximum over ranks, in GiB; meshplan's own records: the maximum, in GB
    titan = _one(m, lay, c, "torchtitan")
    assert titan["peak_memory_as_logged"] == pytest.approx(titan["peak_memory_gb"] / GIB_GB)
    own = _one(m, lay, c, "meshplan")
    assert own["peak_memory_as_logged"] == pytest.approx(own["peak_memory_gb"])


def test_tied_embeddings_under_a_v_schedule():
    from dataclasses import replace

    from costmodels.presets import get_preset
    from costmodels.specs import ClusterSpec, Layout

    untied = get_preset("llama3-8b")
    tied = replace(untied, tied_embeddings=True)
    c = ClusterSpec("h100-sxm", 8)
    lay = Layout(pp=2, vpp=2, dp=4, micro_batch=1, global_batch=32, schedule="zbv")
    t, u = _one(tied, lay, c), _one(untied, lay, c)
    # the V's last rank holds two middle stages: no embedding, tied or not
    assert t["mem_last_stage_gb"] == pytest.approx(u["mem_last_stage_gb"])
    # its first rank holds the embedding and the head: one matrix fewer when they are tied
    assert t["mem_first_stage_gb"] < u["mem_first_stage_gb"]
