"""Model-level workers for the multi-process tests: plans, synthetic packed batches, a
one-process reference loop and the same loop through a distributed strategy."""

from __future__ import annotations

from typing import Any

import torch

from costmodels.presets import PRESETS
from executor.data.batch import IGNORE_INDEX, Batch
from planner.planfile import plan_from_dict

SEQ = 32
ROWS = 8


def make_plan(layout: dict[str, Any], model: str = "tiny-mha", seq: int = SEQ,
              train: dict[str, Any] | None = None, layers: int | None = None) -> Any:
    spec = PRESETS[model].with_(seq_len=seq)
    if layers:
        spec = spec.with_(layers=layers)
    lay = {"micro_batch_size": 2, "global_batch_size": ROWS, **layout}
    world = lay.get("tp", 1) * lay.get("pp", 1) * lay.get("dp", 1) * lay.get("cp", 1)
    return plan_from_dict({
        "model": spec.to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": world},
        "layout": lay,
        "train": {"precision": "fp32", "lr": 3e-3, "warmup_steps": 0, "grad_clip": 1.0,
                  **(train or {})},
    })


def global_batch(step: int, vocab: int, rows: int = ROWS, seq: int = SEQ) -> Batch:
    """Deterministic packed rows: 2-3 documents per row, a few ignored labels."""
    g = torch.Generator().manual_seed(1000 + step)
    # Counting sequences (next token = this + 1, modulo a small alphabet) from random
    # starts: learnable, so the loss falls and the comparison is not between constants.
    starts = torch.randint(0, vocab, (rows, 1), generator=g)
    ids = (starts + torch.arange(seq)) % 97 + starts % (vocab - 97)
    doc = torch.zeros(rows, seq, dtype=torch.long)
    pos = torch.zeros(rows, seq, dtype=torch.long)
    for r in range(rows):
        cut1 = int(torch.randint(4, seq // 2, (1,), generator=g))
        cut2 = int(torch.randint(seq // 2 + 2, seq - 2, (1,), generator=g))
        doc[r, cut1:] = 1
        doc[r, cut2:] = 2
        for d, start in ((0, 0), (1, cut1), (2, cut2)):
            n = int((doc[r] == d).sum())
            pos[r, start:start + n] = torch.arange(n)
    labels = torch.roll(ids, -1, 1)
    labels[:, -1] = IGNORE_INDEX
    labels[doc != torch.roll(doc, -1, 1)] = IGNORE_INDEX
    return Batch(input_ids=ids, labels=labels, position_ids=pos, doc_ids=doc,
                 sample_ids=torch.arange(step * rows, (step + 1) * rows))


def build(plan: Any) -> torch.nn.Module:
    from executor.model import build_model

    return build_model(plan.model_spec(), objective="clm", seed=plan.train.seed)


def reference_losses(plan: Any, steps: int) -> list[float]:
    """The one-process executor's strategy on the same plan and batches."""
    from executor.strategy import Strategy

    torch.manual_seed(0)
    strat = Strategy()
    strat.setup(build(plan), plan)
    micro = plan.layout.micro_batch_size
    out = []
    for s in range(steps):
        gb = global_batch(s, plan.model_spec().vocab)
        loss = strat.forward_backward(gb.split(micro), gb.num_targets())
        strat.clip_grad_norm(plan.train.grad_clip)
        strat.optimizer_step()
        strat.zero_grad()
        out.append(float(loss))
    return out


def strategy_losses(plan: Any, steps: int, comm_from_step: int = 2) -> dict[str, Any]:
    """The same loop through the plan's distributed strategy, plus mean comm bytes/step."""
    from executor.parallel.factory import make_strategy

    torch.manual_seed(0)
    strat = make_strategy(plan)
    strat.setup(build(plan), plan)
    local_micro = plan.layout.micro_batch_size
    losses, comm, waits = [], [], []
    for s in range(steps):
        gb = global_batch(s, plan.model_spec().vocab)
        local = strat.local_rows(gb)
        loss = strat.forward_backward(local.split(local_micro), gb.num_targets())
        strat.clip_grad_norm(plan.train.grad_clip)
        strat.optimizer_step()
        strat.zero_grad()
        losses.append(float(loss))
        if s >= comm_from_step:
            c = strat.comm_bytes_mean()
            waits.append({k: c.pop(k) for k in ("comm_wait_s", "pipeline_wait_s")})
            comm.append(c)
    mean = {k: sum(c[k] for c in comm) / len(comm) for k in comm[0]} if comm else {}
    wait = {k: sum(w[k] for w in waits) / len(waits) for k in waits[0]} if waits else {}
    return {"losses": losses, "comm": mean, "waits": wait, "name": strat.name}


def compare_worker(rank: int, world: int, layouts: list[dict[str, Any]], steps: int,
                   model: str = "tiny-mha", layers: int | None = None) -> list[dict[str, Any]]:
    """Each layout: its losses, the one-process losses (rank 0) and comm bytes vs predicted."""
    from costmodels.comm_volume import comm_volume

    out = []
    for lay in layouts:
        plan = make_plan(lay, model=model, layers=layers)
        res = strategy_losses(plan, steps)
        res["predicted"] = comm_volume(plan.model_spec(), plan.layout_spec()).by_kind()
        if rank == 0:
            res["reference"] = reference_losses(plan, steps)
        out.append(res)
    return out


def recompute_worker(rank: int, world: int, layouts: list[dict[str, Any]],
                     model: str = "tiny-mha") -> list[dict[str, Any]]:
    """One step of each layout: its `applied` record and the block / attention-core forwards
    rank 0 executed (recomputation re-runs them in the backward)."""
    from executor.parallel.factory import make_strategy

    out = []
    for lay in layouts:
        plan = make_plan(lay, model=model, layers=4)
        torch.manual_seed(0)
        strat = make_strategy(plan)
        strat.setup(build(plan), plan)
        gb = global_batch(0, plan.model_spec().vocab)
        local = strat.local_rows(gb)
        before = [p.block_calls() for p in strat.model_parts()]
        strat.forward_backward(local.split(plan.layout.micro_batch_size), gb.num_targets())
        after = [p.block_calls() for p in strat.model_parts()]
        calls = [sum(a[i] - b[i] for a, b in zip(after, before, strict=True)) for i in (0, 1)]
        out.append({"applied": strat.applied, "blocks": calls[0], "cores": calls[1],
                    "name": strat.name, "cls": type(strat).__name__})
        strat.zero_grad()
    return out


def state_bytes_worker(rank: int, world: int, layouts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """After one optimizer step: this rank's gradient and optimizer-state bytes (local
    shards of DTensors) and the model's parameter count."""
    from executor.parallel.factory import make_strategy
    from executor.parallel.tp import local_tensor

    out = []
    for lay in layouts:
        plan = make_plan(lay)
        torch.manual_seed(0)
        strat = make_strategy(plan)
        strat.setup(build(plan), plan)
        gb = global_batch(0, plan.model_spec().vocab)
        local = strat.local_rows(gb)
        strat.forward_backward(local.split(plan.layout.micro_batch_size), gb.num_targets())
        grad_bytes = sum(local_tensor(p.grad).numel() * 4 for part in strat.model_parts()
                         for p in part.parameters() if p.grad is not None)
        strat.optimizer_step()
        optim_bytes = sum(local_tensor(v).numel() * v.element_size()
                          for opt in strat.optimizers for st in opt.state.values()
                          for k, v in st.items() if k in ("exp_avg", "exp_avg_sq"))
        out.append({"grad_bytes": grad_bytes, "optim_bytes": optim_bytes,
                    "params": plan.model_spec().param_count(), "name": strat.name})
        strat.zero_grad()
    return out


def contract_worker(rank: int, world: int, layouts: list[dict[str, Any]], steps: int = 2) -> list[dict[str, Any]]:
    """Each layout the contract accepted: set up through `make_strategy` (which refuses, or
    raises when what it set up differs from the plan) and train `steps` steps on the
    layout's global batch. Collective accounting is off: the layout tests check it."""
    import math
    import os

    from executor.strategy import make_strategy

    os.environ["MESHPLAN_COMM_ACCOUNTING"] = "0"
    out = []
    for lay in layouts:
        plan = make_plan(lay, layers=4)
        torch.manual_seed(0)
        strat = make_strategy(plan)
        strat.setup(build(plan), plan)
        losses = []
        for s in range(steps):
            gb = global_batch(s, plan.model_spec().vocab, rows=plan.layout.global_batch_size)
            local = strat.local_rows(gb)
            loss = strat.forward_backward(local.split(plan.layout.micro_batch_size), gb.num_targets())
            strat.clip_grad_norm(plan.train.grad_clip)
            strat.optimizer_step()
            strat.zero_grad()
            losses.append(float(loss))
        out.append({"name": getattr(strat, "name", "single"), "finite": all(math.isfinite(x) for x in losses)})
    return out
