"""How many CPUs this container may use: the one answer every thread count in the serving image follows.

A pod's CPU limit is a CFS quota on its cgroup, not a smaller CPU set: the
process still sees (and may be scheduled on) every core of the node. Sizing
ONNX Runtime's threads from the cores in sight would run, say, 16 threads in
a 2-CPU quota, and the throttling that follows is a latency the plan never
predicted. So the quota comes first, as cgroup v2 (``cpu.max``) or cgroup v1
(``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, still the layout of many nodes
and of kind nodes on them) writes it; the cores in the affinity mask are the
answer only when there is no quota, and always the ceiling.

Kept free of ONNX Runtime and aiohttp so the sidecar, the bench and the
operator's local runs can import it without the model server's start-up cost.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
#: Where cgroup v1 mounts the cpu controller: alone, or joined with cpuacct (systemd's and Docker's layout).
V1_CPU_DIRS = ("cpu", "cpu,cpuacct")


def _quota_v2(root: Path) -> float | None:
    """CPUs from cgroup v2's ``cpu.max`` ("<quota> <period>" or "max <period>"); None when absent or unlimited."""
    try:
        quota, period = (root / "cpu.max").read_text().split()
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def _quota_v1(root: Path) -> float | None:
    """CPUs from cgroup v1's CFS quota and period; None when absent or unlimited (a quota of -1)."""
    for name in V1_CPU_DIRS:
        folder = root / name
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        if quota <= 0 or period <= 0:
            return None
        return quota / period
    return None


def quota_cpus(cgroup_root: str | Path = CGROUP_ROOT) -> float | None:
    """The CPU quota under ``cgroup_root`` in CPUs (fractional, as written), v2 first, then v1; None: no quota.

    A v2 ``cpu.max`` of "max" is an answer (unlimited), not a reason to look
    for v1 files: a host has one cpu controller, and on a v2 host a stray v1
    folder is not this container's.
    """
    root = Path(cgroup_root)
    if (root / "cpu.max").is_file():
        return _quota_v2(root)
    return _quota_v1(root)


def cpu_limit(cgroup_root: str | Path = CGROUP_ROOT, affinity: int | None = None) -> int:
    """Whole CPUs this process may use: the cgroup quota rounded up, at least 1, at most the affinity count.

    Rounded up because a quota of 1.5 CPUs keeps two threads busy for most of
    each period; capped at the affinity count because no quota makes more
    cores than the scheduler may use. ``affinity`` is the number of CPUs in
    this process's affinity mask when not given (a parameter so tests can fix it).
    """
    cores = affinity if affinity is not None else len(os.sched_getaffinity(0))
    cores = max(1, cores)
    quota = quota_cpus(cgroup_root)
    if quota is None:
        return cores
    return max(1, min(cores, math.ceil(quota)))
