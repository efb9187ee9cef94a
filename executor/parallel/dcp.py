"""Distributed checkpoints with `torch.distributed.checkpoint` (DCP).

Every rank writes its own shards of the model and of the optimizer state, keyed by the
one-process model's parameter names (FQNs) — `get_state_dict` strips DDP's `module.` and
turns FSDP2 / tensor-parallel DTensors into sharded entries, and the optimizer state is
flattened to `state.<fqn>.<key>` / `param_groups.<fqn>.<key>`. DCP reshards on load, so a
checkpoint saved under one layout resumes under another (DP=2 -> DP=1, FSDP -> DDP, PP=2 ->
one process). The single-process executor reads these checkpoints through
`load_into_single_process`, and distributed strategies read single-process checkpoints
(`model.pt` / `optim.pt`) through `single_process_to_sharded`.

The extra state (step, data cursor, RNG, detector) is JSON written by rank 0, as in the
single-process format; the checkpoint manager adds the manifest and renames atomically.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from executor.checkpoint import STATE_FILE, CheckpointError, read_extra_state

DCP_METADATA = ".metadata"  # the file DCP's FileSystemWriter writes last


def _options(full: bool = False, cpu_offload: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=full, cpu_offload=cpu_offload, flatten_optimizer_state_dict=True,
    )


def sharded_state(strategy: Any) -> dict[str, dict[str, Any]]:
    """{"model": {...}, "optim": {...}} over every model part this rank holds."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model: dict[str, Any] = {}
    optim: dict[str, Any] = {}
    opts = strategy.dcp_optimizers() if hasattr(strategy, "dcp_optimizers") else strategy.optimizers
    for part, opt in zip(strategy.model_parts(), opts, strict=True):
        m, o = get_state_dict(part, opt, options=_options())
        model.update(m)
        optim.update(o)
    return {"model": model, "optim": optim}


def apply_sharded_state(strategy: Any, state: dict[str, dict[str, Any]], model: bool = True,
                        optim: bool = True) -> None:
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = strategy.dcp_optimizers() if optim and hasattr(strategy, "dcp_optimizers") \
        else strategy.optimizers
    for part, opt in zip(strategy.model_parts(), opts, strict=True):
        if model:
            own = _own_keys(part, state["model"])
            set_model_state_dict(part, own, options=_options())
        if optim:
            fqns = set(_param_fqns(part))
            own_o = {k: v for k, v in state["optim"].items() if _fqn_of_optim_key(k) in fqns}
            set_optimizer_state_dict(part, opt, own_o, options=_options())
    if optim and hasattr(strategy, "dcp_loaded"):
        strategy.dcp_loaded(opts)


