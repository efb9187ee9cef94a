"""Held-out evaluation of a run: the loss on fixed held-out rows, overall and per domain."""

from __future__ import annotations

from typing import TYPE_CHECKING

from executor.data.batch import Batch

if TYPE_CHECKING:
    from executor.train import Trainer


def eval_loss(t: Trainer) -> float | None:
    """Held-out loss on the same fixed rows every time (None: no held-out split)."""
    if t.eval_loader is None:
        return None
    ids, _ = t.eval_loader.next_ids(0, rows=t.plan.train.eval_batches
                                       * t.loader_cfg.rows)
    batch = t.eval_loader.batch_from_ids(ids)
    return t.strategy.eval_loss(_eval_micro_batches(t, batch), batch.num_targets())


def domain_eval_losses(t: Trainer) -> dict[str, float]:
    """Held-out loss of each evaluated domain on the same fixed rows every time."""
    out: dict[str, float] = {}
    rows = t.plan.train.eval_batches * t.loader_cfg.rows
    for name, loader in t.domain_eval_loaders.items():
        ids, _ = loader.next_ids(0, rows=rows)
        batch = loader.batch_from_ids(ids)
        out[name] = t.strategy.eval_loss(_eval_micro_batches(t, batch),
                                            batch.num_targets())
    return out


def _eval_micro_batches(t: Trainer, batch: Batch) -> list[Batch]:
    """This rank's share of an evaluation batch, in micro-batches."""
    per_rank = batch.rows // t.strategy.dp_size
    local = batch.select(slice(t.strategy.dp_rank * per_rank,
                               (t.strategy.dp_rank + 1) * per_rank))
    return local.split(t.plan.layout.micro_batch_size)

