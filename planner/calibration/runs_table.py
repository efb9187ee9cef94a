"""Read a table of measured training runs (the canonical columns of
`shared/data/published_runs.csv`) into cost-model cases.

Missing fields that have a sane default are filled, not skipped (documented in README,
"Validation defaults"): micro batch 1, recompute none, sequence parallel on when TP > 1
(Megatron-Core / NeMo recipes' practice), CP / VPP / EP 1, sharding none, global batch =
micro x DP x PP (one micro-batch per pipeline stage). Only rows that cannot be predicted are skipped, with a reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pandas as pd

from costmodels.cases import Cases, build_cases, concat_cases
from costmodels.errors import MeshplanError
from costmodels.hardware import ACCELERATORS
from costmodels.specs import PRECISIONS, RECOMPUTES, SHARDINGS, ClusterSpec, ModelSpec, SpecError
from costmodels.stacks import known_framework

REQUIRED_COLUMNS = (
    "run_id", "model_name", "layers", "hidden_size", "ffn_hidden_size", "num_heads",
    "num_kv_heads", "vocab_size", "seq_len", "gpu", "num_gpus", "tp", "pp", "dp",
    "measured_tokens_per_sec_per_gpu",
)
NUMERIC_COLUMNS = (
    "params_b", "layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads",
    "vocab_size", "num_experts", "experts_topk", "seq_len", "global_batch_size",
    "micro_batch_size", "num_gpus", "tp", "pp", "dp", "cp", "ep", "vpp",
    "measured_tokens_per_sec_per_gpu", "measured_step_time_s", "measured_peak_memory_gb",
    "gpus_per_node", "scaleup_gbps", "scaleout_gbps",
)
# Non-numeric values that name something the cost model knows: ("skip", reason) makes the
# row unpredictable with that reason; ("assume", note) empties the cell so the documented
# default applies (interleaved with no degree given: vpp = 2, the smallest interleaving).
# Any other non-numeric cell is an error.
KNOWN_MARKERS: dict[str, dict[str, tuple[str, str]]] = {
    "num_kv_heads": {"mla": ("skip", "multi-head latent attention (DeepSeek) is not modelled")},
    "vpp": {
        "interleaved": ("assume", "interleaved schedule, degree not given"),
        "dualpipe": ("skip", "the DualPipe schedule is not modelled"),
    },
}
OPTIONAL_COLUMNS = (
    "source_id", "model_type", "params_b", "num_experts", "experts_topk", "global_batch_size",
    "micro_batch_size", "cp", "ep", "vpp", "sharding", "recompute", "sequence_parallel",
    "precision", "framework", "measured_step_time_s",
    # The framework's own peak-memory figure as its log prints it: the ranks it covers and
    # its unit are the stack's (`costmodels.stacks.Stack.memory_log_rank` /
    # `memory_log_unit_gb`: torchtitan and nanotron print GiB, nanotron rank 0 alone).
    "measured_peak_memory_gb",
    # The cluster per row (GB/s per GPU per direction, as `meshplan predict --nvlink-gbps /
    # --nic-gbps` take them); empty = the accelerator catalog's.
    "gpus_per_node", "scaleup_gbps", "scaleout_gbps",
)

MLP = Literal["swiglu", "gelu"]


def read_runs(path: str | Path) -> pd.DataFrame:
    """Read and check a runs CSV; one clear line on any problem."""
    p = Path(path)
    if not p.is_file():
        raise MeshplanError(f"{p}: file not found; pass a CSV with the columns of published_runs.csv")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=False, na_values=[""])
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MeshplanError(f"{p}: not a readable CSV ({first})") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if not missing and df.empty:
        raise MeshplanError(f"{p}: has a header but no rows; add at least one measured run")
    if missing:
        raise MeshplanError(
            f"{p}: missing column(s) {', '.join(missing)}; the header must have the columns of published_runs.csv"
        )
    for col in OPTIONAL_COLUMNS:
        if col not in df.columns:
            df[col] = np.nan
    df["_unpredictable"] = ""
    df["_marker"] = ""
    for col, markers in KNOWN_MARKERS.items():
        if col not in df.columns:
            continue
        for i in np.flatnonzero(df[col].fillna("").str.strip().str.lower().isin(markers).to_numpy()):
            value = str(df[col].iloc[i])
            kind, note = markers[value.strip().lower()]
            target = "_unpredictable" if kind == "skip" else "_marker"
            df.iloc[i, df.columns.get_loc(target)] = f"{col}={value}: {note}"
            df.iloc[i, df.columns.get_loc(col)] = np.nan
    for col in NUMERIC_COLUMNS:
        converted = pd.to_numeric(df[col], errors="coerce")
        bad = df[col].notna() & converted.isna()
        bad |= converted.notna() & ~np.isfinite(converted.astype(float))
        if bad.any():
            row_i = int(np.flatnonzero(bad.to_numpy())[0])
            raise MeshplanError(
                f"{p}: row {row_i + 2}, column {col}: {df[col].iloc[row_i]!r} is not a number; fix or empty the cell"
            )
        df[col] = converted
    return df


@dataclass
class RowModel:
    spec: ModelSpec
    assumed: list[str]


@overload
def _int(v: float | None, default: int) -> int: ...
@overload
def _int(v: float | None, default: None = None) -> int | None: ...
def _int(v: float | None, default: int | None = None) -> int | None:
    """An integer cell; `default` when empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return default
    return int(round(float(v)))


