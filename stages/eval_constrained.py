"""Schema-constrained greedy decoding of a greedy eval's items, scored and paired against that eval.

    python -m stages.eval_constrained sft/s0 --model models/base --adapter models/sft/s0 \
        --test data/validated/dataset/test.parquet --greedy data/predictions/sft/s0.jsonl \
        --metrics metrics/eval_constrained/sft/s0.json --predictions data/predictions_constrained/sft/s0.jsonl
    python -m stages.eval_constrained sft --model models/base --adapter models/sft/s0 \
        --test data/validated/dataset/test.parquet --greedy data/predictions/sft/s0.jsonl \
        --metrics metrics/ablations/constrained/sft.json --predictions data/ablations/constrained/sft.jsonl \
        --baseline

Reads params [eval] (max_tokens, batch_size, workers: as the greedy eval).
Each item's offered functions become a grammar (toolcall.calls.constrained) that
only the calls the prompt format asks for satisfy, and the items are decoded
under it in as many processes as the eval stage. Two uses: the main study's
constrained column (stages eval_constrained_base, eval_constrained@<variant>-<seed>:
every variant and seed, once each) and the scaffolding ablation
(ablation_constrained@<arm>), which adds ``--baseline``: the same items decoded
again without the constraint in the same run, the speed baseline (its outputs
should equal the greedy predictions), at twice the cost.
Writes --metrics (accuracy with Wilson intervals, the paired table against the
greedy predictions, outputs finished by the grammar at max_tokens, unparseable
outputs and unoffered names: both 0 by construction, generated tokens; with
--baseline the baseline's tokens and how many of its outputs equal the greedy
ones), the wall-clock cost beside it (<metrics>.timings.json: examples/s and
tokens/s of each run) and the scored predictions to --predictions.
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
    ap.add_argument("--metrics", required=True, help="the metrics JSON to write")
    ap.add_argument("--predictions", required=True, help="the scored predictions (JSONL) to write")
    ap.add_argument("--baseline", action="store_true",
                    help="also decode the items without the constraint (the speed baseline; twice the time)")
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
    kinds = {"constrained": {"generator": constrained.generate, "per_prompt": {"grammars": grammars}}}
    if args.baseline:  # decoded first, as the ablation's committed timings were taken
        kinds = {"unconstrained": {}, **kinds}
    runs, timings = {}, {"workers": workers}
    for kind, extra in kinds.items():
        start = time.perf_counter()
        runs[kind] = generate_sharded(args.model, args.adapter, prompts, workers=workers,
                                      progress=f"{kind} {args.name}", max_tokens=p.max_tokens,
                                      batch_size=p.batch_size, **extra)
        seconds = time.perf_counter() - start
        timings[kind] = {"seconds": round(seconds, 1), "examples_per_second": round(len(rows) / seconds, 3),
                         "tokens_per_second": round(sum(o[1] for o in runs[kind]) / seconds, 1)}
    records = scaffold.constrained_records(rows, runs["constrained"])
    metrics = scaffold.constrained_summary(rows, records, greedy, runs.get("unconstrained"))
    # Both land together or not at all, as the eval stage's.
    write_texts({args.predictions: jsonl_text(records), args.metrics: json_text(metrics)})
    write_timings(args.metrics, timings)
    o, t, c = metrics["overall"], metrics["paired"], metrics["constrained"]
    speed = f"{timings['constrained']['examples_per_second']} examples/s"
    if args.baseline:
        speed += f" vs {timings['unconstrained']['examples_per_second']} unconstrained"
    print(f"{args.name}: constrained {o['accuracy']:.1%} of {o['n']}, {t['only_before']} right only greedy, "
          f"{t['only_after']} only constrained; {c['finished_at_max_tokens']} finished at max_tokens; {speed}")


if __name__ == "__main__":
    run_stage(main)
