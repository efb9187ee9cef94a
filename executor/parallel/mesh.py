"""The device mesh of a plan's layout: named dimensions pp x dp x cp x tp.

Ranks are laid out with tp fastest-varying (tensor-parallel peers are neighbours, so on a
GPU node they share NVLink), then cp, then dp, then pp — the order torchtitan and
Megatron-LM use. Dimensions of degree 1 are left out of the DeviceMesh altogether, so they
create no process groups and cost nothing.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from costmodels.errors import MeshplanError

DIM_ORDER: tuple[str, ...] = ("pp", "dp", "cp", "tp")


class MeshError(MeshplanError):
    """The layout does not fit the processes that were started."""


@dataclass(frozen=True)
class ParallelDims:
    """Degrees of each named mesh dimension and this process's coordinates in it."""

    pp: int = 1
    dp: int = 1
    cp: int = 1
    tp: int = 1

    def __post_init__(self) -> None:
        for name in DIM_ORDER:
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise MeshError(f"layout.{name}={value!r}: must be an integer >= 1")

    @classmethod
    def from_plan(cls, plan: Any) -> ParallelDims:
        lay = plan.layout
        return cls(pp=lay.pp, dp=lay.dp, cp=lay.cp, tp=lay.tp)

    @property
    def world_size(self) -> int:
        return self.pp * self.dp * self.cp * self.tp

    def degrees(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in DIM_ORDER}

    def active_dims(self) -> list[str]:
        """The dimensions that get a mesh axis (degree > 1), in mesh order."""
        return [name for name in DIM_ORDER if getattr(self, name) > 1]

    def check_world_size(self, world_size: int) -> None:
        if world_size != self.world_size:
            raise MeshError(
                f"layout: pp*dp*cp*tp = {self.pp}*{self.dp}*{self.cp}*{self.tp} = "
                f"{self.world_size} but {world_size} processes were started; "
                f"start {self.world_size} processes (--nproc {self.world_size}) or change "
                "the layout's degrees"
            )

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along each dimension (rank = ((pp*DP + dp)*CP + cp)*TP + tp)."""
        if not 0 <= rank < self.world_size:
            raise MeshError(f"rank {rank} is outside the mesh of {self.world_size} processes")
        out: dict[str, int] = {}
        rest = rank
        for name in reversed(DIM_ORDER):
            size = getattr(self, name)
            out[name] = rest % size
            rest //= size
        return out

    def rank_of(self, **coords: int) -> int:
        rank = 0
        for name in DIM_ORDER:
            rank = rank * getattr(self, name) + coords.get(name, 0)
        return rank

    def group_ranks(self, dim: str, rank: int) -> list[int]:
        """Ranks that share every coordinate with `rank` except along `dim`."""
        base = self.coords(rank)
        return [self.rank_of(**{**base, dim: i}) for i in range(getattr(self, dim))]


def device_type() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _restart_scoped_store(timeout):
    """Under torchrun the agent's store outlives the workers: after a restart, new ranks
    could read the previous incarnation's gloo addresses and fail to connect. Prefix every
    key with the restart count so each incarnation rendezvouses on its own keys."""
    import torch.distributed as dist

    if "TORCHELASTIC_RESTART_COUNT" not in os.environ or "MASTER_ADDR" not in os.environ:
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


def build_mesh(dims: ParallelDims) -> Any:
    """A DeviceMesh over the active dimensions (None when every degree is 1).

    When both dp and cp are active a flattened `dp_cp` axis is added: parameters are
    replicated over it, so data-parallel gradient reduction runs over dp x cp.
    """
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dims.check_world_size(dist.get_world_size())
    names = dims.active_dims()
    if not names:
        return None
    mesh = init_device_mesh(
        device_type(), tuple(getattr(dims, n) for n in names), mesh_dim_names=tuple(names)
    )
    if dims.dp > 1 and dims.cp > 1:
        mesh["dp", "cp"]._flatten("dp_cp")
    return mesh


def data_parallel_submesh(mesh: Any, dims: ParallelDims) -> Any:
    """The axis gradients are reduced over: dp, cp, their flattening, or None."""
    if mesh is None:
        return None
    if dims.dp > 1 and dims.cp > 1:
        return mesh["dp_cp"]
    if dims.dp > 1:
        return mesh["dp"]
    if dims.cp > 1:
        return mesh["cp"]
    return None


def submesh(mesh: Any, dims: ParallelDims, name: str) -> Any:
    """One named axis of the mesh, or None when its degree is 1."""
    if mesh is None or getattr(dims, name) == 1:
        return None
    return mesh[name]
