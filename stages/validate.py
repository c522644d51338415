"""Validate every row against the model's template; drop bad rows with a reason.

    python -m stages.validate data/split metrics/split.json models/base data/validated metrics/validate.json \
        --composed data/compose/composed.jsonl

Reads params [validate] and compose.use: when true, the rows stage compose
made from the training side (--composed, needed then) join it here, checked like the rest
(counted per source, composed_<kind>). Training, validation, extra-pool (extra.jsonl: the
extra sources' rows the training side may use) and live test rows
(test_live.jsonl: the second test set, split.live_test's sources) that fail
are dropped with a reason (counted per source in the metrics); the stage
fails if more than ``max_drop_fraction`` of the rows of one source on one
side are (then the data or the template is broken, not a few rows; an extra
source's rows past ``max_seq_len`` do not count: live_multiple's longest
schemas). The live test has its own cap, ``live_max_seq_len``: only scored,
never trained on, so a longer cap drops fewer of its long-schema rows. It is dropped from once, here, so every variant is
scored on the same rows; the metrics' test_live also counts the live rows
the split dropped for sharing a function (from the split's metrics,
``metrics/split.json``). Test rows are never dropped: the
test split is exactly what ``split`` wrote, so that every variant is scored on
the same, complete set and n does not shrink silently; one bad test row fails
the stage, naming it. Nothing is written when the stage fails.

Writes <out_dir>/{train,valid,test,extra,test_live}.jsonl, and train, valid, test
and test_live (unless empty: split.live_test []) as a Hugging Face dataset,
<out_dir>/dataset/ (one parquet file per split and a dataset card:
toolcall.bfcl.dataset), which training and eval read.
"""

import argparse

from toolcall.bfcl.dataset import SPLITS, write_dataset
from toolcall.bfcl.rows import read_rows
from toolcall.bfcl.validate import excess_drops, validate_rows
from toolcall.calls.prompts import PromptFormat
from toolcall import config
from toolcall.errors import DataError, run_stage
from toolcall.io import read_json, write_json, write_jsonl

# Sides that may be empty: the extra pool (data.extra_files: {}) and the live test (split.live_test: []).
MAY_BE_EMPTY = ("extra", "test_live")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("split_dir")
    ap.add_argument("split_metrics")
    ap.add_argument("model_dir")
    ap.add_argument("out_dir")
    ap.add_argument("metrics")
    ap.add_argument("--composed", help="stage compose's rows; they join train.jsonl's if compose.use")
    args = ap.parse_args()
    p, use_composed = config.load("validate"), config.load("compose").use
    if use_composed and not args.composed:
        raise config.ConfigError("params.yaml [compose]: use is true, but no --composed file (stage compose's rows) "
                                 "was given: pass it (dvc.yaml does) or set compose.use: false")
    from mlx_lm.utils import load_tokenizer

    fmt = PromptFormat(load_tokenizer(args.model_dir))
    metrics, kept = {"template": fmt.template_source}, {}
    for split in ("train", "valid", "test", "extra", "test_live"):
        path = f"{args.split_dir}/{split}.jsonl"
        rows = read_rows(path, allow_empty=split in MAY_BE_EMPTY)
        if split == "train" and use_composed:
            rows += read_rows(args.composed, allow_empty=True)  # compose.n_*: 0 writes none
        kept[split], report = validate_rows(rows, fmt, p.live_max_seq_len if split == "test_live" else p.max_seq_len)
        metrics[split] = report
        print(f"{split}: kept {report['n_kept']}/{report['n_in']}  dropped {report['reasons']}")
    live = read_json(args.split_metrics)["test_live"]
    metrics["test_live"]["split_dropped"] = {
        "n_dropped": live["n_dropped"], "by_source": {s: c["n_in"] - c["n_kept"] for s, c in live["by_source"].items()}}
    if dropped := metrics["test"]["dropped"]:
        shown = ", ".join(f"{d['id']} ({d['reason']})" for d in dropped[:5])
        raise DataError(f"{args.split_dir}/test.jsonl: {len(dropped)} test row(s) fail validation: {shown}"
                        f"{' …' if len(dropped) > 5 else ''}; the test split must stay complete: fix those rows "
                        "in the data, or change split.seed so that they land in training")
    for split in ("train", "valid", "extra", "test_live"):
        for source, (fraction, reasons) in excess_drops(metrics[split], p.max_drop_fraction).items():
            raise DataError(f"{args.split_dir}/{split}.jsonl: validation dropped {fraction:.1%} of the {source} "
                            f"rows > validate.max_drop_fraction {p.max_drop_fraction:.1%} ({reasons}); "
                            "the data or the template is broken: see the reasons")
    # First: a row the dataset's columns cannot hold fails the stage before anything is written.
    write_dataset(f"{args.out_dir}/dataset", {split: kept[split] for split in SPLITS
                                              if kept[split] or split not in MAY_BE_EMPTY})
    for split, rows in kept.items():
        write_jsonl(f"{args.out_dir}/{split}.jsonl", rows)
    write_json(args.metrics, metrics)


if __name__ == "__main__":
    run_stage(main)
