"""Validate every row against the model's template; drop bad rows with a reason.

    python -m stages.validate data/split models/base data/validated metrics/validate.json

Reads params [validate]. Training, validation and extra-pool rows
(extra.jsonl: the extra sources' rows the training side may use) that fail
are dropped with a reason (counted per source in the metrics); the stage
fails if more than ``max_drop_fraction`` of the rows of one source on one
side are (then the data or the template is broken, not a few rows; an extra
source's rows past ``max_seq_len`` do not count). Test rows are never dropped: the
test split is exactly what ``split`` wrote, so that every variant is scored on
the same, complete set and n does not shrink silently; one bad test row fails
the stage, naming it. Nothing is written when the stage fails.

Writes <out_dir>/{train,valid,test,extra}.jsonl, and train, valid and test as a
Hugging Face dataset, <out_dir>/dataset/ (one parquet file per split and a
dataset card: toolcall.bfcl.dataset), which training and eval read.
"""

import argparse

from toolcall.bfcl.dataset import SPLITS, write_dataset
from toolcall.bfcl.rows import read_rows
from toolcall.bfcl.validate import excess_drops, validate_rows
from toolcall.calls.prompts import PromptFormat
from toolcall import config
from toolcall.errors import DataError, run_stage
from toolcall.io import write_json, write_jsonl


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split_dir")
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("metrics")
    args = ap.parse_args()
    p = config.load("validate")
    from mlx_lm.utils import load_tokenizer

    fmt = PromptFormat(load_tokenizer(args.model_dir))
    metrics, kept = {"template": fmt.template_source}, {}
    for split in ("train", "valid", "test", "extra"):
        path = f"{args.split_dir}/{split}.jsonl"
        # An empty extra pool is legitimate (data.extra_files: {}); an empty side is not.
        kept[split], report = validate_rows(read_rows(path, allow_empty=split == "extra"), fmt, p.max_seq_len)
        metrics[split] = report
        print(f"{split}: kept {report['n_kept']}/{report['n_in']}  dropped {report['reasons']}")
    if dropped := metrics["test"]["dropped"]:
        shown = ", ".join(f"{d['id']} ({d['reason']})" for d in dropped[:5])
        raise DataError(f"{args.split_dir}/test.jsonl: {len(dropped)} test row(s) fail validation: {shown}"
                        f"{' …' if len(dropped) > 5 else ''}; the test split must stay complete: fix those rows "
                        "in the data, or change split.seed so that they land in training")
    for split in ("train", "valid", "extra"):
        for source, (fraction, reasons) in excess_drops(metrics[split], p.max_drop_fraction).items():
            raise DataError(f"{args.split_dir}/{split}.jsonl: validation dropped {fraction:.1%} of the {source} "
                            f"rows > validate.max_drop_fraction {p.max_drop_fraction:.1%} ({reasons}); "
                            "the data or the template is broken: see the reasons")
    # First: a row the dataset's columns cannot hold fails the stage before anything is written.
    write_dataset(f"{args.out_dir}/dataset", {split: kept[split] for split in SPLITS})
    for split, rows in kept.items():
        write_jsonl(f"{args.out_dir}/{split}.jsonl", rows)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
