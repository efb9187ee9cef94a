"""Plotly figures (pure functions of plain data: no Streamlit, no cost-model calls)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

COLORS = {
    "weights": "#4C78A8", "gradients": "#F58518", "optimizer": "#E45756",
    "activations": "#72B7B2", "buffers": "#54A24B", "overhead": "#B8B0AC",
}
LAYOUT = {"margin": {"l": 10, "r": 10, "t": 40, "b": 10}, "height": 380}


def memory_bars(stacks: Mapping[str, Mapping[str, float]], hbm_gb: float,
                usable_gb: float | None = None, title: str = "Per-GPU memory") -> go.Figure:
    """Stacked bar per layout (weights / grads / optimizer / activations / buffers / overhead)
    against the accelerator's HBM line (and the usable line after headroom)."""
    labels = list(stacks)
    fig = go.Figure()
    parts = list(next(iter(stacks.values()))) if stacks else []
    for part in parts:
        fig.add_bar(name=part, x=labels, y=[stacks[k][part] for k in labels],
                    marker_color=COLORS.get(part), hovertemplate="%{y:.2f} GB")
    fig.add_hline(y=hbm_gb, line_color="black", line_width=2,
                  annotation_text=f"HBM {hbm_gb:g} GB", annotation_position="top left")
    if usable_gb is not None and usable_gb < hbm_gb:
        fig.add_hline(y=usable_gb, line_color="gray", line_dash="dash",
                      annotation_text=f"usable {usable_gb:.0f} GB",
                      annotation_position="bottom left")
    top = max([sum(v.values()) for v in stacks.values()] + [hbm_gb])
    fig.update_layout(barmode="stack", title=title, yaxis_title="GB per GPU",
                      yaxis_range=[0, top * 1.1], **LAYOUT)
    return fig


def step_waterfall(parts: Mapping[str, float], title: str = "Step time") -> go.Figure:
    """Compute, exposed communication and bubble adding up to the step time."""
    total = sum(parts.values())
    # Terms under a millionth of the step are rounding noise, not time worth a bar.
    names = [k for k, v in parts.items() if v > 1e-6 * total or k == "compute"]
    vals = [parts[k] for k in names]
    fig = go.Figure(go.Waterfall(
        x=[*names, "step"], y=[*vals, 0.0], measure=["relative"] * len(names) + ["total"],
        text=[f"{v:.3g} s" for v in vals] + [f"{sum(vals):.3g} s"], textposition="outside",
        connector={"line": {"color": "#999"}},
    ))
    fig.update_layout(title=title, yaxis_title="seconds per optimizer step", showlegend=False,
                      **LAYOUT)
    return fig


def stacked_times(series: Mapping[str, Mapping[str, float]],
                  title: str = "Step time, side by side") -> go.Figure:
    """One stacked bar per layout / accelerator: the step-time breakdown on one axis."""
    labels = list(series)
    parts = list(next(iter(series.values()))) if series else []
    fig = go.Figure()
    for p in parts:
        ys = [series[k][p] for k in labels]
        if max(ys, default=0) <= 0:
            continue
        fig.add_bar(name=p, x=labels, y=ys, hovertemplate="%{y:.3g} s")
    fig.update_layout(barmode="stack", title=title, yaxis_title="seconds per step", **LAYOUT)
    return fig


def pareto(front: pd.DataFrame, selected: pd.Series | None = None) -> go.Figure:
    fig = go.Figure()
    fig.add_scatter(x=front["peak_memory_gb"], y=front["tokens_per_sec_per_gpu"],
                    mode="lines+markers", name="Pareto front",
                    hovertemplate="%{x:.1f} GB, %{y:,.0f} tokens/s/GPU")
    if selected is not None:
        fig.add_scatter(x=[selected["peak_memory_gb"]], y=[selected["tokens_per_sec_per_gpu"]],
                        mode="markers", marker={"size": 14, "symbol": "star"}, name="selected")
    fig.update_layout(title="Memory / throughput Pareto front", xaxis_title="peak GB per GPU",
                      yaxis_title="tokens/s per GPU", **LAYOUT)
    return fig


def isoflop(curves: Mapping[str, np.ndarray], highlight: int | None = None) -> go.Figure:
    """Loss vs parameters at fixed compute (Hoffmann et al. 2022, Fig. 3), optima marked."""
    fig = go.Figure()
    for i, c in enumerate(curves["flops"]):
        width = 3 if i == highlight else 1.5
        fig.add_scatter(x=curves["params"][i], y=curves["loss"][i], mode="lines",
                        name=f"C = {c:.1e}", line={"width": width})
    fig.add_scatter(x=curves["opt_params"], y=curves["opt_loss"], mode="markers+lines",
                    name="optimum", marker={"size": 10, "symbol": "x", "color": "black"},
                    line={"dash": "dot", "color": "black"})
    fig.update_layout(title="IsoFLOP curves", xaxis_type="log", xaxis_title="parameters",
                      yaxis_title="predicted loss", **LAYOUT)
    return fig


