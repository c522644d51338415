"""Schema-constrained greedy decoding on the greedy eval's items, scored, and timed against unconstrained.

    python -m stages.ablation_constrained sft --model models/base --adapter models/sft/s0 \
        --test data/validated/dataset/test.parquet --greedy data/predictions/sft/s0.jsonl

Reads params [eval] (max_tokens, batch_size, workers: as the greedy eval).
Each item's offered functions become a grammar (toolcall.calls.constrained) that
only the calls the prompt format asks for satisfy. The same items are decoded
twice, in as many processes as the eval stage: without the constraint (the speed
baseline; its outputs should equal the greedy predictions) and with it.
Writes metrics/ablations/constrained/<name>.json (accuracy with Wilson
intervals, the paired table against the greedy predictions, outputs finished by
the grammar at max_tokens, unparseable outputs and unoffered names: both 0 by
construction, generated tokens of both runs), the wall-clock cost beside it
(<name>.timings.json: examples/s and tokens/s of both) and the predictions to
data/ablations/constrained/<name>.jsonl.
"""

import time

from toolcall.bfcl.dataset import read_split
from toolcall.calls import constrained
from toolcall.calls.prompts import PromptFormat
from toolcall import config
from toolcall.errors import DataError, UserError, run_stage
from toolcall.evaluate import scaffold
from toolcall.evaluate.sharding import generate_sharded, resolve_workers
from toolcall.io import json_text, jsonl_text, read_jsonl, write_texts, write_timings


def main():
    ap = scaffold.arm_parser(__doc__)
    ap.add_argument("--workers", type=int, help="generating processes (default: params eval.workers)")
    args = ap.parse_args()
    p = config.load("eval")
    rows, greedy = read_split(args.test), read_jsonl(args.greedy)
    if [r["id"] for r in greedy] != [r["id"] for r in rows]:
        raise DataError(f"{args.greedy}: its items are not {args.test}'s, in order; rerun the eval that writes it")
    from mlx_lm import load

    _, tokenizer = load(args.model, lazy=True)  # the tokenizer only: each worker loads the weights
    fmt = PromptFormat(tokenizer)
    try:
        cf = constrained.call_format(fmt)
    except ValueError as e:
        raise UserError(f"{args.model}: {e}") from None
    grammars = []
    for row in rows:
        try:
            grammars.append(constrained.grammar(row["functions"], cf))
        except ValueError as e:
            raise DataError(f"{args.test}: item {row['id']}: {e}") from None
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    workers = args.workers or resolve_workers(p.workers, args.model, p.batch_size,
                                              max(map(len, prompts)) + p.max_tokens)
    runs, timings = {}, {"workers": workers}
    for kind, extra in (("unconstrained", {}),
                        ("constrained", {"generator": constrained.generate, "per_prompt": {"grammars": grammars}})):
        start = time.perf_counter()
        runs[kind] = generate_sharded(args.model, args.adapter, prompts, workers=workers,
                                      progress=f"{kind} {args.name}", max_tokens=p.max_tokens,
                                      batch_size=p.batch_size, **extra)
        seconds = time.perf_counter() - start
        timings[kind] = {"seconds": round(seconds, 1), "examples_per_second": round(len(rows) / seconds, 3),
                         "tokens_per_second": round(sum(o[1] for o in runs[kind]) / seconds, 1)}
    records = scaffold.constrained_records(rows, runs["constrained"])
    metrics = scaffold.constrained_summary(rows, records, greedy, runs["unconstrained"])
    metrics_path = f"metrics/ablations/constrained/{args.name}.json"
    write_texts({f"data/ablations/constrained/{args.name}.jsonl": jsonl_text(records),
                 metrics_path: json_text(metrics)})
    write_timings(metrics_path, timings)
    o, t, c = metrics["overall"], metrics["paired"], metrics["constrained"]
    u, k = timings["unconstrained"]["examples_per_second"], timings["constrained"]["examples_per_second"]
    print(f"{args.name}: constrained {o['accuracy']:.1%} of {o['n']}, {t['only_before']} right only greedy, "
          f"{t['only_after']} only constrained; {c['finished_at_max_tokens']} finished at max_tokens; "
          f"{k} examples/s vs {u} unconstrained")


if __name__ == "__main__":
    run_stage(main)
