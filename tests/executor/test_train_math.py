"""Training-loop arithmetic: gradient accumulation, LR schedules, clipping, precision."""

from __future__ import annotations

import math

import pytest
import torch

from costmodels.errors import MeshplanError
from costmodels.lr_schedule import LRSchedule
from executor.data.loader import LoaderConfig, PackedLoader
from executor.data.prepare import prepare_default_corpus
from executor.data.shards import PreparedDataset
from executor.model import build_model
from executor.strategy import Strategy, autocast_dtype
from tests.executor.executor_testlib import MICRO, make_plan


def _setup(objective: str = "clm") -> tuple[Strategy, PackedLoader]:
    plan = make_plan(train={"objective": objective})
    ds = PreparedDataset(prepare_default_corpus(8192, 4000, progress=False))
    ld = PackedLoader(ds, LoaderConfig(seq_len=MICRO.seq_len, rows=8, objective=objective,
                                       seed=2, mixture={"code": 0.5, "english": 0.5}))
    strat = Strategy()
    strat.setup(build_model(MICRO, objective, seed=1), plan)
    return strat, ld


def _grads(strat: Strategy) -> dict[str, torch.Tensor]:
    assert strat.model is not None
    return {n: p.grad.clone() for n, p in strat.model.named_parameters()}


@pytest.mark.parametrize("objective", ["clm", "mlm"])
def test_grad_accumulation_equals_one_big_batch(objective: str) -> None:
    strat, ld = _setup(objective)
    batch, _ = ld.global_batch(0)
    targets = batch.num_targets()
    loss_big = strat.forward_backward([batch], targets)
    big = _grads(strat)
    strat.zero_grad()
    loss_acc = strat.forward_backward(batch.split(2), targets)  # 4 micro-batches of 2 rows
    acc = _grads(strat)
    torch.testing.assert_close(loss_acc, loss_big, rtol=1e-6, atol=1e-6)
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-7)
    # Two "data-parallel ranks" each normalising by the global count sum to the same.
    strat.zero_grad()
    halves = [batch.select(slice(0, 4)), batch.select(slice(4, 8))]
    for h in halves:
        strat.forward_backward([h], targets)
    for name, g in _grads(strat).items():
        torch.testing.assert_close(g, big[name], rtol=1e-5, atol=1e-7)
    # Guard: normalising each micro-batch by its own count would NOT match.
    strat.zero_grad()
    for mb in batch.split(2):
        strat.forward_backward([mb], mb.num_targets())
    wrong = _grads(strat)
    assert not torch.allclose(wrong["tok_embeddings.weight"], big["tok_embeddings.weight"])


def test_loss_equals_mean_token_cross_entropy() -> None:
    strat, ld = _setup()
    batch, _ = ld.global_batch(0)
    loss = strat.forward_backward([batch], batch.num_targets())
    assert strat.model is not None
    with torch.no_grad():
        logits = strat.model(batch.input_ids, batch.position_ids, batch.doc_ids)
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                batch.labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    assert abs(float(loss) - math.log(8192)) < 0.5  # near-uniform predictions at init


def test_clipping_reports_preclip_norm_and_clips_to_one() -> None:
    strat, ld = _setup()
    batch, _ = ld.global_batch(0)
    strat.forward_backward([batch], batch.num_targets())
    assert strat.model is not None
    for p in strat.model.parameters():
        p.grad.mul_(100.0)
    norm = strat.clip_grad_norm(1.0)
    after = torch.sqrt(sum(p.grad.pow(2).sum() for p in strat.model.parameters()))
    assert norm > 1.0
    assert abs(float(after) - 1.0) < 1e-4


def _lr(kind: str, step: int, **kw: float) -> float:
    return LRSchedule(lr=1.0, max_steps=10, warmup_steps=2, schedule=kind, **kw).at(step)


def test_lr_schedules_exact_values() -> None:
    # Warmup (Goyal et al. 2017): lr * (s + 1) / W for the first W updates.
    for kind in ("cosine", "wsd", "constant"):
        assert _lr(kind, 0) == 0.5 and _lr(kind, 1) == 1.0
    # Cosine to min = max / 10 at the last update (Loshchilov & Hutter 2017).
    assert _lr("cosine", 2) == 1.0
    assert _lr("cosine", 9) == pytest.approx(0.1, abs=1e-15)
    mid = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (5 - 2) / (9 - 2)))
    assert _lr("cosine", 5) == pytest.approx(mid, rel=1e-15)
    # WSD: stable at max, then the last round(0.2 * 10) = 2 updates decay linearly to min.
    assert [_lr("wsd", s) for s in range(2, 8)] == [1.0] * 6
    assert _lr("wsd", 8) == pytest.approx(1.0 - 0.9 * 1 / 2)
    assert _lr("wsd", 9) == pytest.approx(0.1)
    assert all(_lr("constant", s) == 1.0 for s in range(2, 10))
    assert _lr("cosine", 9, min_lr=0.0) == pytest.approx(0.0, abs=1e-15)


def test_precisions() -> None:
    assert autocast_dtype("bf16") is torch.bfloat16
    assert autocast_dtype("fp32") is None
    with pytest.raises(MeshplanError, match="train.precision=fp8"):
        autocast_dtype("fp8")


def test_bf16_autocast_step_on_cpu() -> None:
    plan = make_plan(train={"precision": "bf16"})
    strat = Strategy()
    strat.setup(build_model(MICRO, seed=1), plan)
    ds = PreparedDataset(prepare_default_corpus(8192, 4000, progress=False))
    ld = PackedLoader(ds, LoaderConfig(seq_len=MICRO.seq_len, rows=4, seed=2,
                                       mixture={"code": 1.0}))
    batch, _ = ld.global_batch(0)
    loss = strat.forward_backward([batch], batch.num_targets())
    assert torch.isfinite(loss)
    assert strat.model is not None
    assert all(p.dtype == torch.float32 for p in strat.model.parameters())  # fp32 master
    assert abs(float(loss) - math.log(8192)) < 0.5


@pytest.mark.parametrize("mode", ["selective", "full"])
def test_recompute_gives_the_same_gradients(mode: str) -> None:
    strat, ld = _setup()
    batch, _ = ld.global_batch(0)
    strat.forward_backward([batch], batch.num_targets())
    ref = _grads(strat)
    strat.zero_grad()
    assert strat.model is not None
    strat.model.set_recompute(mode)
    strat.forward_backward([batch], batch.num_targets())
    for name, g in _grads(strat).items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7)
