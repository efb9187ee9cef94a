"""Size: a compute budget -> Chinchilla and inference-optimal answers, iso-FLOP curves with
the optimum marked, and where well-known models sit on the tokens-per-parameter axis."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import streamlit as st

from app import charts
from app.common import fmt_count, user_errors
from costmodels import scaling
from costmodels.errors import MeshplanError
from costmodels.hardware import ACCELERATORS
from costmodels.presets import PRESETS
from planner import sizing
from planner.schedule_advice import parse_count

# Well-known models: parameters from the presets (exact counts of the published
# architectures) and training tokens from each paper.
KNOWN_MODELS: tuple[tuple[str, str, float, str], ...] = (
    ("LLaMA-3 8B", "llama3-8b", 15e12, "Dubey et al. 2024 §3.1: 15T tokens"),
    ("LLaMA-3 70B", "llama3-70b", 15e12, "Dubey et al. 2024 §3.1: 15T tokens"),
    ("LLaMA-3 405B", "llama3-405b", 15.6e12, "Dubey et al. 2024 §3.1: 15.6T tokens"),
    ("Chinchilla 70B", "chinchilla-70b", 1.4e12, "Hoffmann et al. 2022 Table 4: 1.4T tokens"),
    ("GPT-3 175B", "gpt3-175b", 300e9, "Brown et al. 2020 Table 2.1: 300B tokens"),
)


@st.cache_data(max_entries=64, show_spinner=False)
def size_for(flops: float, fit_key: str, inference_tokens: float) -> dict[str, object]:
    fit = scaling.get_fit(fit_key)
    out: dict[str, object] = {
        "answers": sizing.budget_answers(flops, [fit], inference_tokens),
        "curves": scaling.isoflop_curves(flops * np.array([0.01, 0.1, 1.0, 10.0, 100.0]), fit),
    }
    rows = []
    for label, preset, tokens, src in KNOWN_MODELS:
        n = float(PRESETS[preset].param_count())
        d = scaling.distance_from_optimum(n, tokens, fit)
        rows.append({"model": label, "params": n, "tokens": tokens,
                     "tokens_per_param": tokens / n, "loss": d["loss"],
                     "compute overhead vs optimum": d["compute_overhead"], "source": src})
    out["models"] = pd.DataFrame(rows)
    return out


st.header("Size: model and tokens for a compute budget")
with user_errors():
    how = st.radio("Budget from", ["FLOPs", "cluster x days"], horizontal=True,
                   key="size_budget_mode")
    if how == "FLOPs":
        flops = parse_count(st.text_input("Training FLOPs", "3.8e25", key="size_flops"),
                            "Training FLOPs")
    else:
        c = st.columns(4)
        acc = c[0].selectbox("Accelerator", sorted(ACCELERATORS),
                             index=sorted(ACCELERATORS).index("h100-sxm"), key="size_acc")
        gpus = c[1].number_input("GPUs", 1, 1_000_000, 2048, key="size_gpus")
        days = c[2].number_input("Days", 0.1, 3650.0, 30.0, key="size_days")
        mfu = c[3].slider("MFU %", 1.0, 100.0, scaling.DEFAULT_MFU_PCT, key="size_mfu")
        budget = sizing.cluster_flops(sizing.ClusterBudget(int(gpus), float(days), acc, "bf16",
                                                           float(mfu)))
        flops = budget["flops"]
        if budget["peak_tflops"] != ACCELERATORS[acc].peak_tflops("bf16"):
            st.caption(f"{acc}: peak derated to {budget['peak_tflops']:.0f} TFLOP/s (its power limit)")
    fit_key = st.selectbox("Loss fit", list(scaling.FITS), index=list(scaling.FITS).index(
        "besiroglu"), key="size_fit", help="; ".join(f.source for f in scaling.FITS.values()))
    inf_text = st.text_input("Lifetime inference tokens (empty: none)", "", key="size_inf")
    inference_tokens = parse_count(inf_text, "inference tokens") if inf_text.strip() else 0.0
    if not math.isfinite(flops) or flops < 1e15:
        raise MeshplanError(f"Training FLOPs={flops:.3g}: too small to size a model; "
                            "use at least 1e15")
    out = size_for(float(flops), fit_key, float(inference_tokens))

ans = out["answers"]
rule, opt = ans["rule_of_20"], ans["parametric"]
st.caption(f"Budget: {flops:.3e} FLOPs (C = 6ND, Kaplan et al. 2020 §2.1)")
def _row(answer: str, r: dict[str, object], loss: bool = True) -> dict[str, str]:
    return {"answer": answer, "params": fmt_count(r["params"]), "tokens": fmt_count(r["tokens"]),
            "tokens/param": f"{r['tokens_per_param']:.1f}",
            "loss": f"{r['loss']:.4f}" if loss else "", "source": str(r["source"])}


answers = [_row("20 tokens / parameter", rule, loss=False),
           _row(f"compute-optimal ({fit_key})", opt)]
inf = ans.get("inference_optimal")
if inf:
    answers.append(_row(f"inference-optimal ({fmt_count(inference_tokens)} inference tokens)", inf))
st.table(pd.DataFrame(answers).set_index("answer"))
if inf:
    st.info(f"Training the smaller inference-optimal model saves {inf['savings_pct']:.1f}%"
            " of lifetime FLOPs against the Chinchilla-optimal model of the same loss.")
with st.expander("The numbers, as `meshplan size --json` gives them"):
    st.json({"budget": budget, **ans} if how != "FLOPs" else ans, expanded=False)

c1, c2 = st.columns(2)
with c1:
    st.plotly_chart(charts.isoflop(out["curves"], highlight=2), key="size_isoflop_chart")
with c2:
    st.plotly_chart(charts.tokens_per_param(out["models"], opt["tokens_per_param"]),
                    key="size_tpp_chart")
models = out["models"].copy()
models["params"] = models["params"].map(fmt_count)
models["tokens"] = models["tokens"].map(fmt_count)
models["tokens_per_param"] = models["tokens_per_param"].map(lambda x: f"{x:.0f}")
models["loss"] = models["loss"].map(lambda x: f"{x:.4f}")
models["compute overhead vs optimum"] = models["compute overhead vs optimum"].map(
    lambda x: f"{x:.2f}x")
st.table(models.set_index("model"))