def _need(v: float | None, col: str) -> int:
    """An integer cell the row cannot be priced without."""
    out = _int(v)
    if out is None:
        raise SpecError(f"column {col} is empty; fill it to predict this run")
    return out


def model_for_row(row: pd.Series) -> RowModel:
    """Architecture of a run. MLP type and tied embeddings are not columns: choose the
    combination whose parameter count is closest to `params_b` when given, else SwiGLU
    unless FFN = 4h (GPT/MPT-style GELU), untied."""
    heads = _need(row["num_heads"], "num_heads")
    base: dict[str, Any] = dict(
        name=str(row["model_name"]), layers=_need(row["layers"], "layers"),
        hidden=_need(row["hidden_size"], "hidden_size"),
        ffn_hidden=_need(row["ffn_hidden_size"], "ffn_hidden_size"), heads=heads,
        kv_heads=_int(row["num_kv_heads"], heads), vocab=_need(row["vocab_size"], "vocab_size"),
        seq_len=_need(row["seq_len"], "seq_len"),
    )
    moe = str(row.get("model_type", "dense")) == "moe" and _int(row.get("num_experts"), 0)
    if moe:
        base.update(num_experts=_need(row["num_experts"], "num_experts"), experts_topk=_int(row.get("experts_topk"), 2))
    assumed: list[str] = []
    target = row.get("params_b")
    mlps: tuple[MLP, ...] = ("swiglu", "gelu")
    options = [(mlp, tied) for mlp in mlps for tied in (False, True)]
    if target is not None and not (isinstance(target, float) and math.isnan(target)):
        specs = [ModelSpec(**base, mlp=mlp, tied_embeddings=tied) for mlp, tied in options]
        best = min(specs, key=lambda s: abs(s.param_count() / 1e9 - float(target)))
        return RowModel(best, assumed)
    mlp: MLP = "gelu" if base["ffn_hidden"] == 4 * base["hidden"] else "swiglu"
    assumed.append(f"mlp={mlp} (no params_b to check against)")
    return RowModel(ModelSpec(**base, mlp=mlp), assumed)


