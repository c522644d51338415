"""Best-of-N: sample N outputs per test item, keep one without looking at the answer, score it.

    python -m stages.ablation_best_of_n sft --model models/base --adapter models/sft/s0 \
        --test data/validated/test.jsonl --greedy data/predictions/sft/s0.jsonl

Reads params [eval] (max_tokens, batch_size) and [ablations.scaffold] (n,
temperature, seed, per_category: the first items of each category of the
test file). Writes metrics/ablations/best_of_n/<name>.json (kept-sample
accuracy, oracle pass@N, exact McNemar against the greedy outputs on the same
items) and data/ablations/best_of_n/<name>.jsonl (every sample and the kept one).
"""

import argparse
import dataclasses
import time

from toolcall.calls.prompts import PromptFormat
from toolcall.config import EvalConfig, ScaffoldConfig, from_params
from toolcall.errors import run_stage
from toolcall.evaluate import scaffold
from toolcall.evaluate.generation import generate
from toolcall.io import read_jsonl, read_params, write_json, write_jsonl, write_timings
from toolcall.model.lora import load_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter")
    ap.add_argument("--test", required=True)
    ap.add_argument("--greedy", required=True, help="the variant's greedy predictions on the same test file")
    args = ap.parse_args()
    p = from_params(EvalConfig, read_params("eval"), "eval")
    s = from_params(ScaffoldConfig, read_params("ablations.scaffold"), "ablations.scaffold")
    rows = scaffold.first_per_category(read_jsonl(args.test), s.per_category)
    model, tokenizer = load_model(args.model, args.adapter)
    fmt = PromptFormat(tokenizer)
    n = s.n
    # Each prompt n times in one call: the batch generator samples them side by side.
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows for _ in range(n)]
    start = time.perf_counter()
    outputs = generate(model, tokenizer, prompts, max_tokens=p.max_tokens, temperature=s.temperature,
                       batch_size=p.batch_size, seed=s.seed, progress=f"best-of-{n} {args.name}")
    seconds = time.perf_counter() - start
    samples = [[text for text, _ in outputs[i * n:(i + 1) * n]] for i in range(len(rows))]
    records = scaffold.best_of_n(rows, samples)
    metrics = scaffold.best_of_n_summary(records, {r["id"]: r["valid"] for r in read_jsonl(args.greedy)})
    metrics["settings"] = dataclasses.asdict(s)
    write_jsonl(f"data/ablations/best_of_n/{args.name}.jsonl", records)
    write_json(f"metrics/ablations/best_of_n/{args.name}.json", metrics)
    write_timings(f"metrics/ablations/best_of_n/{args.name}.json",
                  {"seconds": round(seconds, 1), "tokens_per_second": round(sum(k for _, k in outputs) / seconds, 1)})
    o, orc, pc = metrics["overall"], metrics["oracle"], metrics["vs_greedy"]
    print(f"{args.name}: best-of-{n} {o['accuracy']:.1%}, oracle {orc['accuracy']:.1%} of {o['n']}; "
          f"vs greedy {100 * pc['delta']:+.1f} pts (p={pc['p_value']})")


if __name__ == "__main__":
    run_stage(main)
