"""The sections of a plan file (`planner.planfile.Plan`), each a validated pydantic model,
and the one mapping between the cost model's specs and a plan's `cluster` and `layout`
sections (`cluster_section`; `LAYOUT_PLAN_KEYS` for `layout_section` and `LayoutSection.spec`)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from costmodels.errors import MeshplanError
from costmodels.specs import ClusterSpec, Layout, Precision, Schedule, SpecError


class PlanError(MeshplanError):
    """A user-facing plan error: one line naming the field and the fix."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ClusterSection(Section):
    accelerator: str = "cpu"
    num_gpus: int = Field(1, ge=1)
    gpus_per_node: int = Field(1, ge=1)
    num_nodes: int = Field(1, ge=1)
    # The links the plan was priced with (GB/s per GPU per direction) and the scale-up
    # domain size; 0 = the accelerator catalog's (`costmodels.hardware`).
    scaleup_gbps: float = Field(0.0, ge=0)
    scaleout_gbps: float = Field(0.0, ge=0)
    nvlink_domain: int = Field(0, ge=0)

    def spec(self) -> ClusterSpec:
        """The cost model's cluster for this section."""
        try:
            return ClusterSpec(self.accelerator, self.num_gpus,
                               gpus_per_node=min(self.gpus_per_node, self.num_gpus),
                               scaleup_gbps=self.scaleup_gbps, scaleout_gbps=self.scaleout_gbps,
                               nvlink_domain=self.nvlink_domain)
        except SpecError as exc:
            raise PlanError(str(exc)) from None


def cluster_section(cluster: ClusterSpec) -> dict[str, Any]:
    """The plan's `cluster:` section for a cost-model cluster, its links resolved to the
    numbers it was priced with (the catalog's where the cluster left them at 0)."""
    from costmodels.hardware import get_accelerator

    acc = get_accelerator(cluster.accelerator)
    return {
        "accelerator": cluster.accelerator, "num_gpus": cluster.num_gpus,
        "gpus_per_node": cluster.gpus_per_node, "num_nodes": cluster.num_nodes,
        "scaleup_gbps": float(cluster.scaleup_gbps or acc.scaleup_gbps),
        "scaleout_gbps": float(cluster.scaleout_gbps or acc.scaleout_gbps),
        "nvlink_domain": int(cluster.domain_size),
    }


# The one Layout <-> plan mapping: a `Layout` field's key in the plan's `layout:` section
# where the names differ; the precision is the train section's (`train.precision`).
LAYOUT_PLAN_KEYS = {"micro_batch": "micro_batch_size", "global_batch": "global_batch_size"}
LAYOUT_FIELDS = tuple(f.name for f in fields(Layout) if f.name != "precision")
LAYOUT_PLAN_FIELDS = tuple(LAYOUT_PLAN_KEYS.get(f, f) for f in LAYOUT_FIELDS)  # their plan keys


def layout_section(lay: Layout, engine: str | None = None) -> dict[str, Any]:
    """The plan's `layout:` section for a cost-model layout (run by `engine`, else its own)."""
    out = {LAYOUT_PLAN_KEYS.get(f, f): getattr(lay, f) for f in LAYOUT_FIELDS}
    out["engine"] = engine or lay.engine
    return out


class LayoutSection(Section):
    tp: int = Field(1, ge=1)
    pp: int = Field(1, ge=1)
    dp: int = Field(1, ge=1)
    cp: int = Field(1, ge=1)
    ep: int = Field(1, ge=1)
    vpp: int = Field(1, ge=1)
    sharding: Literal["none", "zero1", "zero2", "zero3"] = "none"
    engine: Literal["torch", "deepspeed"] = "torch"
    micro_batch_size: int = Field(1, ge=1)
    global_batch_size: int = Field(1, ge=1)
    recompute: Literal["none", "selective", "full"] = "none"
    sequence_parallel: bool = False
    schedule: Schedule = "1f1b"  # `costmodels.pipeline.SCHEDULE_NAMES`
    dp_shard: int = Field(0, ge=0)  # HSDP sharding-group size; 0 = all of dp
    recompute_layers: int = Field(0, ge=0)  # with recompute=full: layers per pipeline rank; 0 = all
    loss_chunks: int = Field(1, ge=1)  # cross entropy in this many sequence chunks (`executor.loss`)

    def spec(self, precision: Precision = "bf16") -> Layout:
        """The cost model's layout for this section (`precision`: the train section's)."""
        try:
            return Layout(**{f: getattr(self, LAYOUT_PLAN_KEYS.get(f, f)) for f in LAYOUT_FIELDS},
                          precision=precision)
        except SpecError as exc:
            raise PlanError(str(exc)) from None

    @property
    def world_size(self) -> int:
        return self.spec().world_size

    @property
    def grad_accum(self) -> int:
        return self.spec().grad_accum


