"""Memory section: the machine's memory bandwidth, a large array copy on every usable core and on one.

    python -m bench.memory [--repeats 3] [--out metrics/bench.json]

Each thread copies its own 256 MiB float32 array into another, over and over
(numpy's copy releases the GIL, so the threads run side by side); bytes read
plus bytes written per second, summed over the threads (STREAM's "copy"
convention). The all-cores arm is the bandwidth the eval's floor divides its
decode bytes by (``bench/floor.py``), as the matmul section's GFLOP/s is the
ceiling for its FLOPs.
"""

import sys
import time
from pathlib import Path

if not __package__:  # python bench/memory.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import f, log, rate_stats, run_worker, section_main

ARRAY_BYTES = 256 * 2**20  # per thread: far past any cache


def worker(spec):
    import threading

    import numpy as np

    n, seconds = ARRAY_BYTES // 4, spec["seconds"]
    sources = [np.ones(n, np.float32) for _ in range(spec["threads"])]
    targets = [np.empty_like(s) for s in sources]
    rates = [0.0] * len(sources)
    start = threading.Barrier(len(sources))

    def copy(i):
        np.copyto(targets[i], sources[i])  # first touch: the pages exist before the clock starts
        start.wait()
        t0, copies = time.perf_counter(), 0
        while copies < 3 or time.perf_counter() - t0 < seconds:
            np.copyto(targets[i], sources[i])
            copies += 1
        rates[i] = 2 * ARRAY_BYTES * copies / (time.perf_counter() - t0) / 1e9

    threads = [threading.Thread(target=copy, args=(i,)) for i in range(len(sources))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"gbps": sum(rates)}


WORKERS = {"memory": worker}


def add_args(ap):
    pass


def run(args, params):
    from toolcall import resources

    arms = {"all_cores": resources.usable_cores(), "one_thread": 1}
    runs = {arm: [] for arm in arms}
    for r in range(args.repeats):
        for arm, threads in arms.items():
            runs[arm].append(run_worker("memory", "memory", {"threads": threads, "seconds": 2})["gbps"])
        log(f"memory {r + 1}/{args.repeats}: " + ", ".join(f"{a} {runs[a][-1]:.1f}" for a in runs) + " GB/s")
    out = {"array_bytes": ARRAY_BYTES, "threads": arms, **{arm: rate_stats(x) for arm, x in runs.items()}}
    return {"memory": out, "memory_gbps": {arm: out[arm]["median"] for arm in arms}}


def rows(r):
    if "memory" not in r:
        return []
    m = r["memory_gbps"]
    return [(f"memory copy GB/s (read + write): {r['memory']['threads']['all_cores']} threads vs one",
             f(m["all_cores"]), f(m["one_thread"]), f"{m['all_cores'] / m['one_thread']:.2f}x", "")]


if __name__ == "__main__":
    section_main(sys.modules[__name__])
