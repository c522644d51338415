"""Re-score a variant's greedy outputs with JSON repair (no generation) and count what it changed.

    python -m stages.ablation_repair sft --test data/validated/test.jsonl --greedy data/predictions/sft/s0.jsonl

Writes metrics/ablations/repair/<name>.json (accuracy with Wilson intervals;
outputs that were malformed JSON, changed by repair, changed into correct
ones; exact McNemar against the outputs before repair) and the repaired
predictions to data/ablations/repair/<name>.jsonl.
"""

import argparse

from toolcall.errors import run_stage
from toolcall.evaluate import scaffold
from toolcall.io import read_jsonl, write_json, write_jsonl


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name")
    ap.add_argument("--test", required=True)
    ap.add_argument("--greedy", required=True, help="the variant's greedy predictions on that test file")
    args = ap.parse_args()
    old = read_jsonl(args.greedy)
    new = scaffold.repair(read_jsonl(args.test), old)
    metrics = scaffold.repair_summary(old, new)
    write_jsonl(f"data/ablations/repair/{args.name}.jsonl", new)
    write_json(f"metrics/ablations/repair/{args.name}.json", metrics)
    r, pc = metrics["repair"], metrics["vs_greedy"]
    print(f"{args.name}: {r['malformed_json_before']} malformed JSON, {r['changed']} changed by repair, "
          f"{r['changed_and_correct']} of them now correct; {100 * pc['delta']:+.1f} pts (p={pc['p_value']})")


if __name__ == "__main__":
    run_stage(main)
