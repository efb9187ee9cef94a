"""How sure a prediction is: intervals from cross-validated residuals.

`benchmarks/fidelity.py --refit` stores, in the profile, quantiles of log(measured /
predicted) from the leave-one-source-out predictions of the published runs, per model-size
regime (each row predicted by a fit that never saw its source), and of the peak-memory
residuals. A prediction's interval is [pred x e^q_lo, pred x e^q_hi]: the band that held the
middle 80% of the held-out errors of runs like it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

QUANTILES = (0.1, 0.9)  # an 80% interval
MIN_ROWS = 10  # a regime with fewer held-out rows uses the pooled residuals
# Model-size regimes (parameters, billions): where the residuals differ most.
SIZE_EDGES = (1.0, 10.0, 100.0)
SIZE_NAMES = ("lt1b", "1to10b", "10to100b", "gt100b")


def size_regime(params: np.ndarray | float) -> np.ndarray:
    """Regime name per model size in parameters."""
    idx = np.searchsorted(np.asarray(SIZE_EDGES) * 1e9, np.asarray(params, dtype=float), side="right")
    return np.asarray(SIZE_NAMES)[idx]


def residual_quantiles(log_ratio: np.ndarray, params: np.ndarray) -> dict[str, list[float]]:
    """{regime: [q_lo, q_hi]} of log(measured / predicted), plus "all"."""
    log_ratio = np.asarray(log_ratio, dtype=float)
    out = {"all": [float(np.quantile(log_ratio, q)) for q in QUANTILES]}
    reg = size_regime(params)
    for name in SIZE_NAMES:
        sel = log_ratio[reg == name]
        if len(sel) >= MIN_ROWS:
            out[name] = [float(np.quantile(sel, q)) for q in QUANTILES]
    return out


def interval(pred: np.ndarray, quantiles: Mapping[str, list[float]] | None,
             params: np.ndarray | float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) bounds on each prediction; a zero-width band when the profile carries no
    residuals."""
    pred = np.asarray(pred, dtype=float)
    if not quantiles:
        return pred.copy(), pred.copy()
    pooled = quantiles.get("all", [0.0, 0.0])
    if params is None:
        lo, hi = np.full(pred.shape, pooled[0]), np.full(pred.shape, pooled[1])
    else:
        # One lookup per regime present (the planner passes one model size for all candidates).
        reg = np.broadcast_to(size_regime(params), pred.shape)
        lo, hi = np.empty(pred.shape), np.empty(pred.shape)
        for r in np.unique(reg):
            q = quantiles.get(str(r), pooled)
            lo[reg == r], hi[reg == r] = q[0], q[1]
    return pred * np.exp(np.minimum(lo, 0.0)), pred * np.exp(np.maximum(hi, 0.0))
