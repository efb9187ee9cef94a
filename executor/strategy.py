"""The seam between the training loop and how a step is executed.

`Strategy` is the single-process default: the model on one device, AdamW, autocast, the
default checkpoint format. A distributed strategy (`executor.parallel.factory`) subclasses
it and overrides placement, the collectives and the checkpoint hooks; the loop in
`executor.train` only ever talks to this interface.

Loss normalisation: every strategy returns sum(token losses) / global_target_tokens, with
`global_target_tokens` counted over the whole global batch (all micro-batches and all
data-parallel ranks), so gradient accumulation and any DP degree give the gradient of one
big batch.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from costmodels.errors import MeshplanError
from executor.attention import resolve_backend
from executor.checkpoint import read_extra_state, read_single_process, write_single_process
from executor.data.batch import Batch
from executor.loss import apply_loss_chunks, forward_loss_sum, token_loss_sum
from planner.planfile import Plan


def pick_device(plan: Plan) -> torch.device:
    """CUDA when the plan targets an accelerator and one is present, else the CPU."""
    if plan.cluster.accelerator != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision the executor trains in (`EXECUTOR_PRECISIONS`)."""
    from costmodels.capabilities import EXECUTOR_PRECISIONS

    if precision not in EXECUTOR_PRECISIONS:
        raise MeshplanError(
            f"train.precision={precision}: not supported by the executor; use "
            + " or ".join(EXECUTOR_PRECISIONS)
        )
    return torch.bfloat16 if precision == "bf16" else None


def build_optimizer(model: nn.Module, train: Any, device: torch.device,
                    params: list[torch.Tensor] | None = None,
                    decayed: list[bool] | None = None) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019) with decoupled weight decay on matrices and
    embeddings only; norms and biases are not decayed (GPT-3 practice, Brown et al. 2020
    App. B). Over `params` with their `decayed` flags when given (a ZeRO-1 partition's flat
    ranges), else over all of `model`'s parameters."""
    if params is None:
        params = [p for p in model.parameters() if p.requires_grad]
        decayed = [p.ndim >= 2 for p in params]
    assert decayed is not None and len(decayed) == len(params)
    # One group per (decay, device mesh): the foreach kernels take plain tensors or DTensors
    # of one mesh at a time (dense TP weights and MoE experts live on different meshes).
    keyed: dict[tuple[bool, int], list[torch.Tensor]] = {}
    for p, d in zip(params, decayed, strict=True):
        mesh = getattr(p, "device_mesh", None)
        keyed.setdefault((bool(d), 0 if mesh is None else id(mesh)), []).append(p)
    groups = [{"params": ps, "weight_decay": train.weight_decay if d else 0.0}
              for (d, _), ps in sorted(keyed.items(), key=lambda kv: not kv[0][0])]
    groups = groups or [{"params": [], "weight_decay": 0.0}]  # a partition may hold none
    # The fused AdamW kernel where this torch has one for the device (CUDA, and the CPU
    # since torch 2.4: ~4.6x faster than foreach on the `small` preset here), else foreach.
    kwargs: dict[str, Any] = {"fused": True} if device.type in _fused_adamw_devices() else {"foreach": True}
    return torch.optim.AdamW(
        groups, lr=train.lr, betas=(train.beta1, train.beta2), eps=train.eps, **kwargs
    )


def _fused_adamw_devices() -> tuple[str, ...]:
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # a torch without the registry: CUDA has had the kernel longest
        return ("cuda",)
    return tuple(_get_fused_kernels_supported_devices())


