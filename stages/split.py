"""Seeded, category-stratified train/validation/test split with no function shared across them.

    python -m stages.split data/bfcl data/split

Reads params [split], [data.categories], [data.extra] and [data.extra_files] (all of
[data] is checked, as fetch_bfcl checks it).
The test side is drawn from the paper's categories first (exactly as with no
validation side and no extra sources), then the validation side from what it
left. The extra sources' rows of those categories that offer no test or
validation function are the training side's pool: extra.jsonl holds them all
(every source of data.extra_files, for the ablation arms), and those of
data.extra's sources join the paper's rows in train.jsonl. Writes
train.jsonl, valid.jsonl, test.jsonl and extra.jsonl.
"""

import argparse
from collections import Counter

from toolcall.bfcl.rows import is_extra, load_categories
from toolcall.bfcl.split import split_study, with_sources
from toolcall import config
from toolcall.errors import DataError, run_stage
from toolcall.io import write_jsonl


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bfcl_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p, data = config.load("split"), config.load("data")
    cats, use, pool_sources = data.categories, data.extra, list(data.extra_files)
    rows = load_categories(args.bfcl_dir, cats, pool_sources)
    paper = [r for r in rows if not is_extra(r)]
    extra = [r for r in rows if is_extra(r) and r["category"] in cats]
    train, valid, test, pool, dropped = split_study(paper, extra, p.test_per_category, p.valid_per_category,
                                                         p.seed, p.train_per_category)
    train = with_sources(train, pool, use, "data.extra")
    for name, side in (("train", train), ("test", test)):
        if not side:
            raise DataError(f"the {name} split is empty ({len(paper)} rows in {args.bfcl_dir}); "
                            f"check split.test_per_category / split.train_per_category and data.categories")
    for name, side in (("train", train), ("valid", valid), ("test", test), ("extra", pool)):
        write_jsonl(f"{args.out_dir}/{name}.jsonl", side)
    print(f"train {len(train)}  valid {len(valid)}  test {len(test)}  extra pool {len(pool)}")
    total, gone = Counter(r["source"] for r in extra), Counter(r["source"] for r in dropped)
    for source in total:
        print(f"extra {source}: {total[source] - gone[source]} of {total[source]} rows in the pool "
              f"({gone[source]} offer a test or validation function){'; in train' if source in use else ''}")


if __name__ == "__main__":
    run_stage(main)
