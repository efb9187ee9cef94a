"""Communication accounting: the payload bytes each collective moves on this rank.

`CommCounter` is a TorchDispatchMode. Every collective, whoever issues it — DDP's C++
reducer, FSDP2, DTensor redistributions (functional collectives), the pipeline schedule's
send/recv, DeepSpeed through torch.distributed — reaches the dispatcher as a `c10d.*` or
`_c10d_functional.*` op, which this mode sees. DTensor ops are let through (NotImplemented)
so DTensor first desugars them into the collectives it needs, which are then counted.

Payload convention (the same one `costmodels.comm_volume` predicts):
  all_reduce       bytes of the tensor reduced
  all_gather       bytes of the gathered (full) output
  reduce_scatter   bytes of the full input
  all_to_all       bytes of the input
  broadcast        bytes of the tensor
  send_recv        bytes this rank sends (receives are counted by their sender)
Collectives over a group of one process move nothing and are not counted.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

KINDS: tuple[str, ...] = (
    "all_reduce", "all_gather", "reduce_scatter", "send_recv", "all_to_all", "broadcast",
)


def _nbytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, list | tuple):
        return sum(_nbytes(x) for x in obj)
    return 0


def _group_size(obj: Any) -> int:
    """Size of a ProcessGroup, or of a functional collective's group name."""
    if isinstance(obj, torch.ScriptObject):  # how the dispatcher hands over a ProcessGroup
        from torch.distributed import ProcessGroup

        return int(ProcessGroup.unbox(obj).size())
    if hasattr(obj, "size") and callable(obj.size):
        try:
            return int(obj.size())
        except Exception:  # noqa: BLE001 - not a process group after all
            return 0
    if isinstance(obj, str):
        from torch.distributed import distributed_c10d as c10d

        return int(c10d._get_group_size_by_name(obj))
    return 0


def _c10d_table() -> dict[Any, tuple[str, Any]]:
    """op packet -> (kind, function(args) -> (payload bytes, group size))."""
    c = torch.ops.c10d
    f = torch.ops._c10d_functional
    table: dict[Any, tuple[str, Any]] = {
        # torch.distributed (c10d) ops: args are (tensors..., process_group, ...)
        c.allreduce_: ("all_reduce", lambda a: (_nbytes(a[0]), _group_size(a[1]))),
        c.allreduce_coalesced_: ("all_reduce", lambda a: (_nbytes(a[0]), _group_size(a[1]))),
        c._allgather_base_: ("all_gather", lambda a: (_nbytes(a[0]), _group_size(a[2]))),
        c.allgather_: ("all_gather", lambda a: (_nbytes(a[0]), _group_size(a[2]))),
        c.allgather_coalesced_: ("all_gather", lambda a: (_nbytes(a[0]), _group_size(a[2]))),
        c.allgather_into_tensor_coalesced_: (
            "all_gather", lambda a: (_nbytes(a[0]), _group_size(a[2]))),
        c._reduce_scatter_base_: ("reduce_scatter", lambda a: (_nbytes(a[1]), _group_size(a[2]))),
        c.reduce_scatter_: ("reduce_scatter", lambda a: (_nbytes(a[1]), _group_size(a[2]))),
        c.reduce_scatter_tensor_coalesced_: (
            "reduce_scatter", lambda a: (_nbytes(a[1]), _group_size(a[2]))),
        c.alltoall_base_: ("all_to_all", lambda a: (_nbytes(a[1]), _group_size(a[2]))),
        c.alltoall_: ("all_to_all", lambda a: (_nbytes(a[1]), _group_size(a[2]))),
        c.broadcast_: ("broadcast", lambda a: (_nbytes(a[0]), _group_size(a[1]))),
        c.reduce_: ("all_reduce", lambda a: (_nbytes(a[0]), _group_size(a[1]))),
        c.send: ("send_recv", lambda a: (_nbytes(a[0]), _group_size(a[1]))),
        # functional collectives (DTensor): (input, ..., group_size?, group_name)
        f.all_reduce: ("all_reduce", lambda a: (_nbytes(a[0]), _group_size(a[2]))),
        f.all_reduce_: ("all_reduce", lambda a: (_nbytes(a[0]), _group_size(a[2]))),
        f.all_reduce_coalesced: ("all_reduce", lambda a: (_nbytes(a[0]), _group_size(a[2]))),
        f.all_gather_into_tensor: (
            "all_gather", lambda a: (_nbytes(a[0]) * int(a[1]), int(a[1]))),
        f.all_gather_into_tensor_coalesced: (
            "all_gather", lambda a: (_nbytes(a[0]) * int(a[1]), int(a[1]))),
        f.reduce_scatter_tensor: ("reduce_scatter", lambda a: (_nbytes(a[0]), int(a[2]))),
        f.reduce_scatter_tensor_coalesced: (
            "reduce_scatter", lambda a: (_nbytes(a[0]), int(a[2]))),
        f.all_to_all_single: ("all_to_all", lambda a: (_nbytes(a[0]), _group_size(a[3]))),
        f.broadcast: ("broadcast", lambda a: (_nbytes(a[0]), _group_size(a[2]))),
    }
    return {op: v for op, v in table.items()}


