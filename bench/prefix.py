"""Prefix section: the eval stage's path on live test rows with the shared prefixes prefilled once, and without.

    python -m bench.prefix [--live-items 160] [--adapter models/sft/s0] [--repeats 1]

The live test's items offered the same functions begin with the same tokens
(``toolcall/evaluate/prefix.py``). Rows are taken as whole ``prefix.groups``
spread evenly over the file's groups, so a sample shares as the whole set
does; both arms run ``generate_sharded`` on them as the eval stage does
(``eval.workers`` processes, ``eval.batch_size``, ``eval.max_tokens``), one
after the other in each repeat: ``prefix_speedup`` = seconds without / with,
and the share of items whose greedy tokens are identical.
"""

import statistics
import sys
from pathlib import Path

if not __package__:  # python bench/prefix.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, evenly, f, log, run_worker, section_main


def sample(prompts, n):
    """Indices of whole prefix groups, spread evenly over the groups (longest first), until at least ``n`` rows."""
    from toolcall.evaluate import prefix

    plan = prefix.groups(prompts)
    for m in range(1, len(plan) + 1):
        picked = [i for g in evenly(len(plan), m) for i in plan[g][1]]
        if len(picked) >= n:
            break
    return sorted(picked)


def run(args, params):
    from mlx_lm.utils import load_tokenizer

    from toolcall.calls.prompts import PromptFormat
    from toolcall.evaluate import prefix
    from toolcall.evaluate.sharding import resolve_workers
    from toolcall.io import read_jsonl

    ev = params("eval")
    fmt = PromptFormat(load_tokenizer(Path(args.model)))
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in read_jsonl(args.live)]
    indices = sample(prompts, args.live_items)
    chosen = [prompts[i] for i in indices]
    prefilled = sum(len(p) for p in chosen) - sum((len(m) - 1) * s for s, m in prefix.groups(chosen))
    workers = args.workers or resolve_workers(ev.workers, args.model, ev.batch_size,
                                              ev.max_tokens + max(map(len, chosen)))
    spec = {"model": args.model, "adapter": args.adapter, "test": args.live, "max_tokens": ev.max_tokens,
            "indices": indices, "arm": "sharded", "workers": workers}
    runs = {"shared": [], "whole": []}
    for r in range(args.repeats):
        for arm in runs:
            kwargs = {"batch_size": ev.batch_size, "share_prefixes": arm == "shared"}
            runs[arm].append(run_worker("eval", "eval", {**spec, "kwargs": kwargs}))
        log(f"prefix {r + 1}/{args.repeats}: {len(indices)} live items, shared {runs['shared'][-1]['seconds']:.1f}s, "
            f"whole {runs['whole'][-1]['seconds']:.1f}s")
    seconds = {arm: statistics.median(x["seconds"] for x in runs[arm]) for arm in runs}
    same = [a == b for a, b in zip(runs["shared"][0]["tokens"], runs["whole"][0]["tokens"])]
    return {"prefix": {"items": len(indices), "test": Path(args.live).name, "workers": workers,
                       "prompt_tokens": sum(len(p) for p in chosen), "prefilled_tokens_shared": prefilled,
                       "seconds_shared": round(seconds["shared"], 1), "seconds_whole": round(seconds["whole"], 1),
                       "identical": sum(same), "repeats": args.repeats},
            "prefix_speedup": round(seconds["whole"] / seconds["shared"], 3),
            "greedy_agreement_shared_vs_whole": round(sum(same) / len(same), 4)}


WORKERS = {}


def add_args(ap):
    ap.add_argument("--live", default=str(ROOT / "data" / "validated" / "test_live.jsonl"))
    ap.add_argument("--live-items", type=int, default=160, help="at least this many rows, in whole prefix groups")
    ap.add_argument("--workers", type=int, default=None, help="eval stage processes (default: params eval.workers)")


def rows(r):
    if "prefix" not in r:
        return []
    p = r["prefix"]
    return [(f"eval, shared prefixes prefilled once vs each prompt whole: {p['items']} live items "
             f"({p['prefilled_tokens_shared']} of {p['prompt_tokens']} prompt tokens prefilled)",
             f(p["seconds_shared"], 1), f(p["seconds_whole"], 1), f"{r['prefix_speedup']:.2f}x",
             f"identical {p['identical']}/{p['items']}")]


if __name__ == "__main__":
    section_main(sys.modules[__name__])
