"""The plan file (`plan.yaml`): a versioned, validated description of one training job.

The planner writes it; the executor runs exactly it. Sections: `model`, `cluster`,
`layout`, `train`, `data`, `checkpoint`, `stability`, `continual`, and `predicted` (the
cost model's numbers the plan was chosen with). Dotted overrides (`train.max_steps=40`)
are applied before validation, as torchtitan / Hydra users expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from costmodels.errors import MeshplanError
from costmodels.profile import Profile
from costmodels.specs import ClusterSpec, Layout, ModelSpec, Schedule, SpecError
from planner.atomic import atomic_write_text

PLAN_VERSION = 1


class PlanError(MeshplanError):
    """A user-facing plan error: one line naming the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ClusterSection(_Section):
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


def layout_section(lay: Layout, engine: str = "torch") -> dict[str, Any]:
    """The plan's `layout:` section for a cost-model layout."""
    return {
        "tp": lay.tp, "pp": lay.pp, "dp": lay.dp, "cp": lay.cp, "ep": lay.ep, "vpp": lay.vpp,
        "sharding": lay.sharding, "engine": engine, "micro_batch_size": lay.micro_batch,
        "global_batch_size": lay.global_batch, "recompute": lay.recompute,
        "sequence_parallel": lay.sequence_parallel, "schedule": lay.schedule,
        "dp_shard": lay.dp_shard, "recompute_layers": lay.recompute_layers,
    }


class LayoutSection(_Section):
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

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp)


class TrainSection(_Section):
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


class DataSection(_Section):
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


class CheckpointSection(_Section):
    every: int = Field(50, ge=0)  # steps; 0 = only at the end / on stop
    keep: int = Field(3, ge=1)
    mirror_dir: str | None = None


class StabilitySection(_Section):
    spike_factor: float = Field(3.0, gt=1)  # skip when loss > factor x running good loss
    spike_warmup_steps: int = Field(100, ge=0)  # no spike skipping before this step
    grad_norm_limit: float = Field(10.0, gt=0)
    max_consecutive_spikes: int = Field(3, ge=1)  # then roll back to the last good ckpt
    ema_beta: float = Field(0.9, ge=0, lt=1)


class ContinualSection(_Section):
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


