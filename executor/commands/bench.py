"""`meshplan bench`: measure this machine and write a profile the cost model reads."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from costmodels.errors import MeshplanError
from costmodels.hardware import get_accelerator
from costmodels.profile import dump_profile
from planner.profiles import load_profile, machine_hardware, machine_profile_path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="microbenchmark GEMMs, memory and collectives; write a profile")
    p.add_argument("--gpu", default="cpu", help="accelerator key the measurements describe (default cpu)")
    p.add_argument("--world", type=int, default=2, help="processes for the collective benchmark (1 = skip)")
    p.add_argument("--quick", action="store_true", help="fewer shapes and sizes (about 20 s)")
    p.add_argument("--profile", help="profile to start from (default: the shipped one)")
    p.add_argument("--out", help="also write the whole profile YAML here")
    p.add_argument("--no-save", action="store_true",
                   help="do not record the measurements as this machine's (see below)")
    p.epilog = ("The measurements are kept as this machine's profile ($MESHPLAN_MACHINE_PROFILE, "
                "else ~/.cache/meshplan/machine.yaml): commands run without --profile use them "
                "in place of the catalog's figures for that accelerator.")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def machine_hardware_or_empty() -> dict[str, dict[str, float]]:
    """What is already recorded for this machine; an unreadable file is replaced."""
    try:
        return machine_hardware()
    except MeshplanError:
        return {}


def run(args: argparse.Namespace) -> int:
    from executor.bench import run_bench

    key = get_accelerator(args.gpu).key
    if not 1 <= args.world <= 8:
        raise MeshplanError(f"--world={args.world} must be between 1 and 8")
    res = run_bench(quick=args.quick, world=args.world)
    base = load_profile(args.profile, machine=False)
    hardware = dict(base.hardware)
    hardware[key] = res.hardware_override()
    prof = base.with_(hardware=hardware, source=f"{base.source}; hardware[{key}] measured by meshplan bench")
    from planner.atomic import atomic_write_text

    if args.out:
        atomic_write_text(Path(args.out), dump_profile(prof))
    saved = None
    if not args.no_save:
        saved = machine_profile_path()
        measured = {**machine_hardware_or_empty(), key: hardware[key]}
        atomic_write_text(saved, yaml.safe_dump({"hardware": measured}, sort_keys=False))
    if args.json:
        print(json.dumps({**res.to_dict(), "profile_path": args.out,
                          "machine_profile": str(saved) if saved else None}))
        return 0
    print(f"device {res.device}, {res.threads} threads, {res.seconds:.1f} s")
    for g in res.gemm:
        print(f"  GEMM {g['dtype']:4} {g['m']}x{g['n']}x{g['k']}: {g['tflops'] * 1e3:8.1f} GFLOP/s")
    print(f"  memory (STREAM add): {res.memory_gb_s:.2f} GB/s")
    print(f"  elementwise (out-of-place add): {res.elementwise_gb_s:.2f} GB/s"
          + (f", {res.elementwise_gb_s_1core:.2f} GB/s on one thread" if res.elementwise_gb_s_1core else ""))
    if res.probe_fp32_tflops:
        print(f"  host-speed probe (median between the phases): {res.probe_fp32_tflops * 1e3:.1f} GFLOP/s")
    for name, c in res.collectives.items():
        print(f"  {name:14} alpha {c['alpha_s'] * 1e6:8.1f} us   bus bandwidth {c['bus_gbps']:7.3f} GB/s ({c['backend']}, {c['world']} ranks)")
    if args.out:
        print(f"wrote {args.out}")
    if saved:
        print(f"recorded as this machine's {key} figures: {saved}")
    return 0
