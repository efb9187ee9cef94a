"""Scaling-law sizing: how big a model and how many tokens for a compute budget.

Pure functions (numpy / scipy only). Conventions:

* `C` training FLOPs, `N` parameters, `D` training tokens, `C = 6 N D` (Kaplan et al. 2020
  §2.1, Hoffmann et al. 2022 §3: forward 2ND + backward 4ND).
* Parametric loss `L(N, D) = E + A / N^alpha + B / D^beta` (Hoffmann et al. 2022, eq. 2).
* Inference costs `2 N` FLOPs per token (forward only; Sardana & Frankle 2023, eq. 1).

Coefficient sets:

* `hoffmann`: Hoffmann et al. 2022, Approach 3, eq. 10 as printed in the paper body:
  E = 1.69, A = 406.4, B = 410.7, alpha = 0.34, beta = 0.28.
* `besiroglu`: Besiroglu et al. 2024 ("Chinchilla Scaling: A replication attempt"),
  Table 1 re-fit of Approach 3 on data reconstructed from Hoffmann's Figure 4:
  E = 1.8172, A = 482.01, B = 2085.43, alpha = 0.3478, beta = 0.3658. Its compute-optimal
  ratio is ~20 tokens per parameter, in line with Hoffmann's Approaches 1 and 2.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq, minimize_scalar

from costmodels.errors import MeshplanError

SECONDS_PER_DAY = 86_400.0
DEFAULT_MFU_PCT = 40.0  # documented default when the cost model offers none (Llama 3: 38-43%)
TOKENS_PER_PARAM_RULE = 20.0  # Hoffmann et al. 2022, Table 3 (~20 tokens per parameter)
INFERENCE_FLOPS_PER_PARAM_TOKEN = 2.0  # Sardana & Frankle 2023 eq. 1: 2N per inference token


@dataclass(frozen=True)
class LossFit:
    """Coefficients of L(N, D) = E + A/N^alpha + B/D^beta and where they come from."""

    key: str
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    source: str

    @property
    def a(self) -> float:
        """N_opt ∝ C^a with a = beta / (alpha + beta) (Hoffmann et al. 2022, eq. 4)."""
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        """D_opt ∝ C^b with b = alpha / (alpha + beta) (Hoffmann et al. 2022, eq. 4)."""
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        """G = (alpha A / (beta B))^(1/(alpha+beta)) (Hoffmann et al. 2022, eq. 4)."""
        return (self.alpha * self.A / (self.beta * self.B)) ** (1.0 / (self.alpha + self.beta))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


HOFFMANN_2022 = LossFit(
    "hoffmann", E=1.69, A=406.4, B=410.7, alpha=0.34, beta=0.28,
    source="Hoffmann et al. 2022, Approach 3, eq. (10)",
)
BESIROGLU_2024 = LossFit(
    "besiroglu", E=1.8172, A=482.01, B=2085.43, alpha=0.3478, beta=0.3658,
    source="Besiroglu et al. 2024, Table 1 (re-fit of Hoffmann's Approach 3)",
)
FITS: dict[str, LossFit] = {f.key: f for f in (HOFFMANN_2022, BESIROGLU_2024)}

# LLaMA-3 8B: "8B" parameters (nominal) pre-trained on ~15T tokens (Dubey et al. 2024, §1/§3.1).
LLAMA3_8B_PARAMS = 8.0e9
LLAMA3_8B_TOKENS = 15.0e12


def get_fit(key: str) -> LossFit:
    k = key.strip().lower()
    if k not in FITS:
        raise MeshplanError(f"--fit {key!r}: unknown loss fit; choose one of {', '.join(FITS)}")
    return FITS[k]


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise MeshplanError(f"{name}={value!r}: must be a positive finite number")
    return float(value)


# --------------------------------------------------------------------------- budget


def training_flops(params: float, tokens: float) -> float:
    """C = 6 N D (Kaplan et al. 2020 §2.1; Hoffmann et al. 2022 §3)."""
    return 6.0 * params * tokens


def flops_from_cluster(gpus: int, days: float, peak_tflops: float, mfu_pct: float) -> float:
    """C = GPUs x seconds x peak FLOP/s x MFU (MFU as defined by Chowdhery et al. 2022, App. B)."""
    _positive("--gpus", gpus)
    _positive("--days", days)
    _positive("peak TFLOP/s", peak_tflops)
    if not 0 < mfu_pct <= 100:
        raise MeshplanError(f"--mfu {mfu_pct}: must be a percentage in (0, 100]")
    return float(gpus) * days * SECONDS_PER_DAY * peak_tflops * 1e12 * (mfu_pct / 100.0)


# --------------------------------------------------------------------------- compute-optimal


@dataclass(frozen=True)
class Sizing:
    params: float
    tokens: float
    flops: float
    loss: float | None = None
    method: str = ""
    source: str = ""

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tokens_per_param"] = self.tokens_per_param
        return d


def rule_of_20(flops: float) -> Sizing:
    """D = 20 N and C = 6 N D  =>  N = sqrt(C / 120) (Hoffmann et al. 2022, Table 3 ratio)."""
    c = _positive("compute FLOPs", flops)
    n = math.sqrt(c / (6.0 * TOKENS_PER_PARAM_RULE))
    return Sizing(
        params=n, tokens=TOKENS_PER_PARAM_RULE * n, flops=c, method="rule_of_20",
        source="Hoffmann et al. 2022: ~20 tokens per parameter (Table 3); C = 6ND",
    )


def loss(params: Any, tokens: Any, fit: LossFit = BESIROGLU_2024) -> Any:
    """L(N, D) = E + A/N^alpha + B/D^beta (Hoffmann et al. 2022, eq. 2); arrays broadcast."""
    n = np.asarray(params, dtype=np.float64)
    d = np.asarray(tokens, dtype=np.float64)
    out = fit.E + fit.A / n**fit.alpha + fit.B / d**fit.beta
    return float(out) if out.ndim == 0 else out


def compute_optimal(flops: float, fit: LossFit = BESIROGLU_2024) -> Sizing:
    """argmin L(N, D) s.t. 6ND = C: N = G (C/6)^a, D = G^-1 (C/6)^b (Hoffmann et al. 2022, eq. 4)."""
    c = _positive("compute FLOPs", flops)
    n = fit.G * (c / 6.0) ** fit.a
    d = (c / 6.0) ** fit.b / fit.G
    return Sizing(
        params=n, tokens=d, flops=c, loss=loss(n, d, fit), method=f"parametric:{fit.key}",
        source=fit.source,
    )


def compute_for_loss(target_loss: float, fit: LossFit = BESIROGLU_2024) -> float:
    """Smallest C whose compute-optimal model reaches `target_loss` (inverts eq. 4 by root finding)."""
    if target_loss <= fit.E:
        raise MeshplanError(
            f"target loss {target_loss:.4f} is at or below the fit's irreducible loss E={fit.E}; "
            "no finite compute reaches it"
        )

    def gap(log_c: float) -> float:
        return compute_optimal(math.exp(log_c), fit).loss - target_loss  # type: ignore[operator]

    lo, hi = math.log(1e10), math.log(1e40)
    if gap(lo) < 0:
        return math.exp(lo)
    if gap(hi) > 0:
        raise MeshplanError(f"target loss {target_loss:.4f} needs more than 1e40 FLOPs")
    return math.exp(brentq(gap, lo, hi, xtol=1e-10))


# --------------------------------------------------------------------------- inference-optimal


@dataclass(frozen=True)
class InferenceOptimal:
    params: float
    tokens: float
    loss: float
    inference_tokens: float
    train_flops: float
    inference_flops: float
    chinchilla_params: float
    chinchilla_tokens: float
    chinchilla_total_flops: float
    fit: str
    source: str

    @property
    def total_flops(self) -> float:
        return self.train_flops + self.inference_flops

    @property
    def tokens_per_param(self) -> float:
        return self.tokens / self.params

    @property
    def savings_pct(self) -> float:
        """Lifetime FLOPs saved against the Chinchilla-optimal model of the same loss."""
        return 100.0 * (1.0 - self.total_flops / self.chinchilla_total_flops)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            total_flops=self.total_flops, tokens_per_param=self.tokens_per_param,
            savings_pct=self.savings_pct,
        )
        return d


def tokens_for_loss(params: float, target_loss: float, fit: LossFit) -> float:
    """D such that L(N, D) = target (solve eq. 2 for D); inf when N alone cannot reach it."""
    room = target_loss - fit.E - fit.A / params**fit.alpha
    return math.inf if room <= 0 else (fit.B / room) ** (1.0 / fit.beta)


def inference_optimal(
    target_loss: float, inference_tokens: float, fit: LossFit = BESIROGLU_2024
) -> InferenceOptimal:
    """argmin_N 6 N D(N) + 2 N D_inf s.t. L(N, D(N)) = target (Sardana & Frankle 2023, eq. 3).

    Solved in log N with scipy's bounded scalar minimiser: the smallest admissible N is
    where A/N^alpha uses up all the loss room above E (D -> inf).
    """
    d_inf = float(inference_tokens)
    if not (math.isfinite(d_inf) and d_inf >= 0):
        raise MeshplanError(f"--inference-tokens {inference_tokens!r}: must be a number >= 0")
    if target_loss <= fit.E:
        raise MeshplanError(
            f"target loss {target_loss:.4f} is at or below the fit's irreducible loss E={fit.E}"
        )
    n_min = (fit.A / (target_loss - fit.E)) ** (1.0 / fit.alpha)

    def total(log_n: float) -> float:
        n = math.exp(log_n)
        d = tokens_for_loss(n, target_loss, fit)
        if not math.isfinite(d):
            return math.inf
        return math.log(6.0 * n * d + INFERENCE_FLOPS_PER_PARAM_TOKEN * n * d_inf)

    lo = math.log(n_min) + 1e-9
    hi = lo + math.log(1e6)  # the optimum lies within 10^6 x the smallest admissible model
    res = minimize_scalar(total, bounds=(lo, hi), method="bounded", options={"xatol": 1e-9})
    n = math.exp(float(res.x))
    d = tokens_for_loss(n, target_loss, fit)
    c_chin = compute_for_loss(target_loss, fit)
    chin = compute_optimal(c_chin, fit)
    return InferenceOptimal(
        params=n, tokens=d, loss=target_loss, inference_tokens=d_inf,
        train_flops=training_flops(n, d),
        inference_flops=INFERENCE_FLOPS_PER_PARAM_TOKEN * n * d_inf,
        chinchilla_params=chin.params, chinchilla_tokens=chin.tokens,
        chinchilla_total_flops=chin.flops + INFERENCE_FLOPS_PER_PARAM_TOKEN * chin.params * d_inf,
        fit=fit.key,
        source=f"Sardana & Frankle 2023 (train + 2N x inference tokens at equal loss); {fit.source}",
    )


# --------------------------------------------------------------------------- views


def tokens_per_param(params: float, tokens: float) -> float:
    return _positive("tokens", tokens) / _positive("params", params)


def distance_from_optimum(
    params: float, tokens: float, fit: LossFit = BESIROGLU_2024, inference_tokens: float = 0.0
) -> dict[str, Any]:
    """How far a trained model (N, D) sits from the optima at its own loss.

    `compute_overhead`: its training FLOPs over the least FLOPs reaching the same loss
    (compute-optimal); with `inference_tokens`, `lifetime_overhead` compares train +
    inference FLOPs with the inference-optimal model of the same loss.
    """
    c = training_flops(params, tokens)
    l_model = loss(params, tokens, fit)
    c_min = compute_for_loss(l_model, fit)
    chin_same_loss = compute_optimal(c_min, fit)
    chin_same_compute = compute_optimal(c, fit)
    out: dict[str, Any] = {
        "params": params,
        "tokens": tokens,
        "tokens_per_param": tokens / params,
        "flops": c,
        "loss": l_model,
        "fit": fit.key,
        "rule_of_20_tokens_per_param": TOKENS_PER_PARAM_RULE,
        "ratio_vs_rule_of_20": (tokens / params) / TOKENS_PER_PARAM_RULE,
        "compute_optimal_tokens_per_param_at_same_flops": chin_same_compute.tokens_per_param,
        "compute_optimal_params_at_same_flops": chin_same_compute.params,
        "compute_optimal_loss_at_same_flops": chin_same_compute.loss,
        "compute_optimal_params_at_same_loss": chin_same_loss.params,
        "compute_overhead": c / c_min,
    }
    if inference_tokens > 0:
        inf = inference_optimal(l_model, inference_tokens, fit)
        lifetime = c + INFERENCE_FLOPS_PER_PARAM_TOKEN * params * inference_tokens
        out.update(
            inference_tokens=inference_tokens,
            inference_optimal_params=inf.params,
            inference_optimal_tokens_per_param=inf.tokens_per_param,
            lifetime_overhead=lifetime / inf.total_flops,
        )
    return out


def isoflop_curves(
    budgets: Any, fit: LossFit = BESIROGLU_2024, points: int = 64, span: float = 100.0
) -> dict[str, np.ndarray]:
    """IsoFLOP profiles (Hoffmann et al. 2022, Fig. 3 / Approach 2): loss vs N at fixed C.

    For each budget, `points` model sizes log-spaced over [N_opt/span, N_opt*span] with
    D = C / (6N). Returns 2-D arrays (budgets x points) plus the optimum of each row.
    """
    c = np.atleast_1d(np.asarray(budgets, dtype=np.float64))
    if c.size == 0 or np.any(~np.isfinite(c)) or np.any(c <= 0):
        raise MeshplanError("isoflop budgets: need one or more positive finite FLOP counts")
    n_opt = fit.G * (c / 6.0) ** fit.a  # Hoffmann et al. 2022, eq. 4
    grid = np.logspace(-math.log10(span), math.log10(span), points)
    n = n_opt[:, None] * grid[None, :]
    d = c[:, None] / (6.0 * n)  # C = 6ND
    l_grid = fit.E + fit.A / n**fit.alpha + fit.B / d**fit.beta  # eq. 2
    d_opt = c / (6.0 * n_opt)
    return {
        "flops": c,
        "params": n,
        "tokens": d,
        "loss": l_grid,
        "opt_params": n_opt,
        "opt_tokens": d_opt,
        "opt_loss": fit.E + fit.A / n_opt**fit.alpha + fit.B / d_opt**fit.beta,
    }
