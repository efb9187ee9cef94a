"""Data: a domain-mixture editor -> tokens and epochs per domain with repeat warnings; token
estimates from a raw size or an uploaded sample."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd
import streamlit as st

from app import charts
from app.common import fmt_count, user_errors
from costmodels.errors import MeshplanError
from planner import datamix
from planner.schedule_advice import parse_count

DEFAULT_MIXTURE = pd.DataFrame({
    "domain": ["web", "code", "wiki+books", "academic", "other"],
    "weight": [45.0, 17.0, 20.0, 8.0, 10.0],
    "available": ["", "200B", "", "", ""],
})

st.header("Data: mixture, epochs and token estimates")

st.subheader("Domain mixture")
with user_errors():
    c1, c2 = st.columns([3, 1])
    with c1:
        edited = st.data_editor(DEFAULT_MIXTURE, num_rows="dynamic", key="data_mixture_editor",
                                hide_index=True, column_config={
                                    "weight": st.column_config.NumberColumn(min_value=0.0),
                                    "available": st.column_config.TextColumn(
                                        help="unique tokens of this domain, e.g. 200B; "
                                             "empty = unlimited"),
                                })
    with c2:
        budget = parse_count(st.text_input("Training tokens", "15T", key="data_tokens"),
                             "Training tokens")
        max_epochs = st.number_input("Warn past epochs", 0.1, 100.0,
                                     datamix.DEFAULT_MAX_EPOCHS, key="data_max_epochs")
    weights: dict[str, float] = {}
    available: dict[str, float] = {}
    for i, r in edited.reset_index(drop=True).iterrows():
        name = str(r["domain"] or "").strip()
        if not name or name == "None":
            raise MeshplanError(f"mixture row {i + 1}: give the domain a name")
        if name in weights:
            raise MeshplanError(f"mixture: domain {name!r} appears twice; merge the rows")
        w = r["weight"]
        if w is None or not math.isfinite(float(w)) or float(w) < 0:
            raise MeshplanError(f"mixture {name}: weight must be a number >= 0")
        weights[name] = float(w)
        a = str(r["available"] or "").strip()
        if a and a != "None":
            available[name] = parse_count(a, f"available tokens of {name}")
    if not weights or sum(weights.values()) <= 0:
        raise MeshplanError("mixture: weights must not all be zero")
    plan = datamix.plan_mixture(budget, weights, available, float(max_epochs))

table = pd.DataFrame([d.to_dict() for d in plan.domains])
show = pd.DataFrame({
    "domain": table["domain"], "share %": (table["weight"] * 100).map(lambda x: f"{x:.1f}"),
    "tokens": table["tokens"].map(fmt_count),
    "available": table["available"].map(lambda x: "unlimited" if x is None or pd.isna(x)
                                        else fmt_count(x)),
    "epochs": table["epochs"].map(lambda x: "" if x is None or pd.isna(x) else f"{x:.2f}"),
}).set_index("domain")
c1, c2 = st.columns([1, 1])
with c1:
    st.table(show)
    for w in plan.warnings:
        st.warning(w)
    if plan.max_tokens_within_threshold is not None:
        st.caption(f"This mixture takes up to {fmt_count(plan.max_tokens_within_threshold)} "
                   f"tokens before any domain passes {max_epochs:g} epochs.")
with c2:
    st.plotly_chart(charts.epochs_bar(table, float(max_epochs)), key="data_epochs_chart")

st.subheader("Token estimate")
with user_errors():
    how = st.radio("From", ["raw size", "uploaded sample"], horizontal=True, key="data_how")
    lang = st.selectbox("Language", list(datamix.CHARS_PER_TOKEN), key="data_lang")
    if how == "raw size":
        size = datamix.parse_size_bytes(st.text_input("Raw text size", "10TB", key="data_size"))
        ratio = datamix.default_ratio(lang)
        st.metric("tokens", fmt_count(datamix.tokens_from_bytes(size, ratio)))
        st.caption(ratio.source)
    else:
        sample = st.file_uploader("Sample text file", key="data_sample")
        tok = st.file_uploader("tokenizer.json (optional: measure with your tokenizer)",
                               type=["json"], key="data_tokenizer")
        size_text = st.text_input("Corpus size (empty: the sample itself)", "",
                                  key="data_corpus_size")
        if sample is None:
            st.info("Upload a sample of your corpus to measure bytes per character "
                    "(and chars per token, with a tokenizer.json).")
        else:
            raw = sample.getvalue()
            with tempfile.TemporaryDirectory() as tmp:
                sp = Path(tmp) / "sample.txt"
                sp.write_bytes(raw)
                if tok is not None:
                    tp = Path(tmp) / "tokenizer.json"
                    tp.write_bytes(tok.getvalue())
                    ratio = datamix.measure_sample(sp, tp)
                else:
                    try:
                        text = raw.decode("utf-8")
                    except UnicodeDecodeError:
                        raise MeshplanError("sample: not UTF-8 text") from None
                    if not text.strip():
                        raise MeshplanError("sample: file is empty; upload some text")
                    base = datamix.default_ratio(lang)
                    ratio = datamix.TokenRatio(
                        base.chars_per_token, len(raw) / len(text),
                        source=f"bytes/char measured on the sample; {base.chars_per_token} "
                               f"chars/token ({lang} rule of thumb)", sample_chars=len(text))
            size = datamix.parse_size_bytes(size_text) if size_text.strip() else float(len(raw))
            st.metric("tokens", fmt_count(datamix.tokens_from_bytes(size, ratio)))
            st.caption(f"{ratio.source}: {ratio.chars_per_token:.2f} chars/token, "
                       f"{ratio.bytes_per_char:.2f} bytes/char")
