"""`meshplan size`'s terminal output: one rich table per answer of `compute`'s dict."""

from __future__ import annotations

import math
from typing import Any


def human(x: float | None, unit: str = "") -> str:
    """1.2345e11 -> '123.5B'; small numbers plain."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    for div, suf in ((1e24, "Y"), (1e21, "Z"), (1e18, "E"), (1e15, "P"), (1e12, "T"),
                     (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(x) >= div:
            return f"{x / div:.3g}{suf}{unit}"
    return f"{x:.4g}{unit}"


def render_size(res: dict[str, Any]) -> None:
    """`meshplan size`'s tables, from `compute`'s dict."""
    from rich.console import Console

    con = Console()
    if "budget" in res:
        _budget(con, res)
    if "inference_optimal_fits" in res:
        _inference(con, res["inference_optimal_fits"])
    _reference(con, res["reference"]["llama3_8b"])
    if "data" in res:
        _data(con, res["data"])
    if "continual" in res:
        _continual(con, res["continual"])
    _batch_and_lr(con, res)


def _budget(con: Any, res: dict[str, Any]) -> None:
    from rich.table import Table

    b = res["budget"]
    extra = ""
    if b["from"] == "cluster":
        extra = (f"  ({b['gpus']} x {b['gpu']} x {b['days']:g} days x "
                 f"{b['peak_tflops']:.4g} TFLOP/s x {b['mfu_pct']:g}% MFU)")
    con.print(f"[bold]Compute budget[/bold] C = {b['flops']:.4g} FLOPs{extra}")
    t = Table(title="Compute-optimal size (C = 6ND)")
    for col in ("method", "params N", "tokens D", "D/N", "pred. loss"):
        t.add_column(col)
    r = res["rule_of_20"]
    t.add_row("rule of 20: N = sqrt(C/120)", human(r["params"]), human(r["tokens"]),
              f"{r['tokens_per_param']:.1f}", "-")
    for key, p in res["fits"].items():
        t.add_row(f"parametric L(N,D): {key}", human(p["params"]), human(p["tokens"]),
                  f"{p['tokens_per_param']:.1f}", f"{p['loss']:.4f}")
    con.print(t)
    con.print(f"  rule of 20: {r['source']}")
    for key, p in res["fits"].items():
        c = p["coefficients"]
        con.print(f"  {key}: {p['source']} (E={c['E']}, A={c['A']}, B={c['B']}, "
                  f"alpha={c['alpha']}, beta={c['beta']})")


def _inference(con: Any, fits: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="Inference-optimal (train + 2N x inference tokens, same loss)")
    for col in ("fit", "params N", "tokens D", "D/N", "Chinchilla N", "lifetime FLOPs",
                "saved vs Chinchilla"):
        t.add_column(col)
    for key, io in fits.items():
        t.add_row(key, human(io["params"]), human(io["tokens"]), f"{io['tokens_per_param']:.0f}",
                  human(io["chinchilla_params"]), f"{io['total_flops']:.3g}",
                  f"{io['savings_pct']:.1f}%")
    con.print(t)


def _reference(con: Any, ref: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title="LLaMA-3 8B @ 15T tokens vs the optima")
    cols = ["fit", "D/N", "vs 20", "opt. D/N", "loss", "FLOPs overhead"]
    has_life = any("lifetime_overhead" in v for v in ref.values())
    if has_life:
        cols += ["inf.-opt. D/N", "lifetime overhead"]
    for col in cols:
        t.add_column(col)
    for key, v in ref.items():
        row = [key, f"{v['tokens_per_param']:.0f}", f"{v['ratio_vs_rule_of_20']:.0f}x",
               f"{v['compute_optimal_tokens_per_param_at_same_flops']:.1f}", f"{v['loss']:.4f}",
               f"{v['compute_overhead']:.2f}x"]
        if has_life:
            row += [f"{v.get('inference_optimal_tokens_per_param', float('nan')):.0f}",
                    f"{v.get('lifetime_overhead', float('nan')):.2f}x"]
        t.add_row(*row)
    con.print(t)
    con.print("  opt. D/N: compute-optimal at the same FLOPs; FLOPs overhead: its training "
              "FLOPs over the least reaching the same loss")


def _data(con: Any, d: dict[str, Any]) -> None:
    from rich.table import Table

    r = d["ratio"]
    con.print(f"[bold]Tokens per byte[/bold]: {r['chars_per_token']:.3g} chars/token, "
              f"{r['bytes_per_char']:.3g} bytes/char ({r['source']})")
    if "tokens" in d:
        line = f"{human(d['size_bytes'], 'B')} of text ~ {human(d['tokens'])} tokens"
        if "epochs_at_answer" in d:
            line += f"; the sized run would take {d['epochs_at_answer']:.2f} epochs of it"
        con.print(line)
    if "mixture" in d:
        m = d["mixture"]
        t = Table(title=f"Mixture over {human(m['total_tokens'])} tokens")
        for col in ("domain", "weight", "tokens", "available", "epochs"):
            t.add_column(col)
        for row in m["domains"]:
            ep = row["epochs"]
            style = "red" if row["warning"] else ""
            t.add_row(row["domain"], f"{100 * row['weight']:.1f}%", human(row["tokens"]),
                      human(row["available"]), "-" if ep is None else f"{ep:.2f}",
                      style=style)
        con.print(t)
        for w in m["warnings"]:
            con.print(f"[yellow]warning:[/yellow] {w}")


def _batch_and_lr(con: Any, res: dict[str, Any]) -> None:
    if "batch" in res:
        b = res["batch"]
        con.print(
            f"[bold]Batch[/bold]: {b['micro_batch']} micro x {b['dp']} dp x {b['grad_accum']} "
            f"accum x {b['seq_len']} seq = {b['tokens']:,} tokens/step "
            f"({b['deviation_pct']:+.2f}% vs target)"
            + (f", {b['steps']:,} steps" if "steps" in b else "")
        )
    if res.get("lr"):
        lr = res["lr"]
        con.print(
            f"[bold]LR[/bold]: {lr['schedule']} peak {lr['max_lr']:.3g} -> {lr['min_lr']:.3g}, "
            f"warmup {lr['warmup_steps']:,} steps ({100 * lr['warmup_frac']:.0f}%); "
            f"{lr['reason']}"
        )


def _continual(con: Any, c: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"Continual pretraining: {human(c['total_tokens'])} tokens on a "
                    f"{human(c['params'])}-parameter model, {100 * c['replay_fraction']:.0f}% replay")
    for col in ("part", "domain", "weight", "tokens", "available", "epochs", "FLOPs (6ND)"):
        t.add_column(col)
    for part, key in (("new", "new"), ("replay", "replay")):
        flops = c[f"{key}_flops"]
        rows = c[key]["domains"]
        for row in rows:
            ep = row["epochs"]
            t.add_row(part, row["domain"], f"{100 * row['weight']:.1f}%", human(row["tokens"]),
                      human(row["available"]), "-" if ep is None else f"{ep:.2f}",
                      f"{6 * c['params'] * row['tokens']:.3g}",
                      style="red" if row["warning"] else "")
        if rows:
            t.add_row(part, "(all)", "", human(c[f"{key}_tokens"]), "", "", f"{flops:.3g}")
    t.add_row("total", "", "", human(c["total_tokens"]), "", "", f"{c['total_flops']:.3g}")
    con.print(t)
    for w in c["warnings"]:
        con.print(f"[yellow]warning:[/yellow] {w}")


