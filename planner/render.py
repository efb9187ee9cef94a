"""Rich tables for people (the `--json` flags print machine-readable output instead)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

# Wide enough for the ranked-layout table when output is a pipe or a file.
console = Console(width=None if Console().is_terminal else 160)


def _bar(value: float, total: float, width: int = 30) -> str:
    n = 0 if total <= 0 else int(round(width * min(value / total, 1.0)))
    return "█" * n


def print_prediction(r: dict[str, Any]) -> None:
    lay = r["layout"]
    console.print(
        f"[bold]{r['model']}[/] ({r['params'] / 1e9:.2f} B params) on {r['gpus']} x {r['accelerator']}: "
        f"tp={lay['tp']} pp={lay['pp']} dp={lay['dp']} cp={lay['cp']} ep={lay['ep']} vpp={lay['vpp']} "
        f"{lay['sharding']} mbs={lay['micro_batch']} gbs={lay['global_batch']} recompute={lay['recompute']}"
        f"{' sp' if lay['sequence_parallel'] else ''} {lay['precision']}"
    )
    mem = Table(title="Memory per GPU (GB)")
    mem.add_column("part")
    mem.add_column("GB", justify="right")
    mem.add_column("")
    cap = r["memory_gb"]["capacity"]
    for k in ("weights", "gradients", "optimizer", "activations", "buffers", "overhead", "total"):
        mem.add_row(k, f"{r['memory_gb'][k]:.2f}", _bar(r["memory_gb"][k], cap))
    mem.add_row("capacity", f"{cap:.0f}", "fits" if r["fits_in_memory"] else "[red]DOES NOT FIT[/]")
    console.print(mem)
    st = Table(title="Step time (s)")
    st.add_column("part")
    st.add_column("s", justify="right")
    st.add_column("")
    tot = r["step_time_s"]["total"]
    for k, v in r["step_time_s"].items():
        st.add_row(k, f"{v:.4f}", _bar(v, tot) if k != "dp_comm_total" else "(overlapped)")
    console.print(st)
    console.print(
        f"tokens/s/GPU [bold]{r['tokens_per_sec_per_gpu']:.1f}[/]   MFU [bold]{r['mfu_pct']:.1f}%[/]   "
        f"micro-batches/step {r['micro_batches_per_step']:.0f}"
    )
    console.print(f"priced by: {r['priced_by']['describe']}")
