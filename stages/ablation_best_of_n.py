"""Best-of-N: sample N outputs per test item, keep one without looking at the answer, score it.

    python -m stages.ablation_best_of_n sft --model models/base --adapter models/sft/s0 \
        --test data/validated/dataset/test.parquet --greedy data/predictions/sft/s0.jsonl

Reads params [eval] (max_tokens, batch_size) and [ablations.scaffold] (n,
temperature, seed, per_category: the first items of each category of the
test file). Writes metrics/ablations/best_of_n/<name>.json (kept-sample
accuracy, oracle pass@N, the paired table against the greedy outputs on the
same items) and data/ablations/best_of_n/<name>.jsonl (every sample and the kept one).
"""

import dataclasses
import time

from toolcall.bfcl.dataset import read_split
from toolcall.calls.prompts import PromptFormat
from toolcall import config
from toolcall.errors import run_stage
from toolcall.evaluate import scaffold
from toolcall.evaluate.generation import generate
from toolcall.io import read_jsonl, write_json, write_jsonl, write_timings
from toolcall.model.lora import load_model


def main():
    args = scaffold.arm_parser(__doc__).parse_args()
    p = config.load("eval")
    s = config.load("ablations.scaffold")
    rows = scaffold.first_per_category(read_split(args.test), s.per_category)
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
    o, orc, t = metrics["overall"], metrics["oracle"], metrics["paired"]
    print(f"{args.name}: best-of-{n} {o['accuracy']:.1%}, oracle {orc['accuracy']:.1%} of {o['n']}; "
          f"{t['only_before']} right only greedy, {t['only_after']} only best-of-{n}")


if __name__ == "__main__":
    run_stage(main)