def tokens_per_param(models: pd.DataFrame, optimum: float, rule: float = 20.0) -> go.Figure:
    """Where known models sit on the tokens-per-parameter axis against the optimum."""
    fig = go.Figure()
    fig.add_scatter(x=models["tokens_per_param"], y=models["loss"], mode="markers+text",
                    text=models["model"], textposition="top center", marker={"size": 11},
                    name="models", hovertemplate="%{text}: %{x:.0f} tokens/param")
    # Vertical guides as traces: shapes on a log axis take log10 coordinates.
    lo, hi = float(models["loss"].min()), float(models["loss"].max())
    pad = max(hi - lo, 0.01) * 0.1
    for x, label, dash, color in ((optimum, f"compute-optimal ({optimum:.0f})", "dash", "green"),
                                  (rule, "20 tokens / param", "dot", "gray")):
        fig.add_scatter(x=[x, x], y=[lo - pad, hi + pad], mode="lines", name=label,
                        line={"dash": dash, "color": color})
    fig.update_layout(title="Tokens per parameter", xaxis_type="log",
                      xaxis_title="training tokens per parameter",
                      yaxis_title="predicted loss (parametric fit)", **LAYOUT)
    return fig


def epochs_bar(domains: pd.DataFrame, max_epochs: float) -> go.Figure:
    fig = go.Figure()
    fig.add_bar(x=domains["domain"], y=domains["epochs"].fillna(0.0),
                marker_color=["#E45756" if (e or 0) > max_epochs else "#4C78A8"
                              for e in domains["epochs"]], hovertemplate="%{y:.2f} epochs")
    fig.add_hline(y=max_epochs, line_dash="dash", annotation_text=f"{max_epochs:g} epochs")
    fig.update_layout(title="Epochs per domain", yaxis_title="epochs", **LAYOUT)
    return fig


def lr_curves(curves: Mapping[str, np.ndarray], title: str = "Learning rate") -> go.Figure:
    fig = go.Figure()
    for name, y in curves.items():
        x = np.arange(len(y))
        stride = max(1, len(y) // 4000)  # keep the figure small on million-step runs
        fig.add_scatter(x=x[::stride], y=y[::stride], mode="lines", name=name)
    fig.update_layout(title=title, xaxis_title="optimizer step", yaxis_title="LR", **LAYOUT)
    return fig


def run_curve(df: pd.DataFrame, column: str, title: str, skipped: Sequence[int] = (),
              rollbacks: Sequence[tuple[int, int]] = (), log_y: bool = False) -> go.Figure:
    """One metric over steps; skipped steps as red crosses, rollbacks as shaded spans."""
    fig = go.Figure()
    fig.add_scatter(x=df["step"], y=df[column], mode="lines", name=column)
    if len(skipped):
        sk = df[df["step"].isin(list(skipped))]
        fig.add_scatter(x=sk["step"], y=sk[column], mode="markers", name="skipped",
                        marker={"color": "red", "symbol": "x", "size": 10})
    for to_step, from_step in rollbacks:
        fig.add_vrect(x0=to_step, x1=from_step, fillcolor="orange", opacity=0.2, line_width=0,
                      annotation_text="rollback", annotation_position="top left")
    fig.update_layout(title=title, xaxis_title="step", yaxis_type="log" if log_y else "linear",
                      **LAYOUT)
    return fig


def multi_curve(df: pd.DataFrame, columns: Sequence[str], title: str) -> go.Figure:
    fig = go.Figure()
    for c in columns:
        d = df[["step", c]].dropna()
        fig.add_scatter(x=d["step"], y=d[c], mode="lines+markers", name=c)
    fig.update_layout(title=title, xaxis_title="step", **LAYOUT)
    return fig


def predicted_vs_measured(pairs: pd.DataFrame, title: str, unit: str) -> go.Figure:
    """Grouped bars: predicted and measured for each quantity."""
    fig = go.Figure()
    fig.add_bar(name="predicted", x=pairs["quantity"], y=pairs["predicted"])
    fig.add_bar(name="measured", x=pairs["quantity"], y=pairs["measured"])
    fig.update_layout(barmode="group", title=title, yaxis_title=unit, **LAYOUT)
    return fig


def accuracy_scatter(rows: pd.DataFrame, color: str = "source_id",
                     title: str = "Predicted vs measured tokens/s per GPU") -> go.Figure:
    """Log-log scatter with the y = x line and +-20% bands."""
    d = rows.dropna(subset=["predicted_tokens_per_sec_per_gpu", "measured_tokens_per_sec_per_gpu"])
    fig = go.Figure()
    for key, g in d.groupby(color):
        fig.add_scatter(x=g["measured_tokens_per_sec_per_gpu"],
                        y=g["predicted_tokens_per_sec_per_gpu"], mode="markers", name=str(key),
                        text=g["run_id"] + " " + g["model_name"].astype(str),
                        hovertemplate="%{text}<br>measured %{x:,.0f}<br>predicted %{y:,.0f}")
    if len(d):
        lo = float(min(d["measured_tokens_per_sec_per_gpu"].min(),
                       d["predicted_tokens_per_sec_per_gpu"].min())) * 0.8
        hi = float(max(d["measured_tokens_per_sec_per_gpu"].max(),
                       d["predicted_tokens_per_sec_per_gpu"].max())) * 1.25
        xs = [lo, hi]
        fig.add_scatter(x=xs, y=xs, mode="lines", name="y = x", line={"color": "black"})
        for f in (0.8, 1.2):
            fig.add_scatter(x=xs, y=[x * f for x in xs], mode="lines", showlegend=False,
                            line={"color": "gray", "dash": "dot"}, hoverinfo="skip")
    fig.update_layout(title=title, xaxis_type="log", yaxis_type="log",
                      xaxis_title="measured", yaxis_title="predicted", **LAYOUT)
    return fig
