"""Validate every row against the model's template; drop bad rows with a reason.

    python stages/validate.py data/split models/base data/validated metrics/validate.json

Reads params [validate]. Fails if more than ``max_drop_fraction`` of either
split is dropped (then the data or the template is broken, not a few rows).
"""

import argparse
import sys

from toolcall.io import read_jsonl, read_params, write_json, write_jsonl
from toolcall.prompts import PromptFormat
from toolcall.validate import validate_rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split_dir")
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("metrics")
    args = ap.parse_args()
    p = read_params("validate")
    from mlx_lm.utils import load_tokenizer

    fmt = PromptFormat(load_tokenizer(args.model_dir))
    metrics, failed = {"template": fmt.template_source}, []
    for split in ("train", "test"):
        kept, report = validate_rows(read_jsonl(f"{args.split_dir}/{split}.jsonl"), fmt, p["max_seq_len"])
        write_jsonl(f"{args.out_dir}/{split}.jsonl", kept)
        metrics[split] = report
        print(f"{split}: kept {report['n_kept']}/{report['n_in']}  dropped {report['reasons']}")
        if report["drop_fraction"] > p["max_drop_fraction"]:
            failed.append(f"{split}: dropped {report['drop_fraction']:.1%} > max_drop_fraction "
                          f"{p['max_drop_fraction']:.1%} ({report['reasons']})")
    write_json(args.metrics, metrics)
    if failed:
        sys.exit("validation failed: " + "; ".join(failed) + f" — see {args.metrics}")


if __name__ == "__main__":
    main()
