"""How many processes: the cores a process may use (affinity, cgroup quota), free memory, one on a GPU."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_model import make_tiny_model
from toolcall import resources
from toolcall.evaluate import sharding

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def cgroup_v2(tmp_path, path, files):
    """A fake unified hierarchy: ``files`` maps a cgroup dir (relative) to {name: content}."""
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory\n")
    for d, contents in files.items():
        (root / d).mkdir(parents=True, exist_ok=True)
        for name, text in contents.items():
            (root / d / name).write_text(text)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{path}\n")
    return root, proc


def test_cgroup_v2_quota_is_the_strictest_along_the_path(tmp_path):
    # A 4-CPU limit on the parent (a container), 1.5 CPUs on this process's own cgroup.
    root, proc = cgroup_v2(tmp_path, "/box/job", {"box": {"cpu.max": "400000 100000\n"},
                                                 "box/job": {"cpu.max": "150000 100000\n"}})
    assert resources.cgroup_cpu_limit(root, proc) == 1.5
    assert resources.usable_cores(root, proc) == min(2, resources.affinity_cores())  # 1.5 rounds up


def test_cgroup_v2_without_a_quota_leaves_the_affinity(tmp_path):
    root, proc = cgroup_v2(tmp_path, "/", {".": {"cpu.max": "max 100000\n"}})
    assert resources.cgroup_cpu_limit(root, proc) is None
    assert resources.usable_cores(root, proc) == resources.affinity_cores()


def test_a_64_core_host_with_a_1_cpu_container_gives_one_core(tmp_path):
    root, proc = cgroup_v2(tmp_path, "/", {".": {"cpu.max": "100000 100000\n"}})
    assert resources.usable_cores(root, proc) == 1


def test_cgroup_v1_quota_and_its_no_limit_value(tmp_path):
    root = tmp_path / "cgroup"
    (root / "cpu,cpuacct" / "docker" / "abc").mkdir(parents=True)
    (root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us").write_text("300000\n")
    (root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us").write_text("100000\n")
    (root / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")  # the root: no quota
    (root / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    proc = tmp_path / "proc_cgroup"
    proc.write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert resources.cgroup_cpu_limit(root, proc) == 3.0


def test_no_cgroup_information_means_no_limit(tmp_path):
    assert resources.cgroup_cpu_limit(tmp_path, tmp_path / "missing") is None


def test_the_affinity_of_the_process_counts_not_the_machine():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    # A fresh process pinned to one core (what taskset or docker --cpuset-cpus do).
    code = ("import os, sys; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
            "from toolcall import resources; print(resources.usable_cores())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.stdout.strip() == "1"


def test_free_memory_is_capped_by_the_cgroup_limit(tmp_path):
    root, proc = cgroup_v2(tmp_path, "/job", {"job": {"memory.max": f"{4 * GiB}\n", "memory.current": f"{GiB}\n"}})
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {64 * GiB // 1024} kB\nMemAvailable: {32 * GiB // 1024} kB\n")
    assert resources.available_memory(root, proc, meminfo) == 3 * GiB
    (root / "job" / "memory.max").write_text("max\n")
    assert resources.available_memory(root, proc, meminfo) == 32 * GiB


def test_default_workers_one_per_core_capped_by_memory_and_one_on_a_gpu():
    assert sharding.default_workers(GiB, cores=4, memory=64 * GiB, gpu=False) == 4
    assert sharding.default_workers(GiB, cores=4, memory=int(2.5 * GiB), gpu=False) == 2  # two model copies fit
    assert sharding.default_workers(GiB, cores=4, memory=GiB // 2, gpu=False) == 1  # never fewer than one
    assert sharding.default_workers(GiB, cores=64, memory=64 * GiB, gpu=True) == 1  # one process owns the GPU


def test_a_model_copy_needs_its_weights_and_kv_cache(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    small, large = sharding.copy_bytes(model, 1, 100), sharding.copy_bytes(model, 32, 1000)
    assert weights + sharding.PROCESS_BYTES < small < large


def test_the_eval_param_picks_auto_or_a_count(tmp_path):
    model = make_tiny_model(tmp_path / "tiny")
    assert sharding.resolve_workers(3, model, 32, 600) == 3
    assert 1 <= sharding.resolve_workers("auto", model, 32, 600) <= resources.usable_cores()
