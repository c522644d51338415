"""Seeded, category-stratified train/validation/test split with no function shared across them.

    python -m stages.split data/bfcl data/split

Reads params [split], [data.categories] and [data.extra]. The test side is
drawn from the paper's categories first (exactly as with no validation side
and no extra sources), then the validation side from what it left; rows of
the extra sources of those categories join the training side only, less
those that offer a test or validation function. Writes train.jsonl,
valid.jsonl and test.jsonl.
"""

import argparse
from collections import Counter

from toolcall import data
from toolcall.config import SplitConfig, categories, extra_sources, from_params
from toolcall.errors import DataError
from toolcall.io import read_params, write_jsonl
from toolcall.errors import run_stage


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bfcl_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p = from_params(SplitConfig, read_params("split"), "split")
    d = read_params("data")
    cats = categories(d["categories"])
    rows = data.load_categories(args.bfcl_dir, cats, extra_sources(d["extra"]))
    paper = [r for r in rows if not data.is_extra(r)]
    extra = [r for r in rows if data.is_extra(r) and r["category"] in cats]
    train, valid, test, dropped = data.split_study(paper, extra, p.test_per_category, p.valid_per_category,
                                                   p.seed, p.train_per_category)
    for name, side in (("train", train), ("test", test)):
        if not side:
            raise DataError(f"the {name} split is empty ({len(paper)} rows in {args.bfcl_dir}); "
                            f"check split.test_per_category / split.train_per_category and data.categories")
    write_jsonl(f"{args.out_dir}/train.jsonl", train)
    write_jsonl(f"{args.out_dir}/valid.jsonl", valid)
    write_jsonl(f"{args.out_dir}/test.jsonl", test)
    print(f"train {len(train)}  valid {len(valid)}  test {len(test)}")
    total, gone = Counter(r["source"] for r in extra), Counter(r["source"] for r in dropped)
    for source in total:
        print(f"extra {source}: {total[source] - gone[source]} of {total[source]} rows kept "
              f"({gone[source]} offer a test or validation function)")


if __name__ == "__main__":
    run_stage(main)
