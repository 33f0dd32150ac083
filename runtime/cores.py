"""The CPU cores this process may use, shared by the server's layout and the trainer's threads.

Its CPU affinity, capped by a cgroup CPU quota (a container's `--cpus`, a Kubernetes CPU limit):
not `os.cpu_count()`, which counts the whole machine, so that a container limited to 2 CPUs on a
64-core host does not start 64 threads that wait on each other.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def available_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by the cgroup's CPU quota."""
    cores = len(os.sched_getaffinity(0))
    quota = cgroup_quota()
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def cgroup_quota() -> float | None:
    """The cgroup's CPU quota in cores (v2's cpu.max, else v1's cfs files); None when unlimited."""
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None
