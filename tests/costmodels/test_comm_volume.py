"""The communication-volume model: exact parameter shapes and the per-layout terms."""

import pytest

from costmodels.comm_volume import comm_volume, param_shapes
from costmodels.presets import PRESETS
from costmodels.specs import Layout


@pytest.mark.parametrize("name", ["tiny", "tiny-mha", "small", "llama3-8b", "gpt3-175b"])
def test_param_shapes_sum_to_param_count(name):
    spec = PRESETS[name]
    assert sum(__import__("math").prod(s) for _, s in param_shapes(spec)) == spec.param_count()


def test_ddp_all_reduces_the_fp32_gradient_once():
    spec = PRESETS["tiny-mha"]
    v = comm_volume(spec, Layout(dp=2, global_batch=8, micro_batch=2, precision="fp32"))
    # + the loss and one fp32 norm per parameter tensor (the whole-tensor clip)
    assert v.by_kind()["all_reduce"] == 4 * spec.param_count() + 4 + 4 * len(param_shapes(spec))
    assert all(t.source for t in v.terms)


def test_zero3_gathers_twice_per_micro_batch_zero2_once_per_step():
    spec = PRESETS["tiny-mha"]
    z3 = comm_volume(spec, Layout(dp=2, sharding="zero3", global_batch=8, micro_batch=2,
                                  precision="fp32")).by_kind()
    z2 = comm_volume(spec, Layout(dp=2, sharding="zero2", global_batch=8, micro_batch=2,
                                  precision="fp32")).by_kind()
    assert z3["all_gather"] == 2 * 2 * z2["all_gather"]  # 2 micro-batches x (fwd + bwd)
    assert z3["reduce_scatter"] == z2["reduce_scatter"] == 4 * spec.param_count()


def test_pipeline_send_recv_per_stage_boundary():
    spec = PRESETS["tiny"]
    lay = Layout(pp=2, global_batch=8, micro_batch=4, precision="fp32", schedule="1f1b")
    sr = comm_volume(spec, lay).by_kind()["send_recv"]
    # 2 micro-batches x 1 boundary x (fwd + bwd) x 4 rows, mean over the 2 pp ranks
    assert sr == 2 * 1 * 2 * 4 * spec.seq_len * spec.hidden * 4 / 2
    cp_sp = comm_volume(spec, lay.with_(cp=2, tp=2, sequence_parallel=True)).by_kind()["send_recv"]
    assert cp_sp == sr / 4  # each rank sends its sequence shard: s / (cp * tp) tokens


def test_three_d_terms_are_means_over_pipeline_stages():
    spec = PRESETS["tiny"]
    flat = comm_volume(spec, Layout(tp=2, global_batch=4, micro_batch=2, precision="fp32")).by_kind()
    piped = comm_volume(spec, Layout(tp=2, pp=2, global_batch=4, micro_batch=1,
                                     precision="fp32")).by_kind()
    # same tokens per step through each TP group, half the layers per stage
    assert piped["all_reduce"] - 8 == pytest.approx((flat["all_reduce"] - 8) / 2)


def test_tensor_parallel_scales_with_layers_and_bf16_halves_activations():
    spec = PRESETS["tiny"]

    def vol(precision="fp32", sp=True, layers=spec.layers):
        lay = Layout(tp=2, global_batch=4, micro_batch=2, precision=precision, sequence_parallel=sp)
        return comm_volume(spec.with_(layers=layers), lay).by_kind()

    f32, b16 = vol(), vol("bf16")
    assert b16["reduce_scatter"] * 2 == f32["reduce_scatter"]
    assert vol(layers=8)["reduce_scatter"] > f32["reduce_scatter"]
    # Without SP each all-gather + reduce-scatter pair is one all-reduce of the same tensor;
    # the vocab-parallel loss's per-token all-reduces are common to both.
    plain = vol(sp=False)
    assert plain.get("reduce_scatter", 0) == 0 and plain.get("all_gather", 0) == 0
    loss = 3 * 2 * 2 * spec.seq_len * 4  # micro-batches x (max, sum-exp, target) x tokens x fp32
    norm_grads = (2 * spec.layers + 1) * spec.hidden * 4  # SP only: partial norm-weight grads
    scalars = 8  # the executor's loss sum and grad-norm^2 all-reduces
    assert plain["all_reduce"] - loss - scalars == f32["reduce_scatter"]
    assert f32["all_reduce"] == loss + norm_grads + scalars