class CommCounter(TorchDispatchMode):
    """Counts collective payload bytes by kind while active (and not paused)."""

    def __init__(self) -> None:
        super().__init__()
        self._table = _c10d_table()
        self.bytes: dict[str, int] = defaultdict(int)
        self.calls: dict[str, int] = defaultdict(int)
        self.paused = False

    def reset(self) -> None:
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)

    def snapshot(self) -> dict[str, int]:
        return {k: int(self.bytes.get(k, 0)) for k in KINDS}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: D105
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        from torch.distributed.tensor import DTensor

        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into the collectives it runs
        if func._overloadpacket is torch.ops._c10d_functional.wait_tensor:
            t0 = time.perf_counter()  # a DTensor collective's result being waited for
            try:
                return func(*args, **kwargs)
            finally:
                WAIT_CLOCK.add(time.perf_counter() - t0)
        entry = self._table.get(func._overloadpacket)
        if entry is not None and not self.paused:
            kind, measure = entry
            payload, group = measure(list(args) + list(kwargs.values()))
            if group > 1:
                self.bytes[kind] += payload
                self.calls[kind] += 1
        return func(*args, **kwargs)


class WaitClock:
    """Seconds this process's main thread spends blocked on communication, by bucket:
    `comm` (collectives) and `pipeline` (a pipeline schedule's sends and receives, where a
    stage waits for its neighbour). It times `Work.wait` (every wait Python issues: FSDP2,
    the pipeline schedules, DeepSpeed, synchronous torch.distributed calls) and DTensor's
    `wait_tensor`; DDP's reducer waits inside C++ at the end of backward, so its exposed
    all-reduce time stays inside the compute timer."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.current = "comm"
        self._original: Any = None

    def install(self) -> None:
        """Wrap `Work.wait` (once per process)."""
        if self._original is not None:
            return
        from torch._C._distributed_c10d import Work

        original = Work.wait
        clock = self

        def timed_wait(work: Any, *args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return original(work, *args, **kwargs)
            finally:
                clock.add(time.perf_counter() - t0)

        Work.wait = timed_wait
        self._original = original

    def add(self, seconds: float) -> None:
        self.seconds[self.current] += seconds

    @contextmanager
    def bucket(self, name: str) -> Iterator[None]:
        prev, self.current = self.current, name
        try:
            yield
        finally:
            self.current = prev

    def reset(self) -> None:
        self.seconds = defaultdict(float)

    def snapshot(self) -> dict[str, float]:
        return {"comm": float(self.seconds.get("comm", 0.0)), "pipeline": float(self.seconds.get("pipeline", 0.0))}


WAIT_CLOCK = WaitClock()
