"""Shared CLI arguments: model / cluster / layout flags, and building specs from them."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from costmodels.errors import MeshplanError
from costmodels.hardware import get_accelerator
from costmodels.hf_config import hf_config_fields
from costmodels.presets import get_preset
from costmodels.specs import ClusterSpec, ModelSpec, SpecError
from planner.planfile import read_yaml_file
from planner.user_files import read_user_file


def model_from_hf_config(path: str | Path, seq_len: int | None = None) -> ModelSpec:
    """Read a Hugging Face LLaMA / Mistral / Mixtral / Qwen(-MoE) / GPT-NeoX-style
    `config.json` from disk."""
    p = Path(path)
    cfg = read_user_file(p, "--hf-config", "pass the path of a config.json", "json")
    if not isinstance(cfg, dict):
        raise SpecError(f"--hf-config {p}: config.json must hold a JSON object")
    return ModelSpec(**hf_config_fields(cfg, f"--hf-config {p}", seq_len,
                                        default_name=p.parent.name or "hf-model"))


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", help="preset name (e.g. llama3-8b, tiny) ")
    g.add_argument("--hf-config", help="a Hugging Face config.json on disk")
    g.add_argument("--seq-len", type=int, help="sequence length (default: the model's)")


def add_cluster_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("cluster")
    g.add_argument("--gpu", default="h100-sxm", help="accelerator key (h100-sxm, a100-80gb, cpu, ...)")
    g.add_argument("--gpus", type=int, default=None, help="total GPU (or CPU process) count")
    g.add_argument("--gpus-per-node", type=int, default=None, help="default: the catalog's (8; cpu: 1)")
    g.add_argument("--nvlink-gbps", type=float, default=0.0, help="scale-up GB/s per GPU per direction")
    g.add_argument("--nic-gbps", type=float, default=0.0, help="scale-out GB/s per GPU per direction")


def add_old_available_arg(g: argparse._ArgumentGroup, example: str) -> None:
    """`--old-available D=T,...` (plan and size): the unique tokens of each old domain, which
    the replay share's epochs are counted against."""
    g.add_argument("--old-available", metavar="D=T,...",
                   help=f"unique tokens available per old domain, e.g. {example} (replay epochs)")


def add_framework_arg(p: argparse.ArgumentParser) -> None:
    from costmodels.stacks import STACKS

    p.add_argument(
        "--framework", choices=sorted(STACKS), default="meshplan",
        help="training stack the prediction is for: attention kernel, fusion, overlap and "
             "model-state bytes follow it (default: meshplan's executor)",
    )


def model_from_args(args: argparse.Namespace, config: dict[str, Any] | None = None) -> ModelSpec:
    config = config or {}
    if args.hf_config:
        model = model_from_hf_config(args.hf_config, args.seq_len)
    elif args.model:
        model = get_preset(args.model)
    elif "model" in config:
        m = config["model"]
        model = get_preset(m) if isinstance(m, str) else ModelSpec.from_dict(m)
    else:
        raise MeshplanError("no model given: pass --model PRESET or --hf-config PATH")
    if args.seq_len is not None:
        if args.seq_len <= 0:
            raise MeshplanError(f"--seq-len={args.seq_len} must be positive")
        model = model.with_(seq_len=args.seq_len)
    return model


def cluster_from_args(args: argparse.Namespace, gpus: int | None = None) -> ClusterSpec:
    acc = get_accelerator(args.gpu)
    n = gpus or args.gpus
    if n is None:
        raise MeshplanError("--gpus is required (the number of GPUs / processes)")
    if n <= 0:
        raise MeshplanError(f"--gpus={n} must be a positive integer")
    per_node = args.gpus_per_node or acc.gpus_per_node
    if per_node <= 0:
        raise MeshplanError(f"--gpus-per-node={per_node} must be positive")
    for flag, v in (("--nvlink-gbps", args.nvlink_gbps), ("--nic-gbps", args.nic_gbps)):
        if not (math.isfinite(v) and v >= 0):
            raise MeshplanError(f"{flag}={v}: must be a finite number >= 0 (0 = the catalog's)")
    return ClusterSpec(
        acc.key, n, gpus_per_node=min(per_node, n) if n < per_node else per_node,
        scaleup_gbps=args.nvlink_gbps, scaleout_gbps=args.nic_gbps,
    )


def load_yaml_config(path: str | None) -> dict[str, Any]:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise MeshplanError(f"--config {p}: file not found")
    data = read_yaml_file(p, f"--config {p}: not valid YAML")
    if not isinstance(data, dict):
        raise MeshplanError(f"--config {p}: expected a mapping with model / cluster / layout keys")
    return data