class Strategy:
    """Single process, one device."""

    rank: int = 0
    world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    is_logging_rank: bool = True

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.device = torch.device("cpu")
        self.amp_dtype: torch.dtype | None = None
        self.applied: dict[str, Any] = {}  # summary.json["applied"], see executor.applied
        self.loss_sum = token_loss_sum  # compiled under train.compile (`executor.compile`)
        self.loss_chunks = 1  # layout.loss_chunks as applied (`executor.loss`)

    # ------------------------------------------------------------------ setup
    def setup(self, model: nn.Module, plan: Plan) -> None:
        self.device = pick_device(plan)
        self.amp_dtype = autocast_dtype(plan.train.precision)
        model.attention_backend = resolve_backend(plan.train.attention_backend, self.device)
        from costmodels.capabilities import unsupported
        from executor.applied import applied_layout, check_applied
        from executor.compile import compile_blocks, compile_refusal, compiled_blocks, loss_sum_fn

        lay = plan.layout_spec()
        reason = unsupported(plan.model_spec(), lay) or compile_refusal(plan, self.device.type)
        if reason is not None:
            raise MeshplanError(reason)
        recomputed = model.set_recompute(lay.recompute, lay.recompute_layers) \
            if hasattr(model, "set_recompute") else 0
        if plan.train.compile:
            compile_blocks(model)
        self.loss_sum = loss_sum_fn(plan.train.compile)
        blocks = len(model.layers) if hasattr(model, "layers") else 0
        self.applied = applied_layout(lay, {}, "none", "none", recomputed, blocks, "none",
                                      lay.grad_accum)
        if lay.world_size == 1:  # (tests run multi-rank plans here as their one-process reference)
            check_applied(lay, self.applied)
        self.applied["compiled_blocks"] = compiled_blocks([model])
        self.loss_chunks = self.applied["loss_chunks"] = apply_loss_chunks([model], lay.loss_chunks)
        from executor.moe import configure_moe

        configure_moe([model], plan.train, 1.0 / max(lay.global_batch // lay.micro_batch, 1))
        self.model = model.to(self.device)
        self.optimizer = build_optimizer(self.model, plan.train, self.device)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ data
    def local_rows(self, global_batch: Batch) -> Batch:
        """This data-parallel rank's contiguous share of the global batch's rows."""
        if self.dp_size == 1:
            return global_batch
        per = global_batch.rows // self.dp_size
        return global_batch.select(slice(self.dp_rank * per, (self.dp_rank + 1) * per))

    # ------------------------------------------------------------------ step
    def _micro_loss_sum(self, mb: Batch) -> torch.Tensor:
        assert self.model is not None
        mb = mb.to(self.device, non_blocking=True)
        return forward_loss_sum(self.model, self.loss_sum, self.loss_chunks, self.autocast(),
                                mb.input_ids, mb.position_ids, mb.doc_ids, mb.labels) * mb.loss_weight

    def forward_backward(self, micro_batches: list[Batch], global_target_tokens: int) -> torch.Tensor:
        """Backward of sum(token losses) / global_target_tokens over the micro-batches;
        returns that loss (for one process, already the global loss)."""
        denom = float(max(1, global_target_tokens))
        total = torch.zeros((), device=self.device)
        for mb in micro_batches:
            loss_sum = self._micro_loss_sum(mb)
            (loss_sum / denom).backward()
            total += loss_sum.detach()
        return total / denom

    @torch.no_grad()
    def eval_loss(self, micro_batches: list[Batch], global_target_tokens: int) -> float:
        """Mean token loss without gradients (held-out evaluation)."""
        assert self.model is not None
        self.model.eval()
        try:
            total = sum(float(self._micro_loss_sum(mb)) for mb in micro_batches)
        finally:
            self.model.train()
        return self.all_reduce_sum(total) / max(1, global_target_tokens)

    def moe_metrics(self) -> dict[str, Any]:
        """Routing statistics of the step (`executor.moe.stats_metrics`); {} for dense models."""
        from executor.moe import collect_stats, stats_metrics

        parts = self.model_parts()
        spec = getattr(parts[0], "spec", None)
        if spec is None or not spec.is_moe:
            return {}
        stats = self.reduce_moe_stats(collect_stats(parts, spec.layers, spec.num_experts))
        return stats_metrics(stats, spec.num_experts, replicas=self.moe_stat_replicas)

    moe_stat_replicas = 1  # ranks that route the same tokens (the TP group)

    def reduce_moe_stats(self, stats: torch.Tensor) -> torch.Tensor:
        """Sum the per-rank routing statistics over every rank (one process: as is)."""
        return stats

    def model_parts(self) -> list[nn.Module]:
        """The modules this rank holds (one, or several pipeline chunks)."""
        assert self.model is not None
        return [self.model]

    def parameters(self) -> Iterator[nn.Parameter]:
        assert self.model is not None
        return (p for p in self.model.parameters() if p.grad is not None)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Global L2 norm of the gradients before clipping; clips to `max_norm` if > 0
        (Pascanu et al. 2013, §3.2)."""
        params = list(self.parameters())
        if not params:
            return 0.0
        limit = max_norm if max_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, limit, foreach=True)
        return float(norm)

    def set_lr(self, lr: float) -> None:
        assert self.optimizer is not None
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def optimizer_step(self) -> None:
        assert self.optimizer is not None
        self.optimizer.step()

    def zero_grad(self) -> None:
        assert self.optimizer is not None
        self.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ collectives
    def all_reduce_max(self, x: float) -> float:
        return x

    def all_reduce_sum(self, x: float) -> float:
        return x

    def barrier(self) -> None:
        return None

    # ------------------------------------------------------------------ state
    def model_state_dict(self) -> dict[str, torch.Tensor]:
        assert self.model is not None
        return self.model.state_dict()

    def load_model_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        assert self.model is not None
        self.model.load_state_dict(state)

    def optim_state_dict(self) -> dict[str, Any]:
        assert self.optimizer is not None
        return self.optimizer.state_dict()

    def load_optim_state_dict(self, state: dict[str, Any]) -> None:
        assert self.optimizer is not None
        self.optimizer.load_state_dict(state)

    def save_checkpoint(self, directory: Path, extra_state: dict[str, Any]) -> None:
        """Write this strategy's checkpoint files into `directory` (a temporary folder the
        manager renames into place once complete)."""
        write_single_process(
            Path(directory), self.model_state_dict(), self.optim_state_dict(), extra_state
        )

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        from executor.parallel.dcp import is_dcp_checkpoint

        if is_dcp_checkpoint(directory):  # saved by a multi-process layout: reshard to one
            from executor.parallel.dcp import load_into_single_process

            assert self.model is not None and self.optimizer is not None
            load_into_single_process(self.model, self.optimizer, directory)
            return read_extra_state(Path(directory))
        model_state, optim_state = read_single_process(Path(directory), self.device)
        try:
            self.load_model_state_dict(model_state)
            self.load_optim_state_dict(optim_state)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise MeshplanError(
                f"{directory}: checkpoint does not fit this plan's model ({str(exc).splitlines()[0]}); "
                "use a new --out for a different model"
            ) from None
        return read_extra_state(Path(directory))

    def peak_memory_bytes(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB

    def teardown(self) -> None:
        return None


def make_strategy(plan: Plan) -> Strategy:
    """`Strategy()` for a world size of 1, else the distributed factory's choice."""
    if plan.layout.world_size == 1 and plan.layout.engine == "torch":
        return Strategy()
    try:
        from executor.parallel.factory import make_strategy as mk
    except ModuleNotFoundError:
        raise MeshplanError(
            f"layout: world size {plan.layout.world_size} / engine {plan.layout.engine} needs "
            "executor.parallel, which this installation lacks; use a 1-process torch layout"
        ) from None
    return mk(plan)