class TrainSection(Section):
    objective: Literal["clm", "mlm", "fim"] = "clm"
    max_steps: int = Field(100, ge=1)
    lr: float = Field(3e-4, gt=0)
    min_lr: float | None = Field(None, ge=0)  # default lr / 10
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: int = Field(0, ge=0)  # 0 = warmup_frac * max_steps
    warmup_frac: float = Field(0.02, ge=0, le=1)
    wsd_decay_frac: float = Field(0.2, ge=0, le=1)  # last share of steps that decays
    weight_decay: float = Field(0.1, ge=0)
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0)
    precision: Literal["bf16", "fp32", "fp16", "fp8"] = "bf16"
    seed: int = Field(1234, ge=0)
    mlm_probability: float = Field(0.15, gt=0, lt=1)
    fim_rate: float = Field(0.5, ge=0, le=1)
    fim_spm_rate: float = Field(0.5, ge=0, le=1)
    log_every: int = Field(1, ge=1)
    eval_every: int = Field(0, ge=0)  # 0 = no periodic held-out evaluation
    eval_batches: int = Field(4, ge=1)
    # Domains whose held-out loss is logged as `eval_loss_<domain>` every eval_every steps;
    # empty = every domain of the dataset (old and new domains of a continual run).
    eval_domains: list[str] = Field(default_factory=list)
    attention_backend: Literal["auto", "flash", "torch_varlen", "sdpa"] = "auto"
    # torch.compile each transformer block's body and the token loss (`executor.compile`)
    compile: bool = False
    # After each step (outside its timer) the logging rank times a fixed GEMM on every core
    # while the other ranks wait (`executor.host_probe`): the host's speed
    # during the run, which calibration prices the run at. For shared CPU hosts.
    host_probe: bool = False
    # Mixture-of-experts training: the load-balancing loss (Switch, Fedus et al. 2022 eq. 4;
    # 0.01 there, Mixtral's router_aux_loss_coef 0.02) and router z-loss (ST-MoE, Zoph et al.
    # 2022 eq. 5; 1e-3 there) coefficients, and forced balance (round-robin expert choice,
    # as vendor benchmarks run). Ignored by dense models.
    moe_aux_loss_coef: float = Field(0.01, ge=0)
    moe_z_loss_coef: float = Field(0.0, ge=0)
    moe_force_balance: bool = False

    @property
    def resolved_min_lr(self) -> float:
        return self.lr / 10 if self.min_lr is None else self.min_lr

    @property
    def resolved_warmup_steps(self) -> int:
        return self.warmup_steps or int(round(self.warmup_frac * self.max_steps))


class DataSection(Section):
    # Domain name -> sampling weight. Built-in domains: "code" (the Python standard
    # library's source) and "english" (pydoc_data reference text).
    mixture: dict[str, float] = Field(default_factory=lambda: {"code": 0.5, "english": 0.5})
    # Domain name -> a prepared dataset directory, or a file / folder of raw text. Empty
    # means the embedded default corpus.
    sources: dict[str, str] = Field(default_factory=dict)
    dataset_dir: str | None = None  # where prepared shards live (default: RUN_DIR/data)
    tokenizer_vocab: int | None = None  # defaults to model.vocab
    max_docs_per_domain: int = Field(4000, ge=1)
    heldout_docs: int = Field(32, ge=0)

    @field_validator("mixture")
    @classmethod
    def _weights_positive(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("needs at least one domain, e.g. {code: 1.0}")
        for k, w in v.items():
            if not (w >= 0):
                raise ValueError(f"weight of domain {k!r} must be >= 0")
        if sum(v.values()) <= 0:
            raise ValueError("weights must not all be zero")
        return v


class CheckpointSection(Section):
    every: int = Field(50, ge=0)  # steps; 0 = only at the end / on stop
    keep: int = Field(3, ge=1)
    mirror_dir: str | None = None


class StabilitySection(Section):
    spike_factor: float = Field(3.0, gt=1)  # skip when loss > factor x running good loss
    spike_warmup_steps: int = Field(100, ge=0)  # no spike skipping before this step
    grad_norm_limit: float = Field(10.0, gt=0)
    max_consecutive_spikes: int = Field(3, ge=1)  # then roll back to the last good ckpt
    ema_beta: float = Field(0.9, ge=0, lt=1)


class ContinualSection(Section):
    init_from: str | None = None  # checkpoint dir, or HF safetensors + config.json dir
    replay_fraction: float = Field(0.0, ge=0, lt=1)
    replay_mixture: dict[str, float] = Field(default_factory=dict)
    lr_fraction: float = Field(1.0, gt=0, le=1)
    ewc_lambda: float = Field(0.0, ge=0)
    ewc_fisher_batches: int = Field(8, ge=1)
    branch_step: int | None = Field(None, ge=0)  # WSD: branch from the stable ckpt at this step
    decay_steps: int | None = Field(None, ge=1)  # WSD branch: length of its decay (D updates)

    @field_validator("replay_mixture")
    @classmethod
    def _replay_weights(cls, v: dict[str, float]) -> dict[str, float]:
        for k, w in v.items():
            if not (w >= 0):
                raise ValueError(f"weight of domain {k!r} must be >= 0")
        if v and sum(v.values()) <= 0:
            raise ValueError("weights must not all be zero")
        return v

    def check(self) -> None:
        if self.branch_step is not None:
            if not self.init_from:
                raise PlanError("continual.branch_step: needs continual.init_from (the stable "
                                "WSD run's folder or its checkpoint)")
            if self.decay_steps is None:
                raise PlanError("continual.branch_step: needs continual.decay_steps (the length "
                                "of the branch's decay, e.g. 100)")
            if self.lr_fraction != 1.0:
                raise PlanError("continual.lr_fraction: a WSD branch continues the stable run's "
                                "LR; leave it at 1.0")
        elif self.decay_steps is not None:
            raise PlanError("continual.decay_steps: only applies to a WSD branch; set "
                            "continual.branch_step too, or remove it")
        if (self.replay_fraction > 0 or self.ewc_lambda > 0 or self.lr_fraction != 1.0) and (
                not self.init_from):
            raise PlanError("continual: replay_fraction / ewc_lambda / lr_fraction need "
                            "continual.init_from (the checkpoint to continue from)")
