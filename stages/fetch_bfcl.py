"""Fetch BFCL's four AST categories, and the extra training sources, into normalized JSONL files.

    python -m stages.fetch_bfcl data/bfcl

Reads params [data]. Default source: the pinned ``bfcl-eval`` wheel from the
package index (sha256-verified, dependencies not installed); ``hub`` and
``local`` sources read the same file layout from elsewhere. Writes
``<category>.jsonl`` per category and ``extra/<name>.jsonl`` per extra source
(every one of ``data.extra_files``: other BFCL files, training only; exec
answers, Python call strings, parsed into possible answers).
"""

import argparse

from toolcall.bfcl.sources import normalize, read_extra, read_source
from toolcall import config
from toolcall.errors import run_stage
from toolcall.io import write_jsonl
from toolcall.wheels import pip_wheel


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    args = ap.parse_args()
    p = config.load("data")
    wheel = pip_wheel(p.wheel, p.wheel_sha256) if p.source == "wheel" else None
    where = dict(wheel=wheel, local_dir=p.local_dir, hub_repo=p.hub_repo, hub_revision=p.hub_revision)
    files = {cat: p.files[cat] for cat in p.categories}
    # Everything is read and parsed before anything is written: a bad file leaves no output.
    out = {f"{cat}.jsonl": normalize(cat, questions, answers, where=files[cat])
           for cat, (questions, answers) in read_source(p.source, files, **where).items()}
    out |= {f"extra/{name}.jsonl": rows
            for name, rows in read_extra(p.source, p.extra_files, list(p.extra_files), **where).items()}
    for name, rows in out.items():
        write_jsonl(f"{args.out_dir}/{name}", rows)
        print(f"{name}: {len(rows)} rows")


if __name__ == "__main__":
    run_stage(main)