def _float(v: float | None) -> float:
    """A bandwidth cell: 0 (the catalog's) when empty."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return 0.0
    return max(0.0, float(v))


def _str(row: pd.Series, col: str, default: str) -> str:
    v = row.get(col)
    if v is None or (isinstance(v, float) and math.isnan(v)) or str(v).strip() == "":
        return default
    return str(v).strip().lower()


def cases_from_runs(df: pd.DataFrame) -> tuple[Cases | None, list[int], dict[int, str], list[list[str]]]:
    """Cases for every predictable row. Returns (cases, row positions used, skipped reasons
    by row position, defaults assumed per used row)."""
    parts: list[Cases] = []
    used: list[int] = []
    skipped: dict[int, str] = {}
    assumed_all: list[list[str]] = []
    for i, (_, row) in enumerate(df.iterrows()):
        try:
            if row.get("_unpredictable"):
                raise SpecError(row["_unpredictable"])
            gpu = _str(row, "gpu", "")
            if gpu not in ACCELERATORS:
                raise SpecError(
                    f"gpu {gpu!r} is not in the accelerator catalog; use one of {', '.join(sorted(ACCELERATORS))}"
                )
            precision = _str(row, "precision", "bf16")
            if precision not in PRECISIONS:
                raise SpecError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
            ACCELERATORS[gpu].peak_tflops(precision)  # e.g. fp8 on an A100: named, not guessed
            rm = model_for_row(row)
            assumed = list(rm.assumed)
            tp, pp, dp = _int(row["tp"], 1), _int(row["pp"], 1), _int(row["dp"])
            cp, ep = _int(row.get("cp"), 1), _int(row.get("ep"), 1)
            vpp = _int(row.get("vpp"), 1)
            if row.get("_marker", "").startswith("vpp="):
                layers = rm.spec.layers
                vpp = 2 if pp > 1 and layers % (2 * pp) == 0 else 1
                assumed.append(f"vpp={vpp} ({row['_marker']})")
            micro = _int(row.get("micro_batch_size"))
            if micro is None:
                micro = 1
                assumed.append("micro_batch_size=1")
            gpus = _need(row["num_gpus"], "num_gpus")
            if dp is None:
                dp = gpus // (tp * pp * cp)
                assumed.append(f"dp={dp}")
            gbs = _int(row.get("global_batch_size"))
            if gbs is None:
                # One micro-batch per pipeline stage fills 1F1B's steady state.
                gbs = micro * dp * max(pp, 1)
                assumed.append(f"global_batch_size={gbs} (micro x dp x pp)")
            recompute = _str(row, "recompute", "")
            if recompute not in RECOMPUTES:
                recompute = "none"
                assumed.append("recompute=none")
            sharding = _str(row, "sharding", "none")
            if sharding not in SHARDINGS:
                raise SpecError(f"sharding {sharding!r} must be one of {', '.join(SHARDINGS)}")
            sp_raw = _str(row, "sequence_parallel", "")
            sp = sp_raw == "true" if sp_raw in ("true", "false") else tp > 1
            if gbs % (micro * dp):
                gbs = max(1, round(gbs / (micro * dp))) * micro * dp
                assumed.append("global_batch rounded to micro x dp")
            if tp * pp * dp * cp != gpus:
                raise SpecError(f"tp*pp*dp*cp={tp * pp * dp * cp} != num_gpus={gpus}")
            per_node = _int(row.get("gpus_per_node"), ACCELERATORS[gpu].gpus_per_node)
            cluster = ClusterSpec(
                gpu, gpus, gpus_per_node=min(per_node, gpus),
                scaleup_gbps=_float(row.get("scaleup_gbps")), scaleout_gbps=_float(row.get("scaleout_gbps")),
            )
            cols = {
                "tp": np.array([tp]), "pp": np.array([pp]), "dp": np.array([dp]),
                "cp": np.array([cp]), "ep": np.array([ep]), "vpp": np.array([vpp]),
                "sharding": np.array([SHARDINGS.index(sharding)]), "micro": np.array([micro]),
                "gbs": np.array([gbs]), "recompute": np.array([RECOMPUTES.index(recompute)]),
                "sp": np.array([sp]), "schedule": np.array([2 if vpp > 1 else 1]),
                "precision_idx": np.array([0]),
            }
            framework = row.get("framework")
            framework = None if not isinstance(framework, str) else framework
            if framework and not known_framework(framework):
                assumed.append(f"framework {framework!r} not recognised: meshplan's stack assumed")
            parts.append(build_cases(rm.spec, cluster, cols, precision, framework=framework))
            used.append(i)
            assumed_all.append(assumed)
        except (SpecError, ValueError, TypeError, ZeroDivisionError) as exc:
            skipped[i] = str(exc).splitlines()[0]
    return (concat_cases(parts) if parts else None), used, skipped, assumed_all
