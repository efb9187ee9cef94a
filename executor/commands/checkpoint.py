"""`meshplan checkpoint verify DIR`: check checkpoints against their manifests.
`meshplan checkpoint export-hf DIR --out HF_DIR`: write a run's model as a Hugging Face
LLaMA-style folder (config.json + model.safetensors)."""

from __future__ import annotations

import argparse
from pathlib import Path

from costmodels.errors import MeshplanError
from planner.cli import add_action_command


def register(subparsers: argparse._SubParsersAction) -> None:
    sub = add_action_command(subparsers, "checkpoint", "inspect checkpoints")
    v = sub.add_parser(
        "verify", help="verify manifests and sha256 checksums",
        description="DIR is one checkpoint (step_NNNNNN), a checkpoints folder, or a run "
                    "folder. Exit status 1 when any checkpoint fails.",
    )
    v.add_argument("dir")
    v.set_defaults(func=handle_verify)
    e = sub.add_parser(
        "export-hf", help="write a checkpoint's model as config.json + model.safetensors",
        description="DIR is a run folder (its newest intact checkpoint), a checkpoints "
                    "folder, or one step_NNNNNN checkpoint.",
    )
    e.add_argument("dir")
    e.add_argument("--out", required=True, help="folder for config.json + model.safetensors")
    e.set_defaults(func=handle_export_hf)


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


def handle_export_hf(args: argparse.Namespace) -> int:
    from costmodels.specs import ModelSpec, SpecError
    from executor.continual import load_weights, resolve_init, source_state_dict
    from executor.hf_format import export_hf
    from executor.model import build_model

    src = resolve_init(args.dir)
    if src.kind != "meshplan":
        raise MeshplanError(f"{args.dir}: already a Hugging Face folder; nothing to export")
    model_dict = src.extra.get("plan", {}).get("model")
    if not model_dict:
        raise MeshplanError(f"{src.path}: state.json records no model; cannot export it")
    try:
        spec = ModelSpec.from_dict(model_dict)
    except SpecError as exc:
        raise MeshplanError(f"{src.path}: recorded model is invalid ({exc})") from None
    model = build_model(spec)
    load_weights(model, source_state_dict(src), str(src.path))
    out = export_hf(model, spec, args.out)
    print(f"wrote {out}/config.json and {out}/model.safetensors (step {src.step})")
    return 0
