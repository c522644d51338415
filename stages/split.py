"""Seeded, category-stratified train/validation/test split with no function shared across them; the live test.

    python -m stages.split data/bfcl data/split metrics/split.json

Reads params [split], [data.categories], [data.extra] and [data.extra_files] (all of
[data] is checked, as fetch_bfcl checks it).
The test side is drawn from the paper's categories first (exactly as with no
validation side and no extra sources), then the validation side from what it
left. The extra sources' rows of those categories that offer no test or
validation function are the training side's pool: extra.jsonl holds them all
(every source of data.extra_files but split.live_test's, for the ablation
arms), and those of data.extra's sources join the paper's rows in train.jsonl.
The rows of split.live_test's sources form the second test set, test_live.jsonl,
but for those that offer a function of a training or validation row (dropped).
Writes train.jsonl, valid.jsonl, test.jsonl, extra.jsonl and test_live.jsonl,
and the metrics: each side's size, and per source the extra rows kept in the
pool and the live rows kept in test_live (the dropped ones' ids).
"""

import argparse
from collections import Counter

from toolcall.bfcl.rows import is_extra, load_categories
from toolcall.bfcl.split import study_sides
from toolcall import config
from toolcall.errors import DataError, run_stage
from toolcall.io import json_text, jsonl_text, write_texts


def by_source(rows, kept):
    """``{source: {n_in, n_kept}}`` of the extra ``rows``, ``kept`` those of them a side took."""
    ids = {r["id"] for r in kept}
    total, taken = Counter(r["source"] for r in rows), Counter(r["source"] for r in rows if r["id"] in ids)
    return {source: {"n_in": n, "n_kept": taken[source]} for source, n in total.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bfcl_dir")
    ap.add_argument("out_dir")
    ap.add_argument("metrics")
    args = ap.parse_args()
    p, data = config.load("split"), config.load("data")
    config.check_live_test(p.live_test, {"data.extra": data.extra}, sources=data.extra_files)
    rows = load_categories(args.bfcl_dir, data.categories, list(data.extra_files))
    sides, drawn = study_sides(rows, data.categories, data.extra, p.live_test, p.test_per_category,
                               p.valid_per_category, p.seed, p.train_per_category)
    for name in ("train", "test"):
        if not sides[name]:
            raise DataError(f"the {name} split is empty ({sum(not is_extra(r) for r in rows)} rows in "
                            f"{args.bfcl_dir}); check split.test_per_category / split.train_per_category and "
                            "data.categories")
    if drawn["test_live"] and not sides["test_live"]:
        raise DataError(f"every one of the {len(drawn['test_live'])} rows of split.live_test's sources "
                        f"{p.live_test} offers a training or validation function: the live test would be empty; "
                        "change split.live_test")
    metrics = {name: {"n": len(side), "by_category": dict(Counter(r["category"] for r in side))}
               for name, side in sides.items()}
    metrics["extra"]["by_source"] = by_source(drawn["extra"], sides["extra"])
    kept = {r["id"] for r in sides["test_live"]}
    metrics["test_live"] |= {"n_in": len(drawn["test_live"]), "n_dropped": len(drawn["test_live"]) - len(kept),
                             "by_source": by_source(drawn["test_live"], sides["test_live"]),
                             "dropped": [r["id"] for r in drawn["test_live"] if r["id"] not in kept]}
    write_texts({f"{args.out_dir}/{name}.jsonl": jsonl_text(side) for name, side in sides.items()}
                | {args.metrics: json_text(metrics)})
    print("  ".join(f"{name} {len(side)}" for name, side in sides.items()))
    for source, c in metrics["extra"]["by_source"].items():
        print(f"extra {source}: {c['n_kept']} of {c['n_in']} rows in the pool ({c['n_in'] - c['n_kept']} offer a "
              f"test or validation function){'; in train' if source in data.extra else ''}")
    for source, c in metrics["test_live"]["by_source"].items():
        print(f"live {source}: {c['n_kept']} of {c['n_in']} rows in test_live "
              f"({c['n_in'] - c['n_kept']} offer a training or validation function)")


if __name__ == "__main__":
    run_stage(main)
