"""Compose parallel, parallel_multiple and multiple training rows from the training side's own rows.

    python -m stages.compose data/split/train.jsonl models/base data/compose/composed.jsonl metrics/compose.json

Reads params [compose] (all but compose.use, which only stage validate reads:
the composed rows join the training side there when it is true) and
validate.max_seq_len. Reads the split's training rows only, so every composed
row offers training functions only (toolcall/bfcl/compose.py says how each
kind is made). Each row is checked as stage validate checks a training row
(the gold calls pass the scorer, the model's template round-trips them, the
example fits validate.max_seq_len); rows that fail, and duplicates, are
dropped, counted by reason, and drawn again.

Writes the composed rows (normalized rows tagged ``source: composed_<kind>``)
and the metrics: per kind the rows, their calls-per-row histogram, the
training rows used and the drops by reason; both files land together or not
at all.
"""

import argparse
import time

from toolcall.bfcl.compose import compose
from toolcall.bfcl.rows import read_rows
from toolcall.bfcl.validate import row_problem
from toolcall.calls.prompts import PromptFormat
from toolcall import config
from toolcall.errors import run_stage
from toolcall.io import json_text, jsonl_text, write_texts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("train")
    ap.add_argument("model_dir")
    ap.add_argument("out")
    ap.add_argument("metrics")
    args = ap.parse_args()
    p, max_seq_len = config.load("compose"), config.load("validate").max_seq_len
    from mlx_lm.utils import load_tokenizer

    fmt = PromptFormat(load_tokenizer(args.model_dir))
    rows = read_rows(args.train)
    start = time.perf_counter()
    composed, metrics = compose(rows, p, lambda row: row_problem(row, fmt, max_seq_len)[0])
    write_texts({args.out: jsonl_text(composed), args.metrics: json_text(metrics)})
    for kind, m in metrics["by_kind"].items():
        print(f"{kind}: {m['n']} rows, calls {m['calls']}, from {m['training_rows_used']} training rows; "
              f"dropped {m['dropped']}")
    print(f"composed {metrics['n']} rows from {len(rows)} training rows in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    run_stage(main)
