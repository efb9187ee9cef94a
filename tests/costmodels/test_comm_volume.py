"""The communication-volume model: exact parameter shapes and the per-layout terms."""

import pytest

from costmodels.comm_volume import comm_volume, param_shapes, pipeline_microbatches
from costmodels.presets import PRESETS
from costmodels.specs import Layout


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "small", "llama3-8b", "gpt3-175b"])
def test_param_shapes_sum_to_param_count(name):
    spec = PRESETS[name]
    assert sum(__import__("math").prod(s) for _, s in param_shapes(spec)) == spec.param_count()


def test_ddp_all_reduces_the_fp32_gradient_once():
    spec = PRESETS["tiny-mha"]
    v = comm_volume(spec, Layout(dp=2, global_batch=8, micro_batch=2, precision="fp32"))
    assert v.by_kind()["all_reduce"] == 4 * spec.param_count() + 8
    assert all(t.source for t in v.terms)


def test_zero3_gathers_twice_per_micro_batch_zero2_once_per_step():
    spec = PRESETS["tiny-mha"]
    z3 = comm_volume(spec, Layout(dp=2, sharding="zero3", global_batch=8, micro_batch=2,
                                  precision="fp32")).by_kind()
    z2 = comm_volume(spec, Layout(dp=2, sharding="zero2", global_batch=8, micro_batch=2,
                                  precision="fp32")).by_kind()
    assert z3["all_gather"] == 2 * 2 * z2["all_gather"]  # 2 micro-batches x (fwd + bwd)
    assert z3["reduce_scatter"] == z2["reduce_scatter"] == 4 * spec.param_count()


def test_pipeline_send_recv_and_resplit():
    spec = PRESETS["tiny"]
    lay = Layout(pp=2, global_batch=8, micro_batch=8, precision="fp32", schedule="1f1b")
    assert pipeline_microbatches(lay) == (2, 4)  # 1F1B needs >= pp micro-batches
    sr = comm_volume(spec, lay).by_kind()["send_recv"]
    assert sr == 2 * 1 * 2 * 4 * spec.seq_len * spec.hidden * 4 / 2


def test_tensor_parallel_scales_with_layers_and_bf16_halves_activations():
    spec = PRESETS["tiny"]
    f32 = comm_volume(spec, Layout(tp=2, global_batch=4, micro_batch=2, precision="fp32"))
    b16 = comm_volume(spec, Layout(tp=2, global_batch=4, micro_batch=2, precision="bf16"))
    assert b16.by_kind()["reduce_scatter"] * 2 == f32.by_kind()["reduce_scatter"]
    deeper = comm_volume(spec.with_(layers=8), Layout(tp=2, global_batch=4, micro_batch=2,
                                                      precision="fp32"))
    assert deeper.by_kind()["reduce_scatter"] > f32.by_kind()["reduce_scatter"]
