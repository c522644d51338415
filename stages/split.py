"""Seeded, category-stratified train/test split with no function shared across it.

    python stages/split.py data/bfcl data/split

Reads params [split] and [data.categories]. Writes train.jsonl and test.jsonl.
"""

import argparse

from toolcall import data
from toolcall.config import SplitConfig, categories, from_params
from toolcall.io import read_params, write_jsonl


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bfcl_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p = from_params(SplitConfig, read_params("split"), "split")
    rows = data.load_categories(args.bfcl_dir, categories(read_params("data")["categories"]))
    train, test = data.split_rows(rows, p.test_per_category, p.seed, p.train_per_category)
    write_jsonl(f"{args.out_dir}/train.jsonl", train)
    write_jsonl(f"{args.out_dir}/test.jsonl", test)
    print(f"train {len(train)}  test {len(test)}")


if __name__ == "__main__":
    main()
