"""The host a run executes on: the CPU cores this process may use. The cost model takes
the count as an input (`costmodels.hardware.cpu_threads_per_rank`); it is read here."""

from __future__ import annotations

import math
import os


def cgroup_cpu_limit(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs a container's cgroup quota allows (v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
    `cpu.cfs_period_us`); None when unlimited or not readable."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota_us = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period_us = int(f.read())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


def host_cores() -> int:
    """CPU cores this process may run on: its affinity mask (else the machine's count),
    capped by a container's CPU quota, so ranks never start more threads than they get."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        cores = min(cores, math.ceil(limit))
    return max(1, cores)
