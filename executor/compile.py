"""`train.compile: true`: torchtitan's fast path. Each transformer block's body is compiled
with torch.compile (inductor: C++ on CPU, Triton on GPU) after tensor and context
parallelism and before FSDP2 wraps it, as torchtitan's `parallelize_llama` orders them; the
token loss is compiled too in one process and the SPMD layouts (pipeline stages and a loss
in chunks, `layout.loss_chunks`, keep the eager loss), so the fp32 upcast of the logits
fuses into the cross entropy.
SDPA attention is traced into the block's graph; the varlen kernels, context parallelism's
K/V exchange and selective recompute's checkpoint stay eager
(`executor.model.Attention.core_inline`).

Refused before any process starts, in one line: mixture-of-experts models (routing has
data-dependent shapes), the DeepSpeed engine, and a CPU host without a C++ compiler.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from executor.loss import token_loss_sum

LossSum = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def compile_refusal(plan: Any, device_type: str | None = None) -> str | None:
    """Why `train.compile` cannot run this plan on `device_type` (default: this host's
    accelerator, else the CPU), in one line naming the field, or None."""
    if not plan.train.compile:
        return None
    if device_type is None:  # where the plan's ranks will run
        on_cpu = plan.cluster.accelerator == "cpu" or not torch.cuda.is_available()
        device_type = "cpu" if on_cpu else "cuda"
    if plan.model_spec().is_moe:
        return ("train.compile=true: mixture-of-experts layers route tokens with data-dependent "
                "shapes and run eager here; set train.compile=false for this model")
    if plan.layout.engine == "deepspeed":
        return ("train.compile=true: the DeepSpeed engine runs its model eager here; set "
                "train.compile=false or layout.engine=torch")
    if device_type == "cpu" and not (shutil.which("g++") or shutil.which("c++")):
        return ("train.compile=true: inductor's CPU backend needs a C++ compiler (g++) on PATH; "
                "install one or set train.compile=false")
    return None


def compile_blocks(chunk: nn.Module) -> int:
    """Compile the body of every transformer block `chunk` holds; returns how many."""
    layers = getattr(chunk, "layers", None)
    if layers is None:
        return 0
    for block in layers.values():
        block.compile_body()
    return len(layers)


def compiled_blocks(parts: list[nn.Module]) -> int:
    """Blocks of this rank's model parts whose body runs compiled (summary.json's
    `applied.compiled_blocks`)."""
    return sum(getattr(block, "compiled", None) is not None
               for part in parts for block in getattr(part, "layers", {}).values())


_compiled_loss: LossSum | None = None


def loss_sum_fn(compile_loss: bool) -> LossSum:
    """`token_loss_sum`, compiled once per process when `compile_loss`."""
    global _compiled_loss
    if not compile_loss:
        return token_loss_sum
    if _compiled_loss is None:
        _compiled_loss = torch.compile(token_loss_sum)
    return _compiled_loss
