"""Pieces every page shares: where things are, user-error display, and the model / cluster
input widgets (each returns plain values; the cost model is only called through the cached
functions in `app.compute`)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import streamlit as st

from costmodels.errors import MeshplanError
from costmodels.hardware import ACCELERATORS
from costmodels.presets import PRESETS
from costmodels.specs import ModelSpec
from planner.model_args import model_from_hf_config

REPO_ROOT = Path(__file__).resolve().parents[1]
PUBLISHED_RUNS = REPO_ROOT.parent / "shared" / "data" / "published_runs.csv"
DEFAULT_MODEL = "llama3-70b"
DEFAULT_ACCELERATOR = "h100-sxm"
DEFAULT_NODES = 128  # 128 nodes x 8 GPUs = 1,024 GPUs: the dashboard's latency benchmark case


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Show a user mistake as one visible message and stop the page (never a stack trace)."""
    try:
        yield
    except MeshplanError as exc:
        st.error(f"{exc}", icon="⚠️")
        st.stop()


@dataclass(frozen=True)
class ClusterInputs:
    accelerator: str
    nodes: int
    gpus_per_node: int
    scaleup_gbps: float
    scaleout_gbps: float

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    def key(self) -> tuple[str, int, int, float, float]:
        return (self.accelerator, self.num_gpus, self.gpus_per_node, self.scaleup_gbps,
                self.scaleout_gbps)


def _upload_to_path(upload: object, suffix: str) -> Path:
    """Streamlit uploads live in memory; the shared readers take paths."""
    fd, name = tempfile.mkstemp(prefix="meshplan-upload-", suffix=suffix)
    with os.fdopen(fd, "wb") as fh:
        fh.write(upload.getvalue())  # type: ignore[attr-defined]
    return Path(name)


def model_inputs(prefix: str, container: object = st) -> ModelSpec:
    """Preset, uploaded Hugging Face config.json, or custom sliders; then the sequence length.

    Raises MeshplanError (shown by `user_errors`) for an unusable model."""
    c = container
    source = c.radio("Model source", ["Preset", "HF config.json", "Custom"], horizontal=True,
                     key=f"{prefix}_model_source")
    if source == "Preset":
        names = sorted(PRESETS)
        name = c.selectbox("Preset", names, index=names.index(DEFAULT_MODEL),
                           key=f"{prefix}_preset")
        model = PRESETS[name]
    elif source == "HF config.json":
        up = c.file_uploader("Hugging Face config.json", type=["json"], key=f"{prefix}_hf")
        if up is None:
            raise MeshplanError("model: upload a Hugging Face config.json (or pick a preset)")
        path = _upload_to_path(up, ".json")
        try:
            model = model_from_hf_config(path)
        finally:
            path.unlink(missing_ok=True)
    else:
        base = PRESETS["llama3-8b"]
        cols = c.columns(3)
        layers = cols[0].slider("Layers", 1, 200, base.layers, key=f"{prefix}_layers")
        hidden = cols[1].slider("Hidden size", 128, 32768, base.hidden, step=128,
                                key=f"{prefix}_hidden")
        ffn = cols[2].slider("FFN hidden size", 128, 131072, base.ffn_hidden, step=128,
                             key=f"{prefix}_ffn")
        heads = cols[0].slider("Attention heads", 1, 256, base.heads, key=f"{prefix}_heads")
        kv = cols[1].slider("KV heads", 1, 256, base.kv_heads, key=f"{prefix}_kv")
        vocab = cols[2].number_input("Vocabulary", 256, 1_000_000, base.vocab,
                                     key=f"{prefix}_vocab")
        mlp = cols[0].selectbox("MLP", ["swiglu", "gelu"], key=f"{prefix}_mlp")
        model = ModelSpec("custom", layers=int(layers), hidden=int(hidden), ffn_hidden=int(ffn),
                          heads=int(heads), kv_heads=int(kv), vocab=int(vocab),
                          seq_len=base.seq_len, mlp=mlp,
                          norm="rmsnorm" if mlp == "swiglu" else "layernorm")
    seq = c.select_slider("Sequence length", options=[2**k for k in range(7, 18)],
                          value=model.seq_len if model.seq_len in [2**k for k in range(7, 18)]
                          else 8192, key=f"{prefix}_seq")
    return model.with_(seq_len=int(seq))


def cluster_inputs(prefix: str, container: object = st, accelerator_key: str | None = None,
                   label: str = "Accelerator") -> ClusterInputs:
    c = container
    keys = sorted(ACCELERATORS)
    acc = c.selectbox(label, keys, index=keys.index(DEFAULT_ACCELERATOR),
                      key=accelerator_key or f"{prefix}_acc")
    spec = ACCELERATORS[acc]
    cols = c.columns(2)
    nodes = cols[0].number_input("Nodes", 1, 8192, DEFAULT_NODES, key=f"{prefix}_nodes")
    gpn = cols[1].number_input("GPUs per node", 1, 72, spec.gpus_per_node, key=f"{prefix}_gpn")
    up = cols[0].number_input("NVLink GB/s per GPU (0 = catalog)", 0.0, 10_000.0, 0.0,
                              key=f"{prefix}_nvlink",
                              help=f"catalog: {spec.scaleup_gbps:g} GB/s per direction")
    out = cols[1].number_input("NIC GB/s per GPU (0 = catalog)", 0.0, 10_000.0, 0.0,
                               key=f"{prefix}_nic",
                               help=f"catalog: {spec.scaleout_gbps:g} GB/s per direction")
    return ClusterInputs(acc, int(nodes), int(gpn), float(up), float(out))


def fmt_count(x: float) -> str:
    """1.5e12 -> '1.50T' (SI suffixes, as the CLI prints counts)."""
    for div, suffix in ((1e15, "P"), (1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.2f}{suffix}"
    return f"{x:.3g}"
