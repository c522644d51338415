"""What every bench section shares: fresh-process workers, medians, the machine, the results file.

Each measurement runs in its own interpreter (``run_worker``): OpenBLAS has to
be loaded before ``mlx.core`` is imported, and every arm starts from a fresh
process. A worker is a function in a section module's ``WORKERS`` (or in
bench.mlxlm's, the train section's baseline); it prints one ``RESULT_TAG``
line of JSON. Section modules import nothing heavy at the top (no mlx), so
the orchestrating process stays light.

A section run alone (``python -m bench.train``, ``python bench/train.py``)
merges its keys into the results file (``--out``, default
metrics/bench.json) and records when and how it ran under ``sections``;
``python bench/bench.py`` (``make bench``) runs every section and writes the
file afresh.
"""

import argparse
import json
import os
import platform
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from toolcall.repo import shown  # noqa: E402  (paths in the metrics files bench writes: repo-relative)

RESULT_TAG = "BENCH_RESULT "


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else None


def spread(xs):
    return [round(min(xs), 4), round(max(xs), 4)] if xs else None


def rate_stats(values):
    return {"median": median(values), "min_max": spread(values), "runs": [round(v, 4) for v in values]}


def evenly(n_total, n):
    """``n`` row indices spread evenly over ``n_total`` rows (all categories, all lengths)."""
    if n > n_total:
        raise SystemExit(f"asked for {n} rows, the file has {n_total}")
    return [i * n_total // n for i in range(n)]


def count_rows(path):
    with open(path) as f:
        return sum(1 for line in f if line.strip())


# ====================================================================== inside workers


def load_rows(path, indices):
    from toolcall.io import read_jsonl

    rows = read_jsonl(path)
    return [rows[i] for i in indices]


def examples(tokenizer, rows):
    """``(tokens, prompt_len)`` SFT examples of ``rows``, as the train_sft stage builds them."""
    from toolcall.bfcl.rows import gold_calls
    from toolcall.calls.prompts import PromptFormat

    fmt = PromptFormat(tokenizer)
    return [fmt.example(r, gold_calls(r["ground_truth"])) for r in rows]


def rusage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def batch_counter(iterate, counts, per_row):
    """Wrap an ``iterate_batches`` to count the padded positions it hands out."""

    def wrapped(*args, **kwargs):
        for batch in iterate(*args, **kwargs):
            tokens, lengths = batch[0], batch[1]
            counts["batches"] += 1
            real = int(lengths[:, 1].sum().item()) + per_row * tokens.shape[0]
            counts.setdefault("first_batch_tokens", real)
            counts["padded_positions"] += int(tokens.size)
            counts["real_tokens"] += real
            yield batch

    return wrapped


class Recorder:
    """Keeps every trainer report (we run with steps_per_report=1)."""

    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        self.reports.append(dict(info))

    def on_val_loss_report(self, info):
        pass

    def summary(self):
        step_s = [1.0 / r["iterations_per_second"] for r in self.reports]
        return {
            "step_seconds": [round(s, 4) for s in step_s],
            "train_seconds": sum(step_s),
            "losses": [r["train_loss"] for r in self.reports],
            "peak_memory_gb": max(r["peak_memory"] for r in self.reports),
            "target_tokens": self.reports[-1]["trained_tokens"],
        }


# ====================================================================== workers


def run_worker(module, name, spec, env=None, timeout=3600):
    """Run worker ``name`` of ``bench.<module>`` in a fresh interpreter; return its JSON result."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    full_env.update(env or {})
    with tempfile.NamedTemporaryFile("w", prefix="bench-spec-", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        proc = subprocess.run([sys.executable, "-m", f"bench.{module}", "--worker", name, f.name],
                              env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"worker {module}.{name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n"
                       f"{proc.stderr[-4000:]}")


# ====================================================================== the machine


def machine_info():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    from toolcall import resources

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": resources.usable_cores(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "dvc": version("dvc"),
        "openblas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def model_shape(model_dir):
    with open(Path(model_dir) / "config.json") as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    d, q, kv = c["hidden_size"], c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    return {
        "hidden": d,
        "layers": c["num_hidden_layers"],
        "vocab": c["vocab_size"],
        "heads": c["num_attention_heads"],
        "kv_heads": c["num_key_value_heads"],
        "head_dim": head_dim,
        "intermediate": c["intermediate_size"],
        "attn_width": q,
        # q, k, v, o projections + gate, up, down
        "block_params": d * q + 2 * d * kv + q * d + 3 * d * c["intermediate_size"],
    }


# ====================================================================== the results file


def add_common_args(ap):
    """Options every section reads (``bench.py`` adds each section's own beside them)."""
    ap.add_argument("--model", default=str(ROOT / "models" / "base"))
    ap.add_argument("--adapter", default=None, help="eval with this adapter (default: the base model)")
    ap.add_argument("--train", default=str(ROOT / "data" / "validated" / "train.jsonl"))
    ap.add_argument("--test", default=str(ROOT / "data" / "validated" / "test.jsonl"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--leads", action="store_true",
                    help="also measure the issue's leads: BLAS thread settings, eval batch/prefill/order sweep")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench.json"))


def params_at(path):
    """The params file ``path``'s sections, each read and checked by ``toolcall.config.load``:
    ``params_at(path)("eval")`` is its [eval], ``params_at(path)("sft", seed=0)`` its [sft] at seed 0."""
    from toolcall import config

    return lambda name, **kw: config.load(name, path=path, **kw)


def derive(r):
    """The headline keys that combine sections (each needs both of its sections in ``r``)."""
    if "train" in r and "matmul_gflops" in r:
        ceiling = r["matmul_gflops"]["openblas"]
        r["train_fraction_of_matmul_ceiling"] = {arm: r["train"][arm]["achieved_gflops"] / ceiling
                                                 for arm in ("ours", "mlx_lm")}
        r["train_ceiling_fraction"] = r["train_fraction_of_matmul_ceiling"]["ours"]
    if "work" in r.get("eval", {}) and "matmul_gflops" in r and "memory_gbps" in r:
        from bench.floor import eval_floor

        r["eval_floor"] = eval_floor(r["eval"]["work"], r["matmul_gflops"]["openblas"], r["memory_gbps"]["all_cores"])
        r["eval_floor_seconds"] = r["eval_floor"]["seconds"]
        r["eval_fraction_of_floor"] = r["eval_floor_seconds"] / r["eval_seconds"]
    r["targets"] = targets(r)
    return r


def targets(r):
    """Issues 13's and 29's targets, each where its measurement is in ``r``."""
    t = {}
    if "train_speedup_vs_mlx_lm" in r:
        t["train_speedup_ge_3"] = r["train_speedup_vs_mlx_lm"] >= 3.0
    if "train_ceiling_fraction" in r:
        t["train_ceiling_fraction_ge_0.5"] = r["train_ceiling_fraction"] >= 0.5
    if r.get("dp_loss_max_abs_diff") is not None:
        t["dp_loss_max_abs_diff_le_1e-3"] = r["dp_loss_max_abs_diff"] <= 1e-3
    if "eval_speedup_vs_sequential" in r:
        t["eval_speedup_ge_5.5"] = r["eval_speedup_vs_sequential"] >= 5.5
        t["eval_outputs_identical"] = not r["eval"]["parsed_calls_differ"] and r["eval"]["sharded_equals_one_process"]
    if "eval_fraction_of_floor" in r:
        t["eval_fraction_of_floor_ge_0.6"] = r["eval_fraction_of_floor"] >= 0.6
    if "greedy_agreement_fast_vs_reference" in r:
        a = r["eval"]["fast_vs_reference"]
        t["greedy_agreement_ge_0.98"] = r["greedy_agreement_fast_vs_reference"] >= 0.98
        t["accuracy_fast_vs_reference_within_1_item"] = abs(a["correct_fast"] - a["correct_reference"]) <= 1
    if "llamacpp_ratio" in r:
        t["llamacpp_ratio_ge_1"] = r["llamacpp_ratio"] >= 1.0
    if "noop_repro_s" in r:
        t["noop_repro_lt_5s"] = r["noop_repro_s"] < 5
    return t


def format_table(rows):
    rows = [("measurement", "ours", "baseline", "ratio", ""), *rows]
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


def f(x, nd=1):
    """A number for the table."""
    return "-" if x is None else f"{x:,.{nd}f}"


def ratio(a, b, nd=2):
    return f"{a / b:.{nd}f}x" if a is not None and b else "-"


def met(r, key):
    return "met" if r["targets"].get(key) else "NOT met"


def worker_main(module):
    """``python -m bench.<module> --worker NAME SPEC`` (``run_worker``): run that worker, print its result.

    False when the process was not started so.
    """
    if len(sys.argv) != 4 or sys.argv[1] != "--worker":
        return False
    with open(sys.argv[3]) as fh:
        result = module.WORKERS[sys.argv[2]](json.load(fh))
    print(RESULT_TAG + json.dumps(result), flush=True)
    return True


def section_main(module):
    """``python -m bench.<section>``: that section alone, merged into ``--out``; or one of its workers."""
    if worker_main(module):
        return
    name = Path(module.__file__).stem
    ap = argparse.ArgumentParser(description=module.__doc__.splitlines()[0])
    add_common_args(ap)
    module.add_args(ap)
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))  # run the cleanups
    out = Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    start, load = time.perf_counter(), [round(x, 2) for x in os.getloadavg()]
    result.update(module.run(args, params_at(args.params)))
    result.setdefault("sections", {})[name] = {
        "command": " ".join(["python", "-m", f"bench.{name}", *map(str, map(shown, sys.argv[1:]))]),
        "machine": {**machine_info(), "loadavg_at_start": load,
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
        "seconds": round(time.perf_counter() - start, 1),
    }
    derive(result)
    from toolcall.io import write_json

    write_json(out, result)
    print(format_table(module.rows(result)))
    print(f"\nmerged {name} into {out}")
