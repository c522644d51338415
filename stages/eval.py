"""Greedy-decode the test split with one model variant and score it.

    python -m stages.eval sft/s0 --model models/base --adapter models/sft/s0
    python -m stages.eval base --model models/base
    python -m stages.eval sft/s0 --model models/base --adapter models/sft/s0 \
        --test data/validated/dataset/test_live.parquet --metrics metrics/eval_live/sft/s0.json \
        --predictions data/predictions_live/sft/s0.jsonl

Reads params [eval]. Generation runs in one process per usable core, capped
by memory, one on a GPU (``eval.workers: auto``; a count, or ``--workers``,
overrides it; outputs do not depend on it). The variant names the outputs (a
seed's run is ``<variant>/s<seed>``): metrics/eval/<variant>.json (overall
and per-category accuracy with Wilson 95% intervals and the share of wrong
answers with the wrong number of calls, error counts) and
data/predictions/<variant>.jsonl (raw output, parsed calls, verdict per item).
Another test file (--test: the live test, stage eval_live; an ablation's)
names its outputs with --metrics and --predictions.
"""

import argparse
import time

from toolcall.bfcl.dataset import read_split
from toolcall.calls.prompts import PromptFormat
from toolcall import config
from toolcall.errors import run_stage
from toolcall.evaluate.score import score_output, summarize
from toolcall.evaluate.sharding import generate_sharded, resolve_workers
from toolcall.io import json_text, jsonl_text, write_texts, write_timings


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant")
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--test", default="data/validated/dataset/test.parquet",
                    help="a dataset split's .parquet, or JSONL")
    ap.add_argument("--metrics", help="default: metrics/eval/<variant>.json")
    ap.add_argument("--predictions", help="default: data/predictions/<variant>.jsonl")
    ap.add_argument("--workers", type=int, help="generating processes (default: params eval.workers)")
    args = ap.parse_args()
    metrics_path = args.metrics or f"metrics/eval/{args.variant}.json"
    predictions_path = args.predictions or f"data/predictions/{args.variant}.jsonl"
    p = config.load("eval")
    rows = read_split(args.test)  # before the slow model load: a bad test file fails at once
    from mlx_lm import load

    _, tokenizer = load(args.model, lazy=True)  # the tokenizer only: each worker loads the weights
    fmt = PromptFormat(tokenizer)
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    workers = args.workers or resolve_workers(p.workers, args.model, p.batch_size,
                                              max(map(len, prompts)) + p.max_tokens)
    start = time.perf_counter()
    outputs = generate_sharded(args.model, args.adapter, prompts, workers=workers, progress=f"eval {args.variant}",
                               max_tokens=p.max_tokens, batch_size=p.batch_size)
    seconds = time.perf_counter() - start
    records = [score_output(row, text) for row, (text, _) in zip(rows, outputs)]
    metrics = summarize(records)
    # Both land together or not at all: a Ctrl-C or a full disk never leaves new predictions beside old metrics.
    write_texts({predictions_path: jsonl_text(records), metrics_path: json_text(metrics)})
    write_timings(metrics_path, {"seconds": round(seconds, 1), "examples_per_second": round(len(rows) / seconds, 3),
                                 "tokens_per_second": round(sum(n for _, n in outputs) / seconds, 1),
                                 "workers": workers})
    o = metrics["overall"]
    print(f"{args.variant}: {o['accuracy']:.1%} of {o['n']} (95% CI {o['ci95'][0]:.1%}-{o['ci95'][1]:.1%})")


if __name__ == "__main__":
    run_stage(main)
