"""`meshplan bench`: measure this machine and write a profile the cost model reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from costmodels.errors import MeshplanError
from costmodels.hardware import get_accelerator
from costmodels.profile import dump_profile, load_profile


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="microbenchmark GEMMs, memory and collectives; write a profile")
    p.add_argument("--gpu", default="cpu", help="accelerator key the measurements describe (default cpu)")
    p.add_argument("--world", type=int, default=2, help="processes for the collective benchmark (1 = skip)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and sizes (about 20 s)")
    p.add_argument("--profile", help="profile to start from (default: the shipped one)")
    p.add_argument("--out", help="write the profile YAML here")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from executor.bench import run_bench

    key = get_accelerator(args.gpu).key
    if not 1 <= args.world <= 8:
        raise MeshplanError(f"--world={args.world} must be between 1 and 8")
    res = run_bench(quick=args.quick, world=args.world)
    base = load_profile(args.profile)
    hardware = dict(base.hardware)
    hardware[key] = res.hardware_override()
    prof = base.with_(hardware=hardware, source=f"{base.source}; hardware[{key}] measured by meshplan bench")
    if args.out:
        from planner.planfile import atomic_write_text

        atomic_write_text(Path(args.out), dump_profile(prof))
    if args.json:
        print(json.dumps({**res.to_dict(), "profile_path": args.out}))
        return 0
    print(f"device {res.device}, {res.threads} threads, {res.seconds:.1f} s")
    for g in res.gemm:
        print(f"  GEMM {g['dtype']:4} {g['m']}x{g['n']}x{g['k']}: {g['tflops'] * 1e3:8.1f} GFLOP/s")
    print(f"  memory (STREAM add): {res.memory_gb_s:.2f} GB/s")
    print(f"  elementwise (out-of-place add): {res.elementwise_gb_s:.2f} GB/s"
          + (f", {res.elementwise_gb_s_1core:.2f} GB/s on one thread" if res.elementwise_gb_s_1core else ""))
    for name, c in res.collectives.items():
        print(f"  {name:14} alpha {c['alpha_s'] * 1e6:8.1f} us   bus bandwidth {c['bus_gbps']:7.3f} GB/s ({c['backend']}, {c['world']} ranks)")
    if args.out:
        print(f"wrote {args.out}")
    return 0
