"""LoRA supervised fine-tuning on the validated training split.

    python stages/train_sft.py models/base data/validated/train.jsonl models/sft

Reads params [sft]. Loss on the completion (the calls) only when
``sft.mask_prompt``. Writes mlx-lm adapters (``mlx_lm.load(base,
adapter_path=models/sft)`` works), metrics/train_sft.json, and step curves
under dvclive/train_sft for ``dvc plots show``.
"""

import argparse

from toolcall.data import gold_calls
from toolcall.io import read_jsonl, read_params, write_json
from toolcall.prompts import PromptFormat
from toolcall import training


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("train")
    ap.add_argument("out_dir")
    ap.add_argument("--metrics", default="metrics/train_sft.json")
    ap.add_argument("--live", default="dvclive/train_sft")
    args = ap.parse_args()
    cfg = training.from_params(training.LoraConfig, read_params("sft"), "sft")
    model, tokenizer = training.load_model(args.model_dir)
    fmt = PromptFormat(tokenizer)
    examples = [fmt.example(row, gold_calls(row["ground_truth"])) for row in read_jsonl(args.train)]
    training.add_lora(model, cfg)
    print(f"{len(examples)} examples, {training.count_trainable(model):,} trainable parameters")
    from dvclive import Live

    with Live(args.live, dvcyaml=None, save_dvc_exp=False) as live:
        result = training.train_lora(model, examples, cfg, live, prefix="sft")
    training.save_adapters(model, cfg, args.out_dir)
    n_tokens = sum(len(t) for t, _ in examples)
    write_json(args.metrics, {
        "examples": len(examples),
        "epochs": round(cfg.iters * cfg.batch_size / len(examples), 2),
        "final_loss": round(result["history"][-1]["train_loss"], 4),
        "train_seconds": result["train_seconds"],
        "tokens_per_second": round(n_tokens * cfg.iters * cfg.batch_size / len(examples) / result["train_seconds"], 1),
        "trainable_parameters": training.count_trainable(model),
    })


if __name__ == "__main__":
    main()
