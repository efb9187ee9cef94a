"""The plan file (`plan.yaml`): a versioned, validated description of one training job.

The planner writes it; the executor runs exactly it. Sections: `model`, `cluster`,
`layout`, `train`, `data`, `checkpoint`, `stability`, `continual`, and `predicted` (the
cost model's numbers the plan was chosen with). Dotted overrides (`train.max_steps=40`)
are applied before validation, as torchtitan / Hydra users expect.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator

from costmodels.errors import MeshplanError
from costmodels.profile import Profile
from costmodels.specs import Layout, ModelSpec, SpecError
from planner.atomic import atomic_write_text
from planner.plan_sections import (  # noqa: F401 - re-exported: callers read them as plan-file names
    CheckpointSection,
    ClusterSection,
    ContinualSection,
    DataSection,
    LayoutSection,
    PlanError,
    Section,
    StabilitySection,
    TrainSection,
    cluster_section,
    layout_section,
)

PLAN_VERSION = 1


class Plan(Section):
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
        return self.layout.spec(self.train.precision)

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
        if self.train.host_probe and self.cluster.accelerator != "cpu":
            raise PlanError("train.host_probe: the probe times this host's CPU and prices CPU runs; "
                            f"set it false for accelerator {self.cluster.accelerator!r}")

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
