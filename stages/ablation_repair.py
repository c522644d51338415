"""Re-score a variant's greedy outputs with JSON repair (no generation) and count what it changed.

    python -m stages.ablation_repair sft --test data/validated/dataset/test.parquet \
        --greedy data/predictions/sft/s0.jsonl

Writes metrics/ablations/repair/<name>.json (accuracy with Wilson intervals;
outputs that were malformed JSON, changed by repair, changed into correct
ones; the paired table against the outputs before repair, which the report
judges) and the repaired predictions to data/ablations/repair/<name>.jsonl.
"""

from toolcall.bfcl.dataset import read_split
from toolcall.errors import run_stage
from toolcall.evaluate import scaffold
from toolcall.io import read_jsonl, write_json, write_jsonl


def main():
    args = scaffold.arm_parser(__doc__, generates=False).parse_args()
    old = read_jsonl(args.greedy)
    new = scaffold.repair(read_split(args.test), old)
    metrics = scaffold.repair_summary(old, new)
    write_jsonl(f"data/ablations/repair/{args.name}.jsonl", new)
    write_json(f"metrics/ablations/repair/{args.name}.json", metrics)
    r, t = metrics["repair"], metrics["paired"]
    print(f"{args.name}: {r['malformed_json_before']} malformed JSON, {r['changed']} changed by repair, "
          f"{r['changed_and_correct']} of them now correct; {t['only_before']} right only before, "
          f"{t['only_after']} only after")


if __name__ == "__main__":
    run_stage(main)
