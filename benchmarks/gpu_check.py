"""Every GPU check in one script, for the minutes an accelerator is lent (under 8 on an H200).

    python benchmarks/gpu_check.py [--dry] [--json] [--out DIR] [--budget-s 450]

On a GPU: a ~1.1B LLaMA-style model (TinyLlama's shape: 22 layers, hidden 2048, GQA 32/4,
SwiGLU 5632, vocab 32000, seq 2048) planned by `meshplan plan` for one GPU in bf16, then
trained 30 steps by `meshplan run` with each attention backend this machine has (flash-attn
when installed, torch's varlen kernel, SDPA with the block-diagonal mask), eager and with
`train.compile`; each run's tokens/s, MFU and peak `torch.cuda.max_memory_allocated` beside
what the plan predicted. Before that, each backend's packed attention against attention run
document by document; after, `meshplan bench` on the GPU. `--dry` runs the same sequence on
this CPU with a tiny model and 4 steps (what CI checks). Everything lands in
DIR/gpu_check.json (and on stdout with --json) plus a printed table; the exit status is 1
when a check failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# TinyLlama-1.1B's config.json fields (Zhang et al. 2024), the shape the GPU run trains
GPU_MODEL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
             "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
             "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
             "hidden_act": "silu"}
DRY_MODEL = {**GPU_MODEL, "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
             "max_position_embeddings": 64}
BACKENDS = ("flash", "torch_varlen", "sdpa")


def _cli(*args: str, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=env)


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def environment() -> dict[str, Any]:
    import torch

    from executor.attention import _flash_available, _torch_varlen_available

    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "cuda": cuda,
            "device": torch.cuda.get_device_name(0) if cuda else "cpu",
            "flash_attn": _flash_available(), "torch_varlen": _torch_varlen_available()}


def available_backends(env: dict[str, Any]) -> dict[str, str | None]:
    """backend -> None when it runs here, else why not."""
    return {"flash": None if env["cuda"] and env["flash_attn"] else "needs CUDA and flash-attn",
            "torch_varlen": None if env["cuda"] and env["torch_varlen"] else "needs CUDA and torch varlen_attn",
            "sdpa": None}


def varlen_parity(backends: dict[str, str | None], dry: bool) -> list[dict[str, Any]]:
    """Each backend's packed attention (documents packed in rows) against attention run
    document by document, causal, GQA, forward outputs."""
    import torch

    from executor.attention import attend as packed
    from executor.attention import make_context, reference_attention

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float32 if dev == "cpu" else torch.bfloat16
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    gen = torch.Generator().manual_seed(0)
    b, t, hq, hkv, d = (4, 64, 4, 2, 16) if dry else (4, 2048, 32, 4, 64)
    q = torch.randn(b, t, hq, d, generator=gen).to(dev, dtype)
    k = torch.randn(b, t, hkv, d, generator=gen).to(dev, dtype)
    v = torch.randn(b, t, hkv, d, generator=gen).to(dev, dtype)
    # documents of uneven lengths packed into each row
    cuts = torch.tensor([0, t // 5, t // 2, t - t // 7])
    doc = (torch.arange(t)[None, :] >= cuts[:, None]).sum(0) - 1
    rows = [doc, doc.flip(0).max() - doc.flip(0)]  # the same cuts, mirrored on odd rows
    doc_ids = torch.stack([rows[i % 2] for i in range(b)]).to(dev)
    ref = reference_attention(q.float(), k.float(), v.float(), doc_ids, causal=True)
    out = []
    for name, why in backends.items():
        if why is not None:
            out.append({"backend": name, "skipped": why})
            continue
        got = packed(q, k, v, make_context(doc_ids, True, name)).float()
        err = float((got - ref).abs().max())
        out.append({"backend": name, "max_abs_err": err, "tolerance": tol, "ok": err <= tol})
    return out


def write_plan(work: Path, dry: bool) -> Path:
    cfg = work / "config.json"
    cfg.write_text(json.dumps(DRY_MODEL if dry else GPU_MODEL))
    gpu, seq, rows = ("cpu", 64, 8) if dry else ("h200", 2048, 8)
    proc = _cli("plan", "--hf-config", str(cfg), "--gpu", gpu, "--gpus", "1", "--seq-len", str(seq),
                "--global-batch", str(rows), "--precision", "bf16", "--out", str(work / "plan"),
                "--override", f"train.max_steps={4 if dry else 30}", "--override", "checkpoint.every=0",
                "--override", "train.warmup_steps=1", timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"meshplan plan failed: {_last_line(proc.stderr)}")
    return work / "plan" / "plan.yaml"


def train_run(plan: Path, out: Path, backend: str, compiled: bool, timeout: float) -> dict[str, Any]:
    """One `meshplan run` of the plan; its measured figures beside the plan's predictions."""
    from costmodels.flops import model_flops_per_token_spec
    from costmodels.hardware import ACCELERATORS
    from planner.planfile import load_plan

    t0 = time.time()
    proc = _cli("run", str(plan), "--out", str(out), "--no-progress",
                "--override", f"train.attention_backend={backend}",
                "--override", f"train.compile={'true' if compiled else 'false'}", timeout=timeout)
    row: dict[str, Any] = {"backend": backend, "compiled": compiled, "wall_s": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        return {**row, "ok": False, "error": _last_line(proc.stderr)}
    summary = json.loads((out / "summary.json").read_text())
    p = load_plan(plan)
    model = p.model_spec()
    tokens_per_step = p.layout.global_batch_size * model.seq_len
    step_s = float(summary["median_step_time_s"])  # the median: compile's first steps excluded
    tok_s = tokens_per_step / step_s
    fpt = model_flops_per_token_spec(model)
    peak = ACCELERATORS[p.cluster.accelerator].peak_tflops("bf16") * 1e12
    pred = summary.get("predicted", {})
    return {
        **row, "ok": bool(summary.get("finished")), "steps": summary["steps"],
        "final_loss": summary["final_loss"], "tokens_per_s": tok_s,
        "mfu_pct": 100 * fpt * tok_s / peak, "peak_memory_gb": summary["peak_memory_bytes"] / 1e9,
        "predicted_step_s": pred.get("step_time_s"), "predicted_mfu_pct": pred.get("mfu_pct"),
        "predicted_peak_memory_gb": pred.get("peak_memory_gb"), "step_s": step_s,
        "compiled_blocks": summary.get("applied", {}).get("compiled_blocks"),
    }


def bench(dry: bool, timeout: float) -> dict[str, Any]:
    """`meshplan bench` of this device (one process: no collective sweep), not saved."""
    proc = _cli("bench", "--gpu", "cpu" if dry else "h200", "--world", "1", "--quick", "--no-save",
                "--json", timeout=timeout)
    if proc.returncode != 0:
        return {"ok": False, "error": _last_line(proc.stderr)}
    return {"ok": True, "measured": json.loads(proc.stdout)}


def _fmt(v: Any, spec: str) -> str:
    return format(v, spec) if isinstance(v, int | float) else "-"


def table(report: dict[str, Any]) -> str:
    lines = [f"device {report['environment']['device']}  torch {report['environment']['torch']}"
             f"  ({'dry run' if report['dry'] else 'GPU run'}, {report['seconds']:.0f} s)", "",
             "packed attention vs per-document attention"]
    for r in report["varlen_parity"]:
        if "skipped" in r or "error" in r:
            lines.append(f"  {r['backend']:<13} " + (f"skipped: {r['skipped']}" if "skipped" in r
                                                     else f"FAIL: {r['error']}"))
        else:
            lines.append(f"  {r['backend']:<13} max |err| {r['max_abs_err']:.2e} "
                         f"(tol {r['tolerance']:.0e}) {'ok' if r['ok'] else 'FAIL'}")
    lines += ["", f"{'backend':<13} {'compiled':<8} {'tok/s':>10} {'MFU %':>7} {'pred MFU %':>10} "
              f"{'peak GB':>8} {'pred GB':>8} {'step s':>8} {'pred s':>8}  status"]
    for r in report["runs"]:
        status = "ok" if r.get("ok") else r.get("skipped") or r.get("error", "FAIL")
        lines.append(f"{r['backend']:<13} {str(r['compiled']):<8} {_fmt(r.get('tokens_per_s'), ',.0f'):>10} "
                     f"{_fmt(r.get('mfu_pct'), '.1f'):>7} {_fmt(r.get('predicted_mfu_pct'), '.1f'):>10} "
                     f"{_fmt(r.get('peak_memory_gb'), '.2f'):>8} {_fmt(r.get('predicted_peak_memory_gb'), '.2f'):>8} "
                     f"{_fmt(r.get('step_s'), '.3f'):>8} {_fmt(r.get('predicted_step_s'), '.3f'):>8}  {status}")
    b = report["bench"]
    lines += ["", "meshplan bench: " + ("ok" if b.get("ok") else b.get("skipped") or b.get("error", "FAIL"))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry", action="store_true", help="the same checks on this CPU, tiny model, 4 steps")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--out", help="directory for gpu_check.json and the runs (default: a temporary one)")
    ap.add_argument("--budget-s", type=float, default=450.0,
                    help="stop starting new runs after this many seconds (default 450)")
    args = ap.parse_args(argv)
    import torch

    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry on a CPU", file=sys.stderr)
        return 2
    start = time.time()
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="meshplan-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment()
    backends = available_backends(env)
    report: dict[str, Any] = {"dry": args.dry, "environment": env, "varlen_parity": [], "runs": []}
    # each phase fails into the report (a lent GPU's minutes still leave a JSON behind)
    try:
        report["varlen_parity"] = varlen_parity(backends, args.dry)
    except Exception as exc:  # noqa: BLE001 - recorded, the other phases still run
        report["varlen_parity"] = [{"backend": "all", "ok": False, "error": _last_line(repr(exc))}]
    try:
        plan: Path | None = write_plan(work, args.dry)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        plan, report["plan_error"] = None, _last_line(str(exc))
    for name, why in backends.items():
        if plan is None:
            report["runs"].append({"backend": name, "compiled": False, "ok": False,
                                   "error": "no plan: " + report["plan_error"]})
            continue
        for compiled in (False, True):
            if why is not None:
                report["runs"].append({"backend": name, "compiled": compiled, "skipped": why})
                continue
            left = args.budget_s - (time.time() - start)
            if left < 30:
                report["runs"].append({"backend": name, "compiled": compiled, "skipped": "budget spent"})
                continue
            run_dir = work / f"run-{name}-{'compiled' if compiled else 'eager'}"
            try:
                report["runs"].append(train_run(plan, run_dir, name, compiled, left))
            except subprocess.TimeoutExpired:
                report["runs"].append({"backend": name, "compiled": compiled, "ok": False,
                                       "error": "timed out (budget)"})
            except (OSError, ValueError, KeyError) as exc:  # a run that wrote no usable summary
                report["runs"].append({"backend": name, "compiled": compiled, "ok": False,
                                       "error": _last_line(repr(exc))})
    left = args.budget_s - (time.time() - start)
    report["bench"] = bench(args.dry, left) if left >= 30 else {"skipped": "budget spent"}
    report["seconds"] = round(time.time() - start, 1)
    ran = [r for r in report["runs"] if "skipped" not in r]
    report["ok"] = (all(r["ok"] for r in report["varlen_parity"] if "ok" in r)
                    and any("ok" in r for r in report["varlen_parity"]) and bool(ran)
                    and all(r["ok"] for r in ran) and bool(report["bench"].get("ok")))
    text = json.dumps(report, indent=2, default=float)
    tmp = work / "gpu_check.json.tmp"
    tmp.write_text(text)
    tmp.replace(work / "gpu_check.json")
    print(text if args.json else table(report))
    if args.json:
        print(table(report), file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
