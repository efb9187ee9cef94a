"""Sizing a run from a compute budget: the budget a cluster buys, and the model size and
token count each answer gives for it. Plain functions over dataclasses; `meshplan size` and
the dashboard's Size page both call these, so the two cannot disagree."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from costmodels import scaling
from costmodels.hardware import get_accelerator

MFU_DEFAULT_SOURCE = "documented default (Llama 3 405B reports 38-43% BF16 MFU)"


@dataclass(frozen=True)
class ClusterBudget:
    """A training budget given as a cluster and a wall-clock time."""

    gpus: int
    days: float
    gpu: str
    precision: str = "bf16"
    mfu_pct: float | None = None  # None: scaling.DEFAULT_MFU_PCT


def cluster_flops(b: ClusterBudget) -> dict[str, Any]:
    """The FLOPs `b` buys: GPUs x seconds x peak x MFU, the peak derated for parts sold at a
    lower power limit (`Accelerator.power_derate`, e.g. the 500 W H100)."""
    acc = get_accelerator(b.gpu)
    mfu = scaling.DEFAULT_MFU_PCT if b.mfu_pct is None else float(b.mfu_pct)
    peak = acc.peak_tflops(b.precision) * acc.power_derate
    return {
        "flops": scaling.flops_from_cluster(b.gpus, b.days, peak, mfu), "from": "cluster",
        "gpus": b.gpus, "days": b.days, "gpu": acc.key, "precision": b.precision,
        "peak_tflops": peak, "mfu_pct": mfu,
        "mfu_source": "--mfu" if b.mfu_pct is not None else MFU_DEFAULT_SOURCE,
    }


def fits_for(choice: str) -> list[scaling.LossFit]:
    """The loss fits a `--fit` choice names; the first is the primary answer."""
    if choice == "both":
        return [scaling.BESIROGLU_2024, scaling.HOFFMANN_2022]
    return [scaling.get_fit(choice)]


def _parametric_entry(s: scaling.Sizing, fit: scaling.LossFit) -> dict[str, Any]:
    return {
        "params": s.params, "tokens": s.tokens, "flops": s.flops, "loss": s.loss,
        "tokens_per_param": s.tokens_per_param, "fit": fit.key, "source": fit.source,
        "coefficients": {"E": fit.E, "A": fit.A, "B": fit.B, "alpha": fit.alpha, "beta": fit.beta},
        "exponents": {"a": fit.a, "b": fit.b},
    }


def budget_answers(flops: float, fits: list[scaling.LossFit],
                   inference_tokens: float = 0.0) -> dict[str, Any]:
    """The 20-tokens-per-parameter rule, the parametric optimum under each fit (the first
    is `parametric`) and, with lifetime inference tokens, the inference-optimal size."""
    r20 = scaling.rule_of_20(flops)
    out: dict[str, Any] = {
        "rule_of_20": {
            "params": r20.params, "tokens": r20.tokens, "flops": r20.flops,
            "tokens_per_param": r20.tokens_per_param, "formula": "N = sqrt(C/120), D = 20N",
            "source": r20.source,
        },
    }
    per_fit = {f.key: _parametric_entry(scaling.compute_optimal(flops, f), f) for f in fits}
    out["parametric"] = per_fit[fits[0].key]
    out["fits"] = per_fit
    if inference_tokens > 0:
        per = {f.key: scaling.inference_optimal(per_fit[f.key]["loss"], inference_tokens, f).to_dict()
               for f in fits}
        out["inference_optimal"] = per[fits[0].key]
        out["inference_optimal_fits"] = per
    return out
