"""`make bench`: this pipeline vs plain mlx-lm on this machine, every section in one run.

    python bench/bench.py [--only matmul,memory,ops,train,eval,repro] [--repeats 3] [--out metrics/bench.json]

One module per section, each also runnable alone (``python -m bench.<section>``,
which merges its keys into the results file instead of writing it afresh):

* ``bench/matmul.py``: float32 matmul GFLOP/s, OpenBLAS vs MLX's bundled BLAS (the ceiling).
* ``bench/memory.py``: memory copy GB/s, every core and one (the other ceiling).
* ``bench/ops.py``: where one transformer block's time goes at eval shapes.
* ``bench/train.py``: SFT tokens/s vs ``python -m mlx_lm lora``; data-parallel ranks vs one process.
* ``bench/eval.py``: eval examples/s vs one prompt at a time and vs its floor (``bench/floor.py``);
  fast vs reference greedy outputs.
* ``bench/repro.py``: a no-op ``dvc repro``.

``bench/common.py`` holds what they share (fresh-process workers, medians,
the machine, the results file). Medians of ``--repeats`` runs, arms
interleaved so drifting background load hits both. Writes
``metrics/bench.json``: each section's raw medians and runs, and the headline
keys ``train_speedup_vs_mlx_lm``, ``train_ceiling_fraction``, ``dp_ranks``,
``dp_loss_max_abs_diff``, ``eval_speedup_vs_sequential``, ``eval_seconds``,
``eval_floor_seconds``, ``eval_fraction_of_floor``,
``greedy_agreement_fast_vs_reference``, ``noop_repro_s`` with issues 13's
and 29's targets beside them.
"""

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # python bench/bench.py
from bench import common, matmul, memory, ops, repro, train  # noqa: E402
from bench import eval as eval_section  # noqa: E402  (not the builtin)

SECTIONS = {"matmul": matmul, "memory": memory, "ops": ops, "train": train, "eval": eval_section, "repro": repro}


def main():
    ap = argparse.ArgumentParser(description="Benchmark the pipeline against plain mlx-lm (see module doc).")
    common.add_common_args(ap)
    for module in SECTIONS.values():
        module.add_args(ap)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))  # run the cleanups
    chosen = args.only.split(",")
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        ap.error(f"unknown sections {unknown}; known: {list(SECTIONS)}")
    params = common.params_at(args.params)
    start = time.perf_counter()
    result = {"machine": common.machine_info(),
              "config": {k: common.shown(getattr(args, k)) for k in (
                  "model", "adapter", "train", "test", "train_steps", "dp_steps", "eval_items", "agreement_items",
                  "repeats", "sequential_repeats")}}
    for name in chosen:
        result.update(SECTIONS[name].run(args, params))
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["bench_seconds"] = round(time.perf_counter() - start, 1)
    common.derive(result)
    from toolcall.io import write_json

    write_json(args.out, result)
    print(common.format_table([row for module in SECTIONS.values() for row in module.rows(result)]))
    print(f"\nwrote {args.out} ({result['bench_seconds']:.0f}s)")


if __name__ == "__main__":
    main()