def _param_fqns(part: nn.Module) -> list[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return list(get_model_state_dict(part, options=_options()).keys())


def _own_keys(part: nn.Module, state: dict[str, Any]) -> dict[str, Any]:
    fqns = set(_param_fqns(part))
    return {k: v for k, v in state.items() if k in fqns}


def _fqn_of_optim_key(key: str) -> str:
    """`state.layers.0.attention.wq.weight.exp_avg` -> `layers.0.attention.wq.weight`."""
    body = key.split(".", 1)[1]
    return body.rsplit(".", 1)[0]


def save_distributed(strategy: Any, directory: str | Path, extra_state: dict[str, Any]) -> None:
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    dcp.save(sharded_state(strategy), checkpoint_id=str(directory))
    if strategy.rank == 0:
        extra = dict(extra_state)
        extra["layout"] = {"world_size": strategy.world_size, **strategy.dims.degrees(),
                           "strategy": strategy.name, "format": "dcp"}
        (directory / STATE_FILE).write_text(json.dumps(extra))


def is_dcp_checkpoint(directory: str | Path) -> bool:
    return (Path(directory) / DCP_METADATA).is_file()


_SAFE_MODULES = ("torch.distributed.checkpoint.", "torch.", "collections", "builtins", "datetime", "pathlib")
_SAFE_EXACT = {"torch", "collections", "builtins", "datetime", "pathlib"}


def _safe_reader(directory: str | Path) -> Any:
    """A DCP reader whose `.metadata` unpickler only admits torch's checkpoint metadata
    classes, torch sizes / dtypes and builtins: loading never runs an arbitrary pickle."""
    import io
    import pickle

    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class _Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module in _SAFE_EXACT or module.startswith(_SAFE_MODULES):
                if module == "builtins" and name in {"eval", "exec", "compile", "open", "__import__", "getattr", "setattr"}:
                    raise pickle.UnpicklingError(f"forbidden builtin {name}")
                return super().find_class(module, name)
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as fh:
                try:
                    metadata = _Unpickler(io.BytesIO(fh.read())).load()
                except (pickle.UnpicklingError, EOFError, AttributeError, ImportError) as exc:
                    raise CheckpointError(f"{directory}: untrusted or corrupt checkpoint metadata ({exc})") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(str(directory))


def load_distributed(strategy: Any, directory: str | Path) -> dict[str, Any]:
    """Load a DCP checkpoint (any layout) or a single-process one into this strategy."""
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    if is_dcp_checkpoint(directory):
        state = sharded_state(strategy)  # templates: this layout's shards
        try:
            dcp.load(state, checkpoint_id=str(directory), storage_reader=_safe_reader(directory))
        except Exception as exc:  # noqa: BLE001 - a checkpoint that does not fit this model
            raise CheckpointError(
                f"{directory}: distributed checkpoint does not fit this plan's model "
                f"({str(exc).strip().splitlines()[0][:160]}); use a new --out"
            ) from None
        apply_sharded_state(strategy, state)
    else:
        model_state, optim_state = _read_single(directory)
        full = {"model": model_state, "optim": optim_to_flat(model_state, optim_state)}
        state = sharded_state(strategy)
        for section in ("model", "optim"):
            _fill_from_full(state[section], full[section])
        apply_sharded_state(strategy, state)
    return read_extra_state(directory)


def _fill_from_full(template: dict[str, Any], full: dict[str, Any]) -> None:
    """Cut full (single-process) tensors into this layout's shards, in place."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for key, t in list(template.items()):
        if key not in full:
            continue
        v = full[key]
        if isinstance(t, DTensor):
            template[key] = distribute_tensor(
                v.to(t.dtype).reshape(t.shape), t.device_mesh, t.placements)
        elif isinstance(t, torch.Tensor):
            template[key] = v.to(device=t.device, dtype=t.dtype).reshape(t.shape)
        else:
            template[key] = v


# ----------------------------------------------------------------- single-process bridge


def _read_single(directory: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    from executor.checkpoint import read_single_process

    return read_single_process(directory, "cpu")


def single_process_fqn_order(model_state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The parameter names behind optim.pt's integer ids: `executor.strategy.build_optimizer`
    puts matrices (ndim >= 2) in group 0 and the rest in group 1, in parameter order."""
    decay = [k for k, v in model_state.items() if v.ndim >= 2]
    no_decay = [k for k, v in model_state.items() if v.ndim < 2]
    return [decay, no_decay]


def optim_to_flat(model_state: dict[str, Any], optim_state: dict[str, Any]) -> dict[str, Any]:
    """A torch optimizer state_dict (integer ids) -> DCP's flat FQN-keyed form."""
    order = single_process_fqn_order(model_state)
    flat: dict[str, Any] = {}
    for group, names in zip(optim_state["param_groups"], order, strict=True):
        for pid, fqn in zip(group["params"], names, strict=True):
            for key, val in optim_state["state"].get(pid, {}).items():
                flat[f"state.{fqn}.{key}"] = val
            for key, val in group.items():
                if key != "params":
                    flat[f"param_groups.{fqn}.{key}"] = val
    return flat


def full_model_state_dict(strategy: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out: dict[str, Any] = {}
    for part in strategy.model_parts():
        out.update(get_model_state_dict(part, options=_options(full=True, cpu_offload=True)))
    return out


def load_full_model_state_dict(strategy: Any, state: dict[str, Any]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    for part in strategy.model_parts():
        set_model_state_dict(part, _own_keys(part, state), options=_options(full=True))


def load_into_single_process(model: nn.Module, optimizer: torch.optim.Optimizer,
                             directory: str | Path) -> None:
    """Read a DCP checkpoint (saved under any layout) into one process's model/optimizer."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    m, o = get_state_dict(model, optimizer, options=_options())
    state = {"model": m, "optim": o}
    try:
        dcp.load(state, checkpoint_id=str(directory), no_dist=True, storage_reader=_safe_reader(directory))
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(
            f"{directory}: distributed checkpoint does not fit this plan's model "
            f"({str(exc).strip().splitlines()[0][:160]}); use a new --out"
        ) from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"], options=_options())
