"""What this process may use: cores, memory, and whether MLX computes on a GPU.

``os.cpu_count()`` counts the machine's cores, not the ones a process may
run on: inside a container limited to 4 cores of a 64-core host it says 64.
The cores a process may use are the fewer of its CPU affinity
(``os.sched_getaffinity``: ``taskset``, ``docker --cpuset-cpus``) and its
cgroup's CPU quota (``docker --cpus``, Kubernetes CPU limits; cgroup v2
``cpu.max`` or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, the
strictest along the cgroup's path). Free memory is likewise the fewer of the
machine's ``MemAvailable`` and the cgroup's limit minus its usage.

The cgroup and ``/proc`` roots are arguments so the tests can point them at
fake files.
"""

import math
import os
from pathlib import Path

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_CGROUP = "/proc/self/cgroup"
MEMINFO = "/proc/meminfo"


def gpu_default():
    """True when MLX's default device is a GPU (Metal, CUDA): one process uses it all."""
    import mlx.core as mx

    return mx.default_device().type == mx.DeviceType.gpu


def affinity_cores():
    """Cores this process may be scheduled on (all of the machine's where affinity is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # macOS has no sched_getaffinity
        return os.cpu_count() or 1


def _cgroup_dirs(root, proc_cgroup, controller):
    """This process's cgroup directories for ``controller``, innermost first, up to the root.

    ``(directory, version)`` pairs; v2 is the unified hierarchy (``0::/path``),
    v1 a per-controller mount (``N:cpu,cpuacct:/path`` under ``root/cpu,cpuacct``).
    Every matching line counts (a hybrid system lists both).
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return []
    root, out = Path(root), []
    for line in lines:
        hid, controllers, path = line.split(":", 2)
        if hid == "0" and controllers == "":
            # Hybrid systems mount the v2 hierarchy at root/unified, beside the v1 controllers.
            mount, version = (root if (root / "cgroup.controllers").exists() else root / "unified"), 2
        elif controller in controllers.split(","):
            mount = next((root / name for name in (controllers, controller) if (root / name).is_dir()), None)
            if mount is None:
                continue
            version = 1
        else:
            continue
        # Inside a cgroup namespace the path is "/" and the mount is already this cgroup;
        # without one the path leads from the mount down to it.
        here = mount / path.lstrip("/")
        if not here.is_dir():
            here = mount
        out.append((here, version))
        while here != mount:
            here = here.parent
            out.append((here, version))
    return out


def _read(path):
    try:
        return Path(path).read_text().split()
    except OSError:
        return None


def cgroup_cpu_limit(root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP):
    """CPUs the cgroup quota allows (e.g. 1.5), the strictest along the path; None when unlimited."""
    limits = []
    for d, version in _cgroup_dirs(root, proc_cgroup, "cpu"):
        if version == 2:
            words = _read(d / "cpu.max")  # "max 100000" or "150000 100000"
            if words and words[0] != "max":
                limits.append(int(words[0]) / int(words[1]))
        else:
            quota, period = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
            if quota and period and int(quota[0]) > 0:  # -1: no quota
                limits.append(int(quota[0]) / int(period[0]))
    return min(limits) if limits else None


def usable_cores(root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP):
    """Cores this process may keep busy: its affinity, capped by the cgroup quota (rounded up, at least 1).

    Rounded up: a quota of 1.5 CPUs keeps two single-threaded processes busy
    75% of the time each, more work than one process gets done.
    """
    cores = affinity_cores()
    quota = cgroup_cpu_limit(root, proc_cgroup)
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def available_memory(root=CGROUP_ROOT, proc_cgroup=PROC_CGROUP, meminfo=MEMINFO):
    """Bytes this process can still allocate: ``MemAvailable``, capped by the cgroup's limit minus usage.

    None when neither is known (not Linux).
    """
    free = []
    for line in (Path(meminfo).read_text().splitlines() if Path(meminfo).exists() else []):
        if line.startswith("MemAvailable:"):
            free.append(int(line.split()[1]) * 1024)
    for d, version in _cgroup_dirs(root, proc_cgroup, "memory"):
        limit, used = ((_read(d / "memory.max"), _read(d / "memory.current")) if version == 2 else
                       (_read(d / "memory.limit_in_bytes"), _read(d / "memory.usage_in_bytes")))
        # v2 says "max" when unlimited; v1 a huge number (close to 2^63).
        if limit and used and limit[0] != "max" and int(limit[0]) < 1 << 60:
            free.append(max(0, int(limit[0]) - int(used[0])))
    return min(free) if free else None
