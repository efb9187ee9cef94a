"""The DeepSpeed engine (`layout.engine: deepspeed`): ZeRO stage 0-3 from `layout.sharding`.

The engine's config is exactly the planner's emitted `deepspeed_config.json`
(`planner.emitters.deepspeed_config(plan, include_scheduler=False)`: the executor drives the
plan's LR curve itself through `set_lr`, which is what that function's docstring asks). The
optimizer block of that config builds the optimizer; the model parameters are handed over as
the executor's two AdamW groups (matrices decayed, norms/biases not), so every engine
updates exactly as the one-process run does. On the CPU: `DS_ACCELERATOR=cpu`, gloo,
`torch_adam: true` (from the config).

One optimizer step is DeepSpeed's micro-step protocol: `backward` + `step` per micro-batch;
the steps before the accumulation boundary only count, the boundary reduces gradients
(reduce-scatter / all-reduce by stage) and the final `step` updates and clips by the
config's `gradient_clipping`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from costmodels.errors import MeshplanError
from costmodels.specs import ZERO_STAGE
from executor.attention import resolve_backend
from executor.checkpoint import STATE_FILE, read_extra_state
from executor.data.batch import Batch
from executor.loss import forward_loss_sum
from executor.parallel.base import DistributedStrategy, token_loss_sum
from planner.planfile import Plan

CHECKPOINT_TAG = "deepspeed"


def deepspeed_available() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def engine_config(plan: Plan) -> dict[str, Any]:
    """The planner's DeepSpeed JSON for this plan (the single shared builder)."""
    from planner.emitters import deepspeed_config

    return deepspeed_config(plan, include_scheduler=False)


class DeepSpeedStrategy(DistributedStrategy):
    def __init__(self, plan: Plan) -> None:
        if not deepspeed_available():
            raise MeshplanError(
                "layout.engine=deepspeed: DeepSpeed is not installed; "
                "pip install 'meshplan[deepspeed]' or set layout.engine=torch"
            )
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        super().__init__(plan)
        self.stage = ZERO_STAGE[plan.layout.sharding]
        self.name = f"deepspeed-zero{self.stage}"
        self.grad_sync = "deepspeed"
        self.engine: Any = None
        self._pending_boundary = False

    def setup(self, model: nn.Module, plan: Plan) -> None:
        import deepspeed

        model.attention_backend = resolve_backend(plan.train.attention_backend, self.device)
        model.to(self.device)
        self._inner = model
        self.set_recompute([model])
        deepspeed.init_distributed(dist_backend="gloo" if self.device.type == "cpu" else "nccl")
        decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
        groups = [
            {"params": decay, "weight_decay": plan.train.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        self.config = engine_config(plan)
        self.engine, optimizer, _, _ = deepspeed.initialize(
            model=model, model_parameters=groups, config=self.config,
            dist_init_required=False,
        )
        self.model = self.engine
        self.optimizer = optimizer
        self.optimizers = [optimizer]
        self.record_applied()

    def model_parts(self) -> list[nn.Module]:
        return [self._inner]

    def sharding_applied(self) -> str:
        return ("none", "zero1", "zero2", "zero3")[int(self.engine.zero_optimization_stage())]

    def forward_backward(self, micro_batches: list[Batch], global_target_tokens: int) -> torch.Tensor:
        self.begin_step_accounting()
        denom = float(max(global_target_tokens, 1))
        gas = int(self.config["gradient_accumulation_steps"])
        if len(micro_batches) != gas:
            raise MeshplanError(
                f"deepspeed: {len(micro_batches)} micro-batches but gradient_accumulation_steps"
                f"={gas}; the plan's batch fields disagree"
            )
        total = torch.zeros((), dtype=torch.float32)
        with self.counting():
            for i, mb in enumerate(micro_batches):
                mb = mb.to(self.device)
                loss_sum = forward_loss_sum(
                    self.engine, token_loss_sum, self.loss_chunks, self.autocast(), mb.input_ids,
                    mb.position_ids, mb.doc_ids, mb.labels) * float(mb.loss_weight)
                self.engine.backward(loss_sum * (self.grad_replicas / denom), scale_wrt_gas=False)
                if i < len(micro_batches) - 1:
                    self.engine.step()  # not a boundary: DeepSpeed only counts the micro-step
                total += loss_sum.detach().float().cpu() / denom
            self._pending_boundary = True
            return self._sum_loss(total)

    def clip_grad_norm(self, max_norm: float) -> float:
        """The global gradient norm DeepSpeed is about to clip with (config clipping)."""
        opt = self.engine.optimizer
        with self.counting():
            if self.stage in (1, 2):
                norm = opt.scaled_global_norm()
            elif self.stage == 3:
                from deepspeed.runtime.utils import combine_grad_norm_groups

                norm = combine_grad_norm_groups(opt._get_norm_groups())
            else:
                sq = sum(float(p.grad.double().pow(2).sum()) for p in self._inner.parameters()
                         if p.grad is not None)
                norm = math.sqrt(sq)
        return float(norm)

    def set_lr(self, lr: float) -> None:
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr

    def optimizer_step(self) -> None:
        with self.counting():
            self.engine.step()
        self._pending_boundary = False

    def zero_grad(self) -> None:
        if self._pending_boundary:  # a skipped step: drop the reduced gradients, keep count
            self.engine.optimizer.zero_grad(set_to_none=True)
            self.engine.micro_steps += 1
            self.engine.global_steps += 1
            self._pending_boundary = False

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: Any, extra_state: dict[str, Any]) -> None:
        directory = Path(directory)
        self.engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG, save_latest=False)
        if self.rank == 0:
            extra = dict(extra_state)
            extra["layout"] = {"world_size": self.world_size, **self.dims.degrees(),
                               "strategy": self.name, "format": "deepspeed"}
            (directory / STATE_FILE).write_text(json.dumps(extra))

    def load_checkpoint(self, directory: Any) -> dict[str, Any]:
        directory = Path(directory)
        if not (directory / CHECKPOINT_TAG).is_dir():
            raise MeshplanError(
                f"{directory}: not a DeepSpeed checkpoint; resume it with layout.engine=torch "
                "or use a new --out"
            )
        path, _ = self.engine.load_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        if path is None:
            raise MeshplanError(f"{directory}: DeepSpeed could not load this checkpoint")
        return read_extra_state(directory)

    def model_state_dict(self) -> dict[str, Any]:
        return self.engine.module.state_dict()

    def load_model_state_dict(self, state: dict[str, Any]) -> None:
        self.engine.module.load_state_dict(state)
