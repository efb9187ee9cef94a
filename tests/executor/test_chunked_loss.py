"""`layout.loss_chunks`: the cross entropy over sequence chunks, each chunk's logits
recomputed in backward (`executor.loss`). The same loss and gradients as the whole-sequence
loss to 1e-6; `meshplan run` trains the same losses under it in one process and under
DDP / FSDP2 / CP / DeepSpeed; the peak memory torch.profiler's memory profile measures drops
by at least 70 % of the logits term `costmodels.memory` charges; plans it cannot run
(PP, TP) are refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.profiler import ProfilerActivity, profile
from torch.profiler._memory_profiler import MemoryProfileTimeline

from costmodels import memory
from costmodels.capabilities import unsupported
from costmodels.cases import single_case
from costmodels.profile import Profile
from costmodels.specs import ClusterSpec, Layout
from costmodels.steptime import evaluate
from executor.loss import token_loss_sum
from executor.model import build_model
from tests.conftest import assert_clean_error, run_cli
from tests.executor.executor_testlib import make_plan, read_metrics, write_plan

# a vocabulary large against the hidden size, so the logits dominate the last stage
SPEC = {"name": "chunk-test", "layers": 2, "hidden": 64, "heads": 4, "kv_heads": 4, "ffn_hidden": 128,
        "vocab": 4096, "seq_len": 128, "tied_embeddings": False}
ROWS, CHUNKS = 4, 8


def _model(seed: int = 0):
    from costmodels.specs import ModelSpec

    return build_model(ModelSpec.from_dict(SPEC), seed=seed)


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, SPEC["vocab"], (ROWS, SPEC["seq_len"]), generator=gen)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = -100
    pos = torch.arange(SPEC["seq_len"]).expand(ROWS, -1)
    return ids, pos, torch.zeros_like(ids), labels


def _loss_and_grads(chunks: int, bf16: bool = False):
    model = _model()
    ids, pos, doc, labels = _batch()
    model.loss_chunks = chunks
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(ids, pos, doc, labels=labels) if chunks > 1 \
            else token_loss_sum(model(ids, pos, doc), labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_loss_and_gradients_equal_the_whole_sequence_loss():
    whole, g_whole = _loss_and_grads(1)
    chunked, g_chunked = _loss_and_grads(CHUNKS)
    assert abs(float(chunked - whole)) <= 1e-6 * abs(float(whole))
    for name, g in g_whole.items():  # the head's gradient sums over chunks in another order
        rel = float((g_chunked[name] - g).norm() / g.norm())
        assert rel <= 1e-6, (name, rel)


def test_in_bf16_the_chunked_head_gradient_is_as_accurate_as_the_whole_one():
    """bf16 autocast: the head's gradient sums its chunks in fp32 (`executor.loss`), so
    against the fp32 gradient it is no worse than the whole-sequence bf16 one."""
    _, exact = _loss_and_grads(1)
    whole_loss, whole = _loss_and_grads(1, bf16=True)
    chunked_loss, chunked = _loss_and_grads(CHUNKS, bf16=True)
    assert abs(float(chunked_loss - whole_loss)) <= 1e-6 * abs(float(whole_loss))
    name = "output.weight"
    err = {k: float((g[name] - exact[name]).norm() / exact[name].norm())
           for k, g in (("whole", whole), ("chunked", chunked))}
    assert err["chunked"] <= 1.1 * err["whole"], err


def _peak_bytes(chunks: int) -> float:
    """Peak CPU bytes over one forward + backward, from torch.profiler's memory timeline."""
    model = _model()
    ids, pos, doc, labels = _batch()
    model.loss_chunks = chunks
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                 with_stack=True) as prof:
        loss = model(ids, pos, doc, labels=labels) if chunks > 1 \
            else token_loss_sum(model(ids, pos, doc), labels)
        loss.backward()
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return float(np.asarray(sizes, dtype=np.float64).sum(axis=1).max())


def test_peak_memory_drops_by_the_logits_term_the_cost_model_charges():
    from costmodels.specs import ModelSpec

    spec = ModelSpec.from_dict(SPEC)
    lay = Layout(micro_batch=ROWS, global_batch=ROWS, precision="fp32")
    cluster = ClusterSpec("cpu", 1)
    peak = {n: float(evaluate(single_case(spec, Layout(**{**lay.__dict__, "loss_chunks": n}), cluster,
                                          framework="meshplan"), Profile())["peak_memory_gb"][0]) * 1e9
            for n in (1, CHUNKS)}
    # eager cross entropy: the saved fp32 log-softmax, its gradient, the logits' gradient
    logits_term = memory.logits_bytes(ROWS * SPEC["seq_len"], SPEC["vocab"], 1, 4.0, True)
    assert logits_term == ROWS * SPEC["seq_len"] * SPEC["vocab"] * 12
    # the step's prediction keeps 1/CHUNKS of it (scaled by the profile's memory factor)
    assert peak[1] - peak[CHUNKS] == pytest.approx(
        logits_term * (1 - 1 / CHUNKS) * Profile().memory_factor, rel=1e-6)
    measured_drop = _peak_bytes(1) - _peak_bytes(CHUNKS)
    assert measured_drop >= 0.7 * logits_term, (measured_drop, logits_term)


def test_run_matches_the_whole_loss_in_one_process(tmp_path):
    def run(chunks: int):
        plan = make_plan(model=SPEC, layout={"micro_batch_size": 2, "global_batch_size": ROWS,
                                             "loss_chunks": chunks},
                         train={"max_steps": 4, "lr": 1e-3, "warmup_steps": 0}, checkpoint={"every": 0})
        out = tmp_path / f"c{chunks}"
        proc = run_cli("run", str(write_plan(tmp_path / f"p{chunks}", plan)), "--out", str(out), "--no-progress")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return read_metrics(out)

    whole, chunked = run(1), run(CHUNKS)
    for a, b in zip(chunked, whole, strict=True):
        assert abs(a["loss"] - b["loss"]) <= 1e-6 * abs(b["loss"]), (a["step"], a["loss"], b["loss"])


@pytest.mark.parametrize("layout,field", [({"pp": 2}, "pp=2"), ({"tp": 2}, "tp=2")])
def test_layouts_it_cannot_run_are_refused_in_one_line(tmp_path, layout, field):
    plan = make_plan(model=SPEC, cluster={"num_gpus": 2},
                     layout={"micro_batch_size": 1, "global_batch_size": ROWS, "loss_chunks": 4, **layout},
                     train={"max_steps": 2}, checkpoint={"every": 0})
    reason = unsupported(plan.model_spec(), plan.layout_spec())
    assert reason is not None and "layout.loss_chunks=4" in reason and field in reason
    proc = run_cli("run", str(write_plan(tmp_path, plan)), "--out", str(tmp_path / "run"))
    assert_clean_error(proc, "layout.loss_chunks=4", field)
