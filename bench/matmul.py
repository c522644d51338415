"""Matmul section: float32 GFLOP/s through MLX, OpenBLAS loaded vs MLX's bundled BLAS.

    python -m bench.matmul [--repeats 3] [--out metrics/bench.json]

Arms (medians over ``--repeats`` fresh processes, interleaved): our OpenBLAS
loading (``import toolcall``), without it (``TOOLCALL_NO_OPENBLAS=1``), and
OpenBLAS held to one thread. The first arm is the machine's practical
ceiling that the train section's ``train_ceiling_fraction`` divides by.
"""

import sys
import time
from pathlib import Path

if not __package__:  # python bench/matmul.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import f, log, median, rate_stats, ratio, run_worker, section_main

SHAPES = {"square_1024": (1024, 1024, 1024), "model_mlp_1664x576x1536": (1664, 576, 1536)}


def worker(spec):
    import toolcall  # noqa: F401  (loads OpenBLAS unless TOOLCALL_NO_OPENBLAS)
    import mlx.core as mx

    from toolcall.model import blas

    out = {"blas": blas.loaded_path}
    for name, (m, k, n) in spec["shapes"].items():
        a = mx.random.normal((m, k))
        b = mx.random.normal((k, n))
        mx.eval(a, b)
        mx.eval(a @ b)
        rates = []
        deadline = time.perf_counter() + spec["seconds"]
        while time.perf_counter() < deadline or len(rates) < 3:
            t = time.perf_counter()
            mx.eval(a @ b)
            rates.append(2 * m * k * n / (time.perf_counter() - t) / 1e9)
        out[name] = median(rates)
    return out


WORKERS = {"matmul": worker}


def add_args(ap):
    pass


def run(args, params):
    runs = {"openblas": [], "no_openblas": [], "openblas_1_thread": []}
    envs = {"openblas": {}, "no_openblas": {"TOOLCALL_NO_OPENBLAS": "1"},
            "openblas_1_thread": {"OPENBLAS_NUM_THREADS": "1"}}
    for r in range(args.repeats):
        for arm, env in envs.items():
            runs[arm].append(run_worker("matmul", "matmul", {"shapes": SHAPES, "seconds": 2}, env))
        log(f"matmul {r + 1}/{args.repeats}: " + ", ".join(
            f"{a} {runs[a][-1]['square_1024']:.1f}" for a in runs) + " GFLOP/s")
    out = {"blas": runs["openblas"][0]["blas"], "shapes": {k: list(v) for k, v in SHAPES.items()}}
    for arm, rs in runs.items():
        out[arm] = {name: rate_stats([x[name] for x in rs]) for name in SHAPES}
    gflops = {arm: out[arm]["square_1024"]["median"] for arm in runs}
    return {"matmul": out, "matmul_gflops": gflops, "matmul_speedup": gflops["openblas"] / gflops["no_openblas"]}


def rows(r):
    if "matmul" not in r:
        return []
    m, mm = r["matmul_gflops"], r["matmul"]
    shape = "model_mlp_1664x576x1536"
    return [
        ("float32 matmul 1024^3 GFLOP/s: OpenBLAS loaded vs MLX's bundled BLAS",
         f(m["openblas"]), f(m["no_openblas"]), ratio(m["openblas"], m["no_openblas"], 1), ""),
        ("  model-shaped 1664x576x1536", f(mm["openblas"][shape]["median"]), f(mm["no_openblas"][shape]["median"]),
         ratio(mm["openblas"][shape]["median"], mm["no_openblas"][shape]["median"], 1), ""),
        ("  OpenBLAS default threads vs OPENBLAS_NUM_THREADS=1, 1024^3", f(m["openblas"]),
         f(m["openblas_1_thread"]), ratio(m["openblas"], m["openblas_1_thread"]), ""),
    ]


if __name__ == "__main__":
    section_main(sys.modules[__name__])
