"""Executor overhead: `meshplan run` tokens/s against a minimal hand-written PyTorch loop on
the same model and batch shape (target ratio >= 0.9), and data-pipeline tokens/s against
what training consumes (target >= 10x).

    .venv/bin/python benchmarks/executor_overhead.py [--model tiny] [--steps 30]
        [--batch 8] [--precision fp32] [--objective clm] [--threads N] [--json OUT]

Both loops run in this process, one after the other, twice each (A B A B), and the best
window of each counts, so a shared machine's noise hits both alike. `meshplan run`'s
throughput is measured by wall clock between step records (everything in the loop counts:
data, stability checks, metrics writing); the hand loop reuses one pre-built batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from costmodels.presets import get_preset  # noqa: E402
from executor.data.loader import LoaderConfig, PackedLoader  # noqa: E402
from executor.data.prepare import resolve_dataset  # noqa: E402
from executor.model import build_model  # noqa: E402
from executor.strategy import autocast_dtype  # noqa: E402
from executor.train import RunOptions, run_training  # noqa: E402
from planner.planfile import plan_from_dict  # noqa: E402


def make_plan(args: argparse.Namespace):
    spec = get_preset(args.model)
    return plan_from_dict({
        "model": spec.to_dict(),
        "cluster": {"accelerator": "cpu", "num_gpus": 1, "gpus_per_node": 1},
        "layout": {"micro_batch_size": args.batch, "global_batch_size": args.batch},
        "train": {"max_steps": args.steps, "precision": args.precision,
                  "objective": args.objective, "warmup_steps": 1},
        "checkpoint": {"every": 0},
    })


def hand_loop(plan, batch, steps: int, warmup: int) -> float:
    """The minimal loop: forward, token cross-entropy, backward, clip, AdamW, zero_grad."""
    spec = plan.model_spec()
    model = build_model(spec, plan.train.objective, seed=plan.train.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            foreach=True)
    dtype = autocast_dtype(plan.train.precision)
    tokens = batch.num_tokens
    t0 = 0.0
    for i in range(steps):
        if i == warmup:
            t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model(batch.input_ids, batch.position_ids, batch.doc_ids)
        loss = F.cross_entropy(logits.float().flatten(0, 1), batch.labels.flatten(),
                               ignore_index=-100)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return tokens * (steps - warmup) / (time.perf_counter() - t0)


def run_loop(plan, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        run_training(plan, tmp, RunOptions(progress=False, prepare_progress=False, quiet=True))
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    # Wall clock from the end of step `warmup` to the end of the last step.
    span = recs[-1]["wall_time"] - recs[warmup - 1]["wall_time"]
    tokens = recs[-1]["tokens"] - recs[warmup - 1]["tokens"]
    return tokens / span


def data_rate(loader: PackedLoader, batches: int) -> float:
    rows = loader.cfg.rows
    t0 = time.perf_counter()
    for i in range(batches):
        loader.global_batch(10_000 + i * rows)
    return batches * rows * loader.cfg.seq_len / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--objective", default="clm", choices=["clm", "mlm", "fim"])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    plan = make_plan(args)
    ds = resolve_dataset(plan, None, progress=False)
    cfg = LoaderConfig(seq_len=plan.model_spec().seq_len, rows=args.batch,
                       objective=args.objective, seed=plan.train.seed,
                       mixture=dict(plan.data.mixture), heldout_docs=plan.data.heldout_docs)
    loader = PackedLoader(ds, cfg)
    batch, _ = loader.global_batch(0)

    hand, run = [], []
    for _ in range(2):  # A B A B: both see the same machine conditions
        hand.append(hand_loop(plan, batch, args.steps, args.warmup))
        run.append(run_loop(plan, args.warmup))
    best_hand, best_run = max(hand), max(run)
    data = {obj: data_rate(PackedLoader(ds, LoaderConfig(**{**cfg.__dict__, "objective": obj})),
                           50) for obj in ("clm", "mlm", "fim")}
    out = {
        "model": args.model, "batch": args.batch, "seq_len": cfg.seq_len,
        "precision": args.precision, "objective": args.objective,
        "threads": torch.get_num_threads(),
        "hand_tokens_per_s": hand, "run_tokens_per_s": run,
        "run_over_hand": best_run / best_hand,
        "data_tokens_per_s": data,
        "data_over_consumption": {k: v / best_run for k, v in data.items()},
    }
    print(f"model {args.model}, batch {args.batch} x {cfg.seq_len}, {args.precision}, "
          f"{torch.get_num_threads()} threads, {args.steps - args.warmup} timed steps")
    print(f"hand-written loop : {best_hand:10.0f} tokens/s   (runs: "
          + ", ".join(f"{x:.0f}" for x in hand) + ")")
    print(f"meshplan run      : {best_run:10.0f} tokens/s   (runs: "
          + ", ".join(f"{x:.0f}" for x in run) + ")")
    print(f"ratio run / hand  : {out['run_over_hand']:.3f}   (target >= 0.9)")
    for obj, rate in data.items():
        ratio = rate / best_run
        print(f"data pipeline {obj:3s}: {rate:10.0f} tokens/s = {ratio:7.1f}x consumption "
              "(target >= 10x)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    ok = out["run_over_hand"] >= 0.9 and min(out["data_over_consumption"].values()) >= 10
    return 0 if ok and all(math.isfinite(x) for x in run + hand) else 1


if __name__ == "__main__":
    sys.exit(main())
