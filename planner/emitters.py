"""Launch files written next to a plan, one module per target (`planner.emit.*`) behind this
registry: torchrun, DeepSpeed, Megatron-LM, torchtitan, Megatron-Bridge and SLURM.

A file whose tool cannot run the plan exactly carries the one-line reason instead
(`not_emitted`). `write_launch_files(plan, out_dir)` renders them all, then writes each
atomically, and returns their paths; `TARGETS` lists them (the dashboard and `plan --out`
show this list).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from costmodels.errors import MeshplanError
from planner.atomic import atomic_write_text
from planner.emit.bridge import BRIDGE_FILE, bridge_overrides_text
from planner.emit.common import file_header
from planner.emit.deepspeed import (
    DEEPSPEED_FILE,
    deepspeed_config,
    deepspeed_file,
    deepspeed_unsupported,
)
from planner.emit.megatron import (
    MEGATRON_FILE,
    megatron_args,
    megatron_args_text,
    megatron_layout_string,
    megatron_unsupported,
    pipeline_layout_string,
)
from planner.emit.slurm import SLURM_FILE, slurm_script
from planner.emit.torchrun import TORCHRUN_FILE, torchrun_command, torchrun_script
from planner.emit.torchtitan import TORCHTITAN_FILE, torchtitan_toml
from planner.planfile import Plan

__all__ = [  # the per-target functions callers reach through the registry module
    "BRIDGE_FILE", "DEEPSPEED_FILE", "MEGATRON_FILE", "SLURM_FILE", "TARGETS", "TORCHRUN_FILE",
    "TORCHTITAN_FILE", "deepspeed_config", "deepspeed_unsupported", "megatron_args",
    "megatron_args_text", "megatron_unsupported", "pipeline_layout_string",
    "render_launch_files", "slurm_script", "torchrun_command", "torchrun_script",
    "write_launch_files",
]


@dataclass(frozen=True)
class Target:
    """One launch file: what reads it, its name, and how a plan renders into it."""

    tool: str
    file: str
    render: Callable[[Plan, Path], str]
    executable: bool = False


def _torchtitan(plan: Plan, _out: Path) -> str:
    return torchtitan_toml(plan, file_header(plan, "torchtitan job config"))


def _bridge(plan: Plan, _out: Path) -> str:
    return bridge_overrides_text(plan, file_header(plan, "Megatron-Bridge overrides"),
                                 megatron_unsupported(plan), megatron_layout_string(plan))


TARGETS: tuple[Target, ...] = (
    Target("torchrun (meshplan's executor)", TORCHRUN_FILE, lambda p, _o: torchrun_script(p), True),
    Target("DeepSpeed", DEEPSPEED_FILE, lambda p, _o: deepspeed_file(p)),
    Target("Megatron-LM pretrain_gpt.py", MEGATRON_FILE, lambda p, _o: megatron_args_text(p)),
    Target("torchtitan", TORCHTITAN_FILE, _torchtitan),
    Target("Megatron-Bridge / NeMo 2", BRIDGE_FILE, _bridge),
    Target("SLURM sbatch", SLURM_FILE, lambda p, out: slurm_script(p, plan_dir=out), True),
)


def render_launch_files(plan: Plan, out_dir: str | Path = ".") -> dict[str, str]:
    """File name -> contents, without touching the disk."""
    return {t.file: t.render(plan, Path(out_dir)) for t in TARGETS}


def write_launch_files(plan: Plan, out_dir: str | Path) -> list[Path]:
    """Write the launch files into `out_dir` (next to plan.yaml); return their paths."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise MeshplanError(f"--out {out}: exists and is not a directory; pass a directory")
    files = render_launch_files(plan, out)  # render everything first: no partial sets
    executable = {t.file for t in TARGETS if t.executable}
    paths: list[Path] = []
    for name, text in files.items():
        p = out / name
        atomic_write_text(p, text, 0o755 if name in executable else 0o644)
        paths.append(p)
    return paths
