"""The device mesh of a plan's layout: named dimensions pp x dp_replicate x dp_shard x cp x tp.

Ranks are laid out with tp fastest-varying (tensor-parallel peers are neighbours, so on a
GPU node they share NVLink), then cp, then the data-parallel dimensions, then pp — the
order torchtitan and Megatron-LM use. Data parallelism has two axes (torchtitan's
ParallelDims): `dp_shard` ranks hold one shard each of the ZeRO state (FSDP / HSDP's shard
group, the ZeRO-1 optimizer partition) and `dp_replicate` groups of them hold replicas
(HSDP); dp = dp_replicate x dp_shard. Dimensions of degree 1 are left out of the
DeviceMesh, so they create no process groups and cost nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from costmodels.errors import MeshplanError
from planner.planfile import Plan

DIM_ORDER: tuple[str, ...] = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
# Flattened axes the strategies reduce over, each a product of mesh dimensions.
FLAT_AXES: dict[str, tuple[str, ...]] = {
    "dp_shard_cp": ("dp_shard", "cp"),  # the ZeRO shard group (cp ranks hold replicas too)
    "dp_cp": ("dp_replicate", "dp_shard", "cp"),  # every gradient replica
}


class MeshError(MeshplanError):
    """The layout does not fit the processes that were started."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each named mesh dimension and this process's coordinates in it."""

    pp: int = 1
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in DIM_ORDER:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MeshError(f"layout.{name}={value!r}: must be an integer >= 1")

    @classmethod
    def from_layout(cls, lay: Any) -> ParallelDims:
        """ZeRO stages shard over `dp_shard` ranks (all of dp when 0) and replicate across
        the rest; without sharding every dp rank is a replica."""
        shard = (lay.dp_shard or lay.dp) if lay.sharding != "none" else 1
        return cls(pp=lay.pp, dp_replicate=lay.dp // shard, dp_shard=shard, cp=lay.cp, tp=lay.tp)

    @classmethod
    def from_plan(cls, plan: Plan) -> ParallelDims:
        return cls.from_layout(plan.layout)

    @property
    def dp(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def degrees(self) -> dict[str, int]:
        return {"pp": self.pp, "dp": self.dp, "cp": self.cp, "tp": self.tp}

    def mesh_degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in DIM_ORDER}

    def active_dims(self) -> list[str]:
        """The dimensions that get a mesh axis (degree > 1), in mesh order."""
        return [name for name in DIM_ORDER if getattr(self, name) > 1]

    def size(self, axis: str) -> int:
        """Degree of a mesh dimension or of a flattened axis."""
        parts = FLAT_AXES.get(axis, (axis,))
        out = 1
        for p in parts:
            out *= getattr(self, p)
        return out

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise MeshError(
                f"layout: pp*dp*cp*tp = {self.pp}*{self.dp}*{self.cp}*{self.tp} = "
                f"{self.world_size} but {world_size} processes were started; "
                f"start {self.world_size} processes (--nproc {self.world_size}) or change "
                "the layout's degrees"
            )

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each dimension (rank = ((pp*DP + dp)*CP + cp)*TP + tp,
        dp = dp_replicate * DP_SHARD + dp_shard)."""
        if not 0 <= rank < self.world_size:
            raise MeshError(f"rank {rank} is outside the mesh of {self.world_size} processes")
        out: dict[str, int] = {}
        rest = rank
        for name in reversed(DIM_ORDER):
            size = getattr(self, name)
            out[name] = rest % size
            rest //= size
        out["dp"] = out["dp_replicate"] * self.dp_shard + out["dp_shard"]
        return out


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _restart_scoped_store(timeout):
    """Under one torchrun agent its store outlives the workers: after a restart, new ranks
    could read the previous incarnation's gloo addresses and fail to connect. Prefix every
    key with the restart count so each incarnation rendezvouses on its own keys."""
    import torch.distributed as dist

    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
        return None
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (the multi-node launchers): rank 0 hosts a fresh
        # store on a new port every incarnation, so there are no stale keys to step around.
        return None
    if os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE")) != os.environ.get("WORLD_SIZE"):
        # Several agents (nodes): each counts only its own restarts, so the counts disagree
        # after one node's worker fails; the launchers set TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
        # (planner.emit.common.FRESH_STORE_PER_ROUND) so each rendezvous round hands the
        # workers a fresh bootstrap store instead.
        return None
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"meshplan/restart{os.environ['TORCHELASTIC_RESTART_COUNT']}/", client)


def init_distributed(timeout_s: float | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes (gloo on the CPU, NCCL+gloo on CUDA)."""
    import datetime

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        # A collective waiting on a dead peer blocks torchrun's restart until this expires:
        # 120 s on the CPU (gloo, one host), NCCL's usual 600 s on GPUs.
        default = "600" if torch.cuda.is_available() else "120"
        timeout = datetime.timedelta(
            seconds=timeout_s or float(os.environ.get("MESHPLAN_DIST_TIMEOUT_S", default))
        )
        backend = "cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        store = _restart_scoped_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(
                backend, store=store, rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout,
            )
    return dist.get_rank(), dist.get_world_size()


_MESHES: dict[ParallelDims, Any] = {}  # one mesh per process and set of degrees


def build_mesh(dims: ParallelDims) -> Any:
    """A DeviceMesh over the active dimensions (None when every degree is 1), with the
    flattened axes of `FLAT_AXES` that span two or more active dimensions. Every rank builds
    the same axes in the same order (flattening creates process groups collectively). A
    process builds each mesh once: its process groups are reused until `release_meshes`."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dims.check_world_size(dist.get_world_size())
    names = dims.active_dims()
    if not names:
        return None
    if dims in _MESHES:
        return _MESHES[dims]
    mesh = init_device_mesh(
        device_type(), tuple(getattr(dims, n) for n in names), mesh_dim_names=tuple(names)
    )
    for flat, parts in FLAT_AXES.items():
        active = tuple(p for p in parts if getattr(dims, p) > 1)
        if len(active) > 1:
            mesh[active]._flatten(flat)
    _MESHES[dims] = mesh
    return mesh


def release_meshes() -> None:
    """Forget the cached meshes (their groups die with the default process group)."""
    _MESHES.clear()


def axis(mesh: Any, dims: ParallelDims, name: str) -> Any:
    """The 1-D mesh of a dimension or flattened axis, or None when its degree is 1."""
    if mesh is None or dims.size(name) == 1:
        return None
    active = [p for p in FLAT_AXES.get(name, (name,)) if getattr(dims, p) > 1]
    return mesh[active[0]] if len(active) == 1 else mesh[name]


def fsdp_mesh(mesh: Any, dims: ParallelDims) -> Any:
    """FSDP2's mesh: 1-D over the shard group, or 2-D (replicate, shard) for HSDP."""
    shard = axis(mesh, dims, "dp_shard_cp")
    if dims.dp_replicate == 1 or shard is None:
        return shard if shard is not None else axis(mesh, dims, "dp_replicate")
    shard_name = shard.mesh_dim_names[0]
    return mesh["dp_replicate", shard_name]
