"""How many CPUs this process may actually use: its affinity, capped by a cgroup CPU quota.

``os.sched_getaffinity`` (and ``os.cpu_count``) count the node's cores; in a container with a
CPU limit (Kubernetes ``resources.limits.cpu``, ``docker run --cpus``) the kernel throttles the
process to the quota however many threads it runs. Work sized by the core count there — one
image decode per core, each holding several full-size copies of an image — would allow 64
decodes at once on a 64-core node to a pod that may run two at a time, with a memory limit
(1 GiB, k8s/base/deployment.yaml) sized for about two.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (``2.5`` for 250000/100000), or None when
    there is none or it cannot be read: cgroup v2's ``cpu.max`` ("QUOTA PERIOD", "max" for none),
    else cgroup v1's ``cpu/cpu.cfs_quota_us`` (-1 for none) and ``cpu/cpu.cfs_period_us``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def usable_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process can use at once: its affinity, capped by the cgroup quota rounded up."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None and limit > 0:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
