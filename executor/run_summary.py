"""summary.json of a run: steps, losses, throughput and memory measured, beside what the plan
predicted; a continual run's forgetting and adaptation; a pipelined run's measured idle."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from costmodels.errors import MeshplanError

if TYPE_CHECKING:
    from executor.train import Trainer


def _block_forwards(t: Trainer) -> dict[str, int]:
    """Transformer blocks and attention cores this rank executed, recomputations included
    (the measurement that shows recompute ran: full recompute runs each block twice)."""
    calls = [part.block_calls() for part in t.strategy.model_parts() if hasattr(part, "block_calls")]
    return {"blocks": sum(c[0] for c in calls), "attention_cores": sum(c[1] for c in calls)}

def run_summary(t: Trainer, interrupted: bool) -> dict[str, Any]:
    """summary.json: what the run did, measured, beside what the plan predicted."""
    records = t.metrics.read_all() if t.is_main else []
    good = [r for r in records if not r.get("skipped")]
    times = [r["step_time_s"] for r in good[1:]] or [r["step_time_s"] for r in good]
    tokens_per_step = t.loader_cfg.rows * t.loader_cfg.seq_len
    mean_t = float(np.mean(times)) if times else None
    predicted = dict(t.plan.predicted)
    pred_t = predicted.get("step_time_s")
    out: dict[str, Any] = {
        "steps": t.state.step,
        "max_steps": t.max_steps,
        "finished": t.state.step >= t.max_steps,
        "interrupted": interrupted,
        "objective": t.plan.train.objective,
        "precision": t.plan.train.precision,
        "params": t.n_params,
        "tokens": t.state.tokens,
        "first_loss": good[0]["loss"] if good else None,
        "final_loss": good[-1]["loss"] if good else None,
        "min_loss": min(r["loss"] for r in good) if good else None,
        "final_eval_loss": next((r["eval_loss"] for r in reversed(records)
                                 if "eval_loss" in r), None),
        "skipped_steps": sum(1 for r in records if r.get("skipped")),
        "rollbacks": t.state.rollbacks,
        "blacklisted_samples": len(t.state.blacklist),
        "mean_step_time_s": mean_t,
        "median_step_time_s": float(np.median(times)) if times else None,
        "tokens_per_sec": tokens_per_step / mean_t if mean_t else None,
        "peak_memory_bytes": t.strategy.peak_memory_bytes(),
        "world_size": t.strategy.world_size,
        "device": str(getattr(t.strategy, "device", "cpu")),
        "cpu_threads": torch.get_num_threads(),
        "resumed_from": t.resumed_from,
        "predicted": predicted,
        "applied": t.strategy.applied,
        "block_forwards": _block_forwards(t),
    }
    domain_final = {
        k.removeprefix("eval_loss_"): v for r in records for k, v in r.items()
        if k.startswith("eval_loss_")
    }
    if domain_final:
        out["final_eval_losses"] = domain_final
    if t.init_source is not None:
        out["continual"] = _continual_summary(t, domain_final)
    pipeline = _pipeline_summary(t, good)
    if pipeline:
        out["pipeline"] = pipeline
    if isinstance(pred_t, int | float) and pred_t > 0 and mean_t:
        out["measured_over_predicted_step_time"] = mean_t / float(pred_t)
    return out


def _continual_summary(t: Trainer, domain_final: dict[str, float]) -> dict[str, Any]:
    """Where a continual run started from, its mixture and schedule, and what each domain's
    held-out loss did: forgetting (old domains) / adaptation (new), final minus initial."""
    assert t.init_source is not None
    cont = t.plan.continual
    return {
        "init_from": str(t.init_source.path), "kind": t.init_source.kind,
        "source_step": t.init_source.step,
        "branch_step": cont.branch_step, "decay_steps": cont.decay_steps,
        "mixture": t.mixture, "old_mixture": t.old_mixture,
        "replay_fraction": cont.replay_fraction, "lr_fraction": cont.lr_fraction,
        "peak_lr": t.schedule.lr, "ewc_lambda": cont.ewc_lambda,
        "init_eval_losses": t.init_eval,
        # forgetting (old domains) / adaptation (new): final minus initial loss
        "eval_loss_change": {d: domain_final[d] - v for d, v in t.init_eval.items()
                             if d in domain_final},
    }


def _pipeline_summary(t: Trainer, good: list[dict[str, Any]]) -> dict[str, Any]:
    """A pipelined run's measured idle / step (mean over steps after the first two) beside
    the cost model's; {} for a run without a pipeline."""
    predict_pipe = getattr(t.strategy, "predicted_pipeline", None)
    shares = [r["pp_bubble_share"] for r in good[2:] if "pp_bubble_share" in r]
    if predict_pipe is None or not shares:
        return {}
    out: dict[str, Any] = {
        "schedule": t.strategy.applied.get("schedule"),
        "micro_batches": t.strategy.applied.get("microbatches_per_step"),
        "measured_bubble_share": float(np.mean(shares)),
        "measured_idle_s": float(np.mean([r["pp_idle_s"] for r in good[2:] if "pp_idle_s" in r])),
    }
    try:
        out.update(predict_pipe())
    except MeshplanError as exc:  # e.g. an unreadable machine profile: keep the run's record
        out["predicted_error"] = str(exc)
    return out
