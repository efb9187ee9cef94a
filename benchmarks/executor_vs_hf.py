"""The executor against the loop a user would otherwise write: Hugging Face `transformers`'
`LlamaForCausalLM` with `torch.optim.AdamW`, on the same LLaMA config, batch shape, data and
precision, eager and with each decoder block compiled.

    .venv/bin/python benchmarks/executor_vs_hf.py [--rounds 5] [--steps 8] [--json]

Shape: the `small` preset (8 layers, hidden 512, GQA 8/4, SwiGLU 1376, vocab 8192) at seq 256,
8 sequences a step, fp32, AdamW with gradient clipping. The HF loop trains on the batches
`meshplan run` trains on (the plan's packed loader over the same prepared corpus), calling
`model(input_ids=x, labels=x)` as its documentation does (no document mask: SDPA's causal
kernel over the packed rows), and `torch.optim.AdamW` with its defaults (on a CPU that is the
per-parameter loop: torch uses foreach by default on CUDA only). `meshplan run` trains the
plan with checkpoints (every 4 steps), stability checks and metrics on; its step time is the
data, forward / backward and optimizer of a step (checkpoint saves and metric writes fall
between steps). Both processes run torch's default threads (one per core). Each measurement is one process
run; the four kinds alternate within each round; a run's tokens/s is the tokens of one step
over its median step time (the first two steps, compile's, left out of the HF loop's; the
executor's median leaves them out by itself). Reported: the median over rounds of each, and
ratio = meshplan eager / HF eager, compiled_ratio = meshplan compiled / HF compiled.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SEQ, ROWS = 256, 8
KINDS = ("hf", "meshplan", "hf_compiled", "meshplan_compiled")


def write_plan(work: Path, steps: int) -> Path:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "planner.cli", "plan", "--model", "small", "--gpu", "cpu", "--gpus", "1",
         "--seq-len", str(SEQ), "--global-batch", str(ROWS), "--precision", "fp32",
         "--sharding", "none", "--recompute", "none", "--micro-batches", str(ROWS),
         "--out", str(work / "plan"), "--override", f"train.max_steps={steps}",
         "--override", "checkpoint.every=4", "--override", "train.warmup_steps=1"],
        capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    if proc.returncode != 0:
        raise SystemExit(f"executor_vs_hf: meshplan plan failed: {proc.stderr.strip()[-300:]}")
    return work / "plan" / "plan.yaml"


def hf_worker(plan_path: str, steps: int, compiled: bool) -> float:
    """tokens/s of the HF loop (this process), median step time after two warm-up steps."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from executor.data.loader import LoaderConfig, PackedLoader
    from executor.data.prepare import resolve_dataset
    from planner.planfile import load_plan

    plan = load_plan(plan_path)
    spec, train = plan.model_spec(), plan.train
    torch.manual_seed(train.seed)
    cfg = LlamaConfig(
        vocab_size=spec.vocab, hidden_size=spec.hidden, intermediate_size=spec.ffn_hidden,
        num_hidden_layers=spec.layers, num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads, max_position_embeddings=spec.seq_len,
        rms_norm_eps=spec.norm_eps, rope_theta=spec.rope_theta, tie_word_embeddings=False,
        attention_bias=False, mlp_bias=False, attn_implementation="sdpa")
    model = LlamaForCausalLM(cfg)
    model.train()
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    opt = torch.optim.AdamW(model.parameters(), lr=train.lr, betas=(train.beta1, train.beta2),
                            eps=train.eps, weight_decay=train.weight_decay)
    data = resolve_dataset(plan, None, False)
    loader = PackedLoader(data, LoaderConfig(seq_len=spec.seq_len, rows=ROWS, seed=train.seed,
                                             mixture=dict(plan.data.mixture)), "train")
    cursor, times = 0, []
    for _ in range(steps):
        batch, cursor = loader.global_batch(cursor)
        t = time.perf_counter()
        loss = model(input_ids=batch.input_ids, labels=batch.input_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        float(loss)
        times.append(time.perf_counter() - t)
    return ROWS * spec.seq_len / statistics.median(times[2:])


def measure(kind: str, plan: Path, work: Path, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    compiled = kind.endswith("_compiled")
    if kind.startswith("hf"):
        proc = subprocess.run([sys.executable, __file__, "--worker", str(plan), "--steps", str(steps),
                               *(["--compiled"] if compiled else [])],
                              capture_output=True, text=True, env=env, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"executor_vs_hf: the HF loop failed: {proc.stderr.strip()[-500:]}")
        return float(proc.stdout.strip().splitlines()[-1])
    out = Path(tempfile.mkdtemp(dir=work, prefix=f"{kind}-"))
    proc = subprocess.run([sys.executable, "-m", "planner.cli", "run", str(plan), "--out", str(out),
                           "--no-progress", "--override", f"train.compile={'true' if compiled else 'false'}"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"executor_vs_hf: meshplan run failed: {proc.stderr.strip()[-500:]}")
    summary = json.loads((out / "summary.json").read_text())
    return ROWS * SEQ / float(summary["median_step_time_s"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="alternating rounds (median over them)")
    ap.add_argument("--steps", type=int, default=8, help="training steps per process run")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--compiled", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(hf_worker(args.worker, args.steps, args.compiled))
        return 0
    if args.rounds < 1 or args.steps < 4:
        print("executor_vs_hf: --rounds >= 1 and --steps >= 4 (two warm-up steps are left out)",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="meshplan-vs-hf-") as tmp:
        work = Path(tmp)
        plan = write_plan(work, args.steps)
        runs: dict[str, list[float]] = {k: [] for k in KINDS}
        for r in range(args.rounds):
            for kind in KINDS:
                runs[kind].append(measure(kind, plan, work, args.steps))
                print(f"round {r + 1}/{args.rounds} {kind}: {runs[kind][-1]:,.0f} tokens/s",
                      file=sys.stderr, flush=True)
    med = {k: statistics.median(v) for k, v in runs.items()}
    out = {"hf_tokens_per_s": med["hf"], "hf_compiled_tokens_per_s": med["hf_compiled"],
           "meshplan_tokens_per_s": med["meshplan"],
           "meshplan_compiled_tokens_per_s": med["meshplan_compiled"],
           "ratio": med["meshplan"] / med["hf"],
           "compiled_ratio": med["meshplan_compiled"] / med["hf_compiled"],
           "compiled_over_hf_eager": med["meshplan_compiled"] / med["hf"],
           "rounds": args.rounds, "steps": args.steps, "runs": runs}
    if args.json:
        print(json.dumps(out))
    else:
        for k in KINDS:
            print(f"{k:<20} {med[k]:>10,.0f} tokens/s  (runs: {', '.join(f'{x:,.0f}' for x in runs[k])})")
        print(f"ratio {out['ratio']:.3f}   compiled_ratio {out['compiled_ratio']:.3f}   "
              f"meshplan compiled / HF eager {out['compiled_over_hf_eager']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