class Plan(_Section):
    version: int = PLAN_VERSION
    model: dict[str, Any]
    cluster: ClusterSection = Field(default_factory=ClusterSection)
    layout: LayoutSection = Field(default_factory=LayoutSection)
    train: TrainSection = Field(default_factory=TrainSection)
    data: DataSection = Field(default_factory=DataSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    stability: StabilitySection = Field(default_factory=StabilitySection)
    continual: ContinualSection = Field(default_factory=ContinualSection)
    predicted: dict[str, Any] = Field(default_factory=dict)
    # The calibration profile `predicted` was computed with (`costmodels.profile` values), so
    # `meshplan predict --config plan.yaml` reproduces it on any machine; empty = the default.
    profile: dict[str, Any] = Field(default_factory=dict)

    @field_validator("version")
    @classmethod
    def _known_version(cls, v: int) -> int:
        if v != PLAN_VERSION:
            raise ValueError(f"plan version {v} is not supported (this meshplan reads {PLAN_VERSION})")
        return v

    # -- typed views for the cost model
    def model_spec(self) -> ModelSpec:
        try:
            return ModelSpec.from_dict(self.model)
        except SpecError as exc:
            raise PlanError(str(exc)) from None

    def layout_spec(self) -> Layout:
        lay = self.layout
        try:
            return Layout(
                tp=lay.tp, pp=lay.pp, dp=lay.dp, cp=lay.cp, ep=lay.ep, vpp=lay.vpp,
                sharding=lay.sharding, micro_batch=lay.micro_batch_size,
                global_batch=lay.global_batch_size, recompute=lay.recompute,
                sequence_parallel=lay.sequence_parallel, precision=self.train.precision,
                engine=lay.engine, schedule=lay.schedule, dp_shard=lay.dp_shard,
                recompute_layers=lay.recompute_layers,
            )
        except SpecError as exc:
            raise PlanError(str(exc)) from None

    def cost_profile(self) -> Profile | None:
        """The profile the plan was priced with, or None (a plan written without one)."""
        if not self.profile:
            return None
        try:
            return Profile.from_dict(self.profile, "plan profile")
        except MeshplanError as exc:
            raise PlanError(str(exc)) from None

    def check(self) -> None:
        """Cross-section checks that pydantic field validation cannot express."""
        spec = self.model_spec()
        try:
            self.layout_spec().check_against(spec, self.cluster.num_gpus)
        except SpecError as exc:
            raise PlanError(str(exc)) from None
        self.cluster.spec()
        self.cost_profile()
        self.continual.check()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


# --------------------------------------------------------------------------- overrides


def _parse_scalar(text: str) -> Any:
    """`--override a.b=VALUE`: VALUE is parsed as YAML (numbers, bools, lists, null)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = yaml.safe_load(yaml.safe_dump(data))  # deep copy through plain types
    for item in overrides:
        if "=" not in item:
            raise PlanError(f"--override {item!r}: expected KEY=VALUE, e.g. train.max_steps=40")
        key, _, value = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise PlanError(f"--override {item!r}: empty key")
        node = out
        for p in parts[:-1]:
            if not isinstance(node.get(p, {}), dict):
                raise PlanError(f"--override {key}: {p!r} is not a section")
            node = node.setdefault(p, {})
        node[parts[-1]] = _parse_scalar(value)
    return out


def _format_validation_error(exc: ValidationError, source: str) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key; remove it or check its spelling"
    elif err["type"] == "missing":
        msg = "required key is missing"
    more = f" (+{len(exc.errors()) - 1} more)" if len(exc.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def _resize_cluster(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`meshplan run PLAN --override layout.tp=2 ...` runs the plan on this machine with the
    new degrees: the cluster's GPU count follows the layout unless it is overridden too."""
    keys = [o.partition("=")[0].strip() for o in overrides]
    if not any(k.startswith("layout.") for k in keys) or "cluster.num_gpus" in keys:
        return data
    lay = data.get("layout") or {}
    world = 1
    for dim in ("tp", "pp", "dp", "cp"):
        v = lay.get(dim, 1)
        if not isinstance(v, int) or v < 1:
            return data  # validation names the field
        world *= v
    data.setdefault("cluster", {})["num_gpus"] = world
    return data


def plan_from_dict(data: Any, source: str = "plan", overrides: list[str] | None = None,
                   resize_cluster: bool = False) -> Plan:
    if not isinstance(data, dict):
        raise PlanError(f"{source}: expected a mapping of sections (model, layout, train, ...)")
    if overrides:
        before = data.get("layout")
        data = apply_overrides(data, overrides)
        if resize_cluster and isinstance(data.get("layout", {}), dict) and isinstance(data.get("cluster", {}), dict):
            data = _resize_cluster(data, overrides)
        if data.get("layout") != before and isinstance(data.get("predicted"), dict) and data["predicted"] \
                and not any(o.partition("=")[0].strip().startswith("predicted") for o in overrides):
            # the cost model's numbers were for the plan's own layout, not this one
            data["predicted"] = {"stale": "layout changed by --override; predict it with meshplan predict"}
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError(_format_validation_error(exc, source)) from None
    plan.check()
    return plan


def read_yaml_file(p: Path, invalid: str) -> Any:
    """Parse a YAML file with the safe loader (no object tags); on a parse or encoding error
    raise `PlanError("<invalid> (<first line of the reason>)")`."""
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PlanError(f"{invalid} ({first})") from None


def load_plan(path: str | Path, overrides: list[str] | None = None,
              resize_cluster: bool = False) -> Plan:
    p = Path(path)
    if p.is_dir():
        p = p / "plan.yaml"
    if not p.is_file():
        raise PlanError(f"{p}: plan file not found; create one with `meshplan plan ... --out DIR`")
    data = read_yaml_file(p, f"{p}: not a valid YAML plan")
    return plan_from_dict(data, str(p), overrides, resize_cluster)


def save_plan(plan: Plan, path: str | Path) -> Path:
    p = Path(path)
    if p.is_dir() or p.suffix == "":
        p = p / "plan.yaml"
    atomic_write_text(p, plan.to_yaml())
    return p
