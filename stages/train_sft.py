"""LoRA supervised fine-tuning on the validated training split.

    python -m stages.train_sft models/base data/validated/train.jsonl models/sft/s0 --seed 0 \
        --metrics metrics/train_sft/s0.json --live dvclive/train_sft/s0

Reads params [sft] and its seed from ``--seed`` (dvc.yaml: once per seed of
study.seeds). Loss on the completion (the calls) only when
``sft.mask_prompt``. Writes mlx-lm adapters (``mlx_lm.load(base,
adapter_path=models/sft/s0)`` works), the metrics, and step curves under
``--live`` for ``dvc plots show``. No example may exceed max_seq_len: the
stage fails rather than train on a cut target.

An ablation arm (stage ablation_train) passes ``--overrides SECTION``
(dotted, repeatable, later ones win) whose keys replace [sft]'s and whose
``style`` picks the prompt style (structured | content), e.g.

    python -m stages.train_sft models/base data/validated/train.jsonl models/ablations/format_content --seed 0 \
        --overrides ablations.sft --overrides ablations.format.content \
        --metrics metrics/ablations/train/format_content.json --live dvclive/ablations/format_content
"""

import argparse
import dataclasses
import sys

from toolcall import checkpoint, lora
from toolcall.cli import add_seed
from toolcall.config import SftConfig, from_params, seeded
from toolcall.data import gold_calls, read_rows
from toolcall.errors import run_stage
from toolcall.io import read_params, write_json, write_timings
from toolcall.prompts import PromptFormat
from toolcall.trainer import train_lora


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("train")
    ap.add_argument("out_dir")
    add_seed(ap)
    ap.add_argument("--metrics", required=True, help="e.g. metrics/train_sft/s0.json")
    ap.add_argument("--live", required=True, help="dvclive directory, e.g. dvclive/train_sft/s0")
    ap.add_argument("--overrides", action="append", default=[], metavar="SECTION")
    args = ap.parse_args()
    p = read_params("sft")
    for section in args.overrides:
        p.update(read_params(section))
    style = p.pop("style", "structured")
    name = " + ".join(["sft", *args.overrides])
    cfg = from_params(SftConfig, seeded(p, args.seed, name), name)
    model, tokenizer = lora.load_model(args.model_dir)
    fmt = PromptFormat(tokenizer, style)
    rows = read_rows(args.train)
    calls = [gold_calls(row["ground_truth"]) for row in rows]
    examples = [fmt.example(row, c) for row, c in zip(rows, calls)]
    longest = max(len(t) for t, _ in examples)
    if longest > cfg.max_seq_len:
        sys.exit(f"train_sft: an example has {longest} tokens > max_seq_len={cfg.max_seq_len}; "
                 "raise max_seq_len or drop long rows in validation rather than cut targets")
    format_info = {"style": style, "mask_prompt": cfg.mask_prompt, "max_seq_len": cfg.max_seq_len,
                   "tokens_max": longest}
    if style != "structured":  # what this style changes, counted on the very rows trained on
        structured = PromptFormat(tokenizer)
        format_info["targets_unlike_structured"] = sum(
            ex != structured.example(row, c) for ex, row, c in zip(examples, rows, calls))
    if not cfg.mask_prompt:
        examples = [(t, 1) for t, _ in examples]  # every token after the first is a target
    lora.add_lora(model, lora.adapter_config(cfg), cfg.seed)
    print(f"{len(examples)} examples, {lora.count_trainable(model):,} trainable parameters")
    from dvclive import Live

    key = checkpoint.fingerprint("train_sft", dataclasses.asdict(cfg), style, checkpoint.examples_digest(examples),
                                 checkpoint.files_digest(args.model_dir))
    ckpt = checkpoint.Checkpoint(args.out_dir, key, cfg.checkpoint_every)
    with Live(args.live, dvcyaml=None, save_dvc_exp=False) as live:
        result = train_lora(model, examples, cfg.train(), live, prefix="sft", checkpoint=ckpt)
    lora.save_adapters(model, lora.adapter_config(cfg), args.out_dir)
    n_tokens = sum(len(t) for t, _ in examples)
    write_json(args.metrics, {
        "examples": len(examples),
        "epochs": round(cfg.iters * cfg.batch_size / len(examples), 2),
        "final_loss": round(result["history"][-1]["loss"], 4),
        "trainable_parameters": lora.count_trainable(model),
        **format_info,
    })
    # A resumed run times only its own steps.
    seconds, steps = result["train_seconds"], result["steps"]
    write_timings(args.metrics, {"train_seconds": seconds, "steps": steps, "tokens_per_second":
                                 round(n_tokens / len(examples) * cfg.batch_size * steps / seconds, 1) if steps else None})
    ckpt.clear()


if __name__ == "__main__":
    run_stage(main)
