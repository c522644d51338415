"""Write one ablation's training (and, where it has its own, test) rows from the validated split.

    python -m stages.ablation_split unseen_tools data/validated data/ablations/splits/unseen_tools

Names: unseen_tools, unseen_patterns, diversity_low, diversity_high,
extra_with (see ``toolcall.bfcl.ablations``). Reads params
[ablations.<section>] (extra_with also split.live_test, whose sources
ablations.extra.sources may not name); the validated train, valid and test splits through
their dataset (<validated_dir>/dataset/), the extra pool from extra.jsonl.
Writes train.jsonl, and test.jsonl for the unseen_*
splits (the other arms are scored on the main test split).
"""

import argparse
from collections import Counter

from toolcall.bfcl import ablations
from toolcall.bfcl.dataset import load_split
from toolcall.bfcl.rows import read_rows
from toolcall import config
from toolcall.errors import run_stage
from toolcall.io import write_jsonl


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(ablations.SECTIONS))
    ap.add_argument("validated_dir")
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p = config.load(f"ablations.{ablations.SECTIONS[args.name]}")
    if args.name == "extra_with":
        config.check_live_test(config.load("split").live_test, {"ablations.extra.sources": p.sources})
    train, valid, test = (load_split(f"{args.validated_dir}/dataset", side) for side in ("train", "valid", "test"))
    pool = read_rows(f"{args.validated_dir}/extra.jsonl", allow_empty=True)  # empty with data.extra_files: {}
    train, test = ablations.make_split(args.name, train, test, p, valid=valid, pool=pool)
    write_jsonl(f"{args.out_dir}/train.jsonl", train)
    print(f"{args.name}: train {len(train)} {dict(Counter(r['category'] for r in train))}")
    if test is not None:
        write_jsonl(f"{args.out_dir}/test.jsonl", test)
        print(f"{args.name}: test {len(test)} {dict(Counter(r['category'] for r in test))}")


if __name__ == "__main__":
    run_stage(main)
