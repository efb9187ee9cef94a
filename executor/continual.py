"""Continual pretraining: where a run starts from, and what it does against forgetting.

* `resolve_init(path)`: `continual.init_from` names a meshplan run folder, its
  `checkpoints/` folder, one `step_NNNNNN` checkpoint, or a Hugging Face LLaMA-style folder
  (`config.json` + `model.safetensors`); the source's architecture is checked field by field
  against the plan's model before any tensor is loaded (one line names the first mismatch).
* `replay_mixture`: the new mixture with `replay_fraction` of the rows drawn from the old
  mixture (replay against forgetting: Ibrahim et al. 2024 §5; Scialom et al. 2022).
* `EWC`: elastic weight consolidation, penalty lambda/2 sum_i F_i (theta_i - theta*_i)^2 with
  a diagonal empirical Fisher from squared per-sequence gradients of the old-domain loss
  at the initial weights (Kirkpatrick et al. 2017, eq. 3).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from costmodels.errors import MeshplanError
from costmodels.specs import ModelSpec
from executor.checkpoint import (
    MANIFEST,
    STATE_FILE,
    CheckpointError,
    CheckpointManager,
    step_dir_name,
    verify_checkpoint,
)
from executor.data.batch import Batch
from executor.hf_format import (
    arch_from_config,
    hf_state_to_ours,
    is_hf_dir,
    read_config,
    read_hf_tensors,
)
from planner.atomic import atomic_write

# Fields that decide the shapes and the function of the network, in the order checked.
ARCH_FIELDS: tuple[str, ...] = (
    "vocab", "hidden", "layers", "heads", "kv_heads", "ffn_hidden", "mlp", "norm",
    "tied_embeddings", "bias", "qkv_bias", "qk_norm", "attn_head_dim", "num_experts",
)
_FIELD_DEFAULTS: dict[str, Any] = {"mlp": "swiglu", "norm": "rmsnorm", "tied_embeddings": False,
                                   "bias": False, "qkv_bias": False, "qk_norm": False,
                                   "attn_head_dim": 0, "num_experts": 0}


@dataclass
class InitSource:
    """A resolved `continual.init_from`."""

    kind: str  # "meshplan" or "hf"
    path: Path  # the step folder, or the HF folder
    step: int | None = None  # meshplan checkpoints: the step they were saved at
    arch: dict[str, Any] = field(default_factory=dict)  # ModelSpec field -> value
    mixture: dict[str, float] = field(default_factory=dict)  # the source run's data mixture
    extra: dict[str, Any] = field(default_factory=dict)  # meshplan: state.json

    @property
    def tokenizer_sha256(self) -> str | None:
        return self.extra.get("data", {}).get("tokenizer_sha256")


def _pick_step(root: Path, step: int | None, where: str) -> Path:
    mgr = CheckpointManager(root, warn=lambda _m: None)
    if step is None:
        path = mgr.latest_valid()
        if path is None:
            raise MeshplanError(f"continual.init_from={where}: holds no intact checkpoint; "
                                "point it at a finished run or a step_NNNNNN folder")
        return path
    path = root / step_dir_name(step)
    if not path.is_dir():
        have = ", ".join(str(s) for s, _ in mgr.candidates()) or "none"
        raise MeshplanError(
            f"continual.branch_step={step}: {where} has no checkpoint at that step (has: "
            f"{have}); save one there (checkpoint.every) or branch from a saved step"
        )
    return path


def resolve_init(init_from: str, branch_step: int | None = None) -> InitSource:
    """Find the checkpoint `init_from` names and read its architecture (no tensors yet)."""
    p = Path(init_from).expanduser()
    if not p.exists():
        raise MeshplanError(f"continual.init_from={init_from}: not found; pass a run folder, a "
                            "step_NNNNNN checkpoint, or a folder with config.json + "
                            "model.safetensors")
    if is_hf_dir(p):
        if branch_step is not None:
            raise MeshplanError("continual.branch_step: a Hugging Face folder has no optimizer "
                                "or data state to branch from; use a meshplan WSD run")
        cfg = read_config(p)
        return InitSource("hf", p, None, arch_from_config(cfg, str(p / "config.json")))
    if (p / MANIFEST).is_file() or (p / STATE_FILE).is_file():
        step_dir = p
    elif (p / "checkpoints").is_dir():
        step_dir = _pick_step(p / "checkpoints", branch_step, init_from)
    elif p.is_dir() and CheckpointManager._step_dirs(p):
        step_dir = _pick_step(p, branch_step, init_from)
    else:
        raise MeshplanError(f"continual.init_from={init_from}: neither a meshplan checkpoint "
                            "(run folder or step_NNNNNN) nor a Hugging Face folder with "
                            "config.json + model.safetensors")
    try:
        step = verify_checkpoint(step_dir)
    except CheckpointError as exc:
        raise MeshplanError(f"continual.init_from: {exc}") from None
    if branch_step is not None and step != branch_step:
        raise MeshplanError(f"continual.branch_step={branch_step}: {step_dir} is the checkpoint "
                            f"of step {step}; point init_from at the run folder or that step")
    try:
        extra = json.loads((step_dir / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise MeshplanError(f"continual.init_from: {step_dir}/{STATE_FILE} unreadable ({exc})"
                            ) from None
    fp = extra.get("plan", {})
    model = dict(fp.get("model") or {})
    arch = {k: model.get(k, _FIELD_DEFAULTS.get(k)) for k in ARCH_FIELDS if
            k in model or k in _FIELD_DEFAULTS}
    arch.update({k: model[k] for k in SOFT_FIELDS if k in model})
    return InitSource("meshplan", step_dir, step, arch,
                      {k: float(v) for k, v in (fp.get("mixture") or {}).items()}, extra)


def check_architecture(source: InitSource, spec: ModelSpec) -> None:
    """One line naming the first architecture field where source and plan differ."""
    for name in ARCH_FIELDS:
        if name not in source.arch:
            continue
        have, want = source.arch[name], getattr(spec, name)
        if have != want:
            raise MeshplanError(
                f"init_from: checkpoint has {name}={have} but the plan's model has "
                f"{name}={want}; make model.{name} match the checkpoint or pick another one"
            )


# Fields that change the function but not the shapes: a deliberate change is legitimate
# (raising rope_theta to extend the context, Xiong et al. 2023 §3), so they only warn.
SOFT_FIELDS: tuple[str, ...] = ("rope_theta", "norm_eps")


def soft_differences(source: InitSource, spec: ModelSpec) -> list[str]:
    """Warnings for numeric settings where the source and the plan differ."""
    out = []
    for name in SOFT_FIELDS:
        have = source.arch.get(name)
        if have is not None and float(have) != float(getattr(spec, name)):
            out.append(f"init_from: checkpoint has {name}={have} but the plan's model has "
                       f"{name}={getattr(spec, name)}; training continues with the plan's value")
    return out


def check_tokenizer(source: InitSource, tokenizer_sha256: str | None) -> None:
    src = source.tokenizer_sha256
    if src and tokenizer_sha256 and src != tokenizer_sha256:
        raise MeshplanError(
            "init_from: the checkpoint was trained with a different tokenizer than this run's "
            "dataset; use the source run's data settings (tokenizer_vocab, max_docs_per_domain, "
            "dataset_dir) so token ids mean the same"
        )


def source_state_dict(source: InitSource) -> dict[str, torch.Tensor]:
    """The model tensors of a resolved source, in this executor's names."""
    if source.kind == "hf":
        tensors = read_hf_tensors(source.path)
        return hf_state_to_ours(tensors, bool(source.arch.get("tied_embeddings")),
                                str(source.path))
    try:
        return torch.load(source.path / "model.pt", map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad checkpoint
        raise MeshplanError(f"continual.init_from: {source.path}/model.pt unreadable ({exc})"
                            ) from None


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy `state` into `model` exactly; shapes and names must match one to one."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has an extra tensor {extra[0]}"
        raise MeshplanError(f"init_from: {where} {what}; it does not fit the plan's model")
    for name, t in own.items():
        if tuple(state[name].shape) != tuple(t.shape):
            raise MeshplanError(
                f"init_from: tensor {name} has shape {tuple(state[name].shape)} in {where} but "
                f"{tuple(t.shape)} in the plan's model"
            )
    with torch.no_grad():
        for name, t in own.items():
            t.copy_(state[name].to(t.dtype))


# --------------------------------------------------------------------------- replay


def _normalise(mix: dict[str, float]) -> dict[str, float]:
    total = sum(mix.values())
    return {k: v / total for k, v in mix.items() if v > 0}


def replay_mixture(new: dict[str, float], old: dict[str, float],
                   fraction: float) -> dict[str, float]:
    """Sampling weights with `fraction` of rows from the old mixture and the rest from the
    new one: w_d = (1 - r) new_d + r old_d (both normalised first; Ibrahim et al. 2024 §5)."""
    if fraction <= 0:
        return dict(new)
    if not old:
        raise MeshplanError("continual.replay_mixture: replay needs the old mixture's weights "
                            "(e.g. {english: 1.0}); the init checkpoint records none")
    n, o = _normalise(new), _normalise(old)
    return {d: (1 - fraction) * n.get(d, 0.0) + fraction * o.get(d, 0.0)
            for d in list(n) + [d for d in o if d not in n]}


# --------------------------------------------------------------------------- EWC


@dataclass
class EWC:
    """lambda/2 sum_i F_i (theta_i - theta*_i)^2 (Kirkpatrick et al. 2017, eq. 3)."""

    lam: float
    fisher: dict[str, torch.Tensor]
    anchor: dict[str, torch.Tensor]

    @classmethod
    def estimate(cls, model: nn.Module, lam: float, batches: Iterable[Batch],
                 loss_fn: Callable[[Batch], torch.Tensor]) -> EWC:
        """Diagonal empirical Fisher F_i = mean over sequences of (d loss_seq / d theta_i)^2
        (Kirkpatrick et al. 2017 §2.1; Martens 2020 §11 on the empirical Fisher), at the
        model's current (initial) weights, which become the anchor theta*."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        model.zero_grad(set_to_none=True)
        for batch in batches:
            for row in batch.split(1):
                if row.num_targets() == 0:
                    continue
                loss = loss_fn(row)
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for (n, _), g in zip(params.items(), grads, strict=True):
                    if g is not None:
                        fisher[n].add_(g.detach().pow(2))
                count += 1
        if count == 0:
            raise MeshplanError("continual.ewc_fisher_batches: the old-domain sample carried "
                                "no loss targets; raise ewc_fisher_batches")
        for f in fisher.values():
            f.div_(count)
        anchor = {n: p.detach().clone() for n, p in params.items()}
        return cls(lam, fisher, anchor)

    @torch.no_grad()
    def apply(self, model: nn.Module) -> float:
        """Add the penalty's gradient lambda F (theta - theta*) to every parameter's .grad;
        returns the penalty value."""
        total = 0.0
        for n, p in model.named_parameters():
            f = self.fisher.get(n)
            if f is None:
                continue
            if f.device != p.device:  # loaded on the CPU: move once, not every step
                f = self.fisher[n] = f.to(p.device)
                self.anchor[n] = self.anchor[n].to(p.device)
            diff = p.detach() - self.anchor[n]
            fd = f * diff
            total += float((fd * diff).sum())
            g = fd.mul(self.lam)
            if p.grad is None:
                p.grad = g.to(p.dtype)
            else:
                p.grad.add_(g.to(p.grad.dtype))
        return 0.5 * self.lam * total

    def save(self, path: Path) -> None:
        state = {"lam": self.lam, "fisher": self.fisher, "anchor": self.anchor}
        atomic_write(path, lambda tmp: torch.save(state, tmp))

    @classmethod
    def load(cls, path: Path, lam: float) -> EWC:
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - unreadable file: tell the user how to redo it
            raise MeshplanError(f"{path}: unreadable EWC state ({exc}); delete the run folder "
                                "to start the continual run over") from None
        return cls(lam, d["fisher"], d["anchor"])
