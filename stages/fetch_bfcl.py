"""Fetch BFCL's four AST categories into one normalized JSONL per category.

    python -m stages.fetch_bfcl data/bfcl

Reads params [data]. Default source: the pinned ``bfcl-eval`` wheel from the
package index (sha256-verified, dependencies not installed); ``hub`` and
``local`` sources read the same file layout from elsewhere.
"""

import argparse

from toolcall import data
from toolcall.config import DataConfig, from_params
from toolcall.fetch import pip_wheel
from toolcall.io import read_params, write_jsonl
from toolcall.errors import run_stage


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p = from_params(DataConfig, read_params("data"), "data")
    wheel = pip_wheel(p.wheel, p.wheel_sha256) if p.source == "wheel" else None
    files = {cat: p.files[cat] for cat in p.categories}
    raw = data.read_source(p.source, files, wheel=wheel, local_dir=p.local_dir,
                           hub_repo=p.hub_repo, hub_revision=p.hub_revision)
    for cat, (questions, answers) in raw.items():
        rows = data.normalize(cat, questions, answers, where=files[cat])
        write_jsonl(f"{args.out_dir}/{cat}.jsonl", rows)
        print(f"{cat}: {len(rows)} rows")


if __name__ == "__main__":
    run_stage(main)
