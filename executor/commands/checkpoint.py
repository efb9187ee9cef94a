"""`meshplan checkpoint verify DIR`: check checkpoints against their manifests."""

from __future__ import annotations

import argparse
from pathlib import Path

from costmodels.errors import MeshplanError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("checkpoint", help="inspect checkpoints")
    sub = p.add_subparsers(dest="checkpoint_command", metavar="ACTION")
    sub.required = True
    v = sub.add_parser(
        "verify", help="verify manifests and sha256 checksums",
        description="DIR is one checkpoint (step_NNNNNN), a checkpoints folder, or a run "
                    "folder. Exit status 1 when any checkpoint fails.",
    )
    v.add_argument("dir")
    v.set_defaults(func=handle_verify)


def handle_verify(args: argparse.Namespace) -> int:
    from executor.checkpoint import MANIFEST, CheckpointError, CheckpointManager, verify_checkpoint

    d = Path(args.dir)
    if not d.is_dir():
        raise MeshplanError(f"{d}: not a folder; pass a run, checkpoints or step_N folder")
    if (d / MANIFEST).exists() or d.name.startswith("step_"):
        targets = [d]
    else:
        root = d / "checkpoints" if (d / "checkpoints").is_dir() else d
        targets = [p for _, p in CheckpointManager._step_dirs(root)]
        if not targets:
            raise MeshplanError(f"{d}: holds no checkpoints (step_NNNNNN folders)")
    bad = 0
    for t in targets:
        try:
            step = verify_checkpoint(t)
            print(f"ok      {t} (step {step})")
        except CheckpointError as exc:
            bad += 1
            print(f"FAILED  {exc}")
    return 1 if bad else 0
