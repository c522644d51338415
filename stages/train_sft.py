"""LoRA supervised fine-tuning on the validated training split, its length chosen on the validation split.

    python -m stages.train_sft models/base data/validated/dataset/train.parquet models/sft/s0 --seed 0 \
        --metrics metrics/train_sft/s0.json --live dvclive/train_sft/s0 \
        --valid data/validated/dataset/valid.parquet

Reads params [sft] and its seed from ``--seed`` (dvc.yaml: once per seed of
study.seeds), and with ``--valid`` [eval]'s max_tokens and batch_size. Loss
on the completion (the calls) only when ``sft.mask_prompt``; the token after
each call (another call, or the end) weighs ``sft.decision_weight``. The budget is
``sft.epochs`` passes over the training rows (or ``sft.iters`` steps). With
``--valid``, the validation rows are decoded greedily as stage eval decodes
(toolcall/train/selection.py) at step 0, every ``sft.steps_per_eval`` steps
and after the last: the adapter written is the one of the highest accuracy
(a tie: the earlier step), ``sft.patience`` evaluations without a new highest
stop training early, and the validation loss is logged at the same steps.
Writes mlx-lm adapters (``mlx_lm.load(base, adapter_path=models/sft/s0)``
works), the metrics (the chosen step and epoch; ``selection``: each
evaluation's accuracy and answer format, the chosen one's, step 0's; the
validation loss at step 0, at the chosen step and its lowest), and the
training and validation curves under ``--live`` for ``dvc plots show``. No
example may exceed max_seq_len: the stage fails rather than train on a cut
target.
On a CPU it runs as ``sft.ranks`` data-parallel processes (toolcall/train/launch.py).

An ablation arm (stage ablation_train) passes ``--overrides SECTION``
(dotted, repeatable, later ones win) whose keys replace [sft]'s, ``style``
(the prompt style, structured | content) among them, e.g.

    python -m stages.train_sft models/base data/validated/dataset/train.parquet models/ablations/format_content \
        --seed 0 --overrides ablations.sft --overrides ablations.format.content \
        --metrics metrics/ablations/train/format_content.json --live dvclive/ablations/format_content
"""

import argparse
import contextlib
import dataclasses
import sys

from toolcall.bfcl.dataset import read_split
from toolcall.bfcl.rows import gold_calls
from toolcall.calls.prompts import PromptFormat
from toolcall.cli import add_seed
from toolcall import config
from toolcall.sections import epoch_steps
from toolcall.errors import ConfigError, run_stage
from toolcall.io import write_json, write_timings
from toolcall.model import lora
from toolcall.train import checkpoint, launch, selection
from toolcall.train.loss import supports_split_head
from toolcall.train.trainer import train_lora


def unmasked(example):
    """``example`` with every token after the first a target; token weights, if any, grow by 1s over the prompt."""
    tokens, prompt_len, *weights = example
    return (tokens, 1, *[[1.0] * (prompt_len - 1) + w for w in weights])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("train")
    ap.add_argument("out_dir")
    add_seed(ap)
    ap.add_argument("--metrics", required=True, help="e.g. metrics/train_sft/s0.json")
    ap.add_argument("--live", required=True, help="dvclive directory, e.g. dvclive/train_sft/s0")
    ap.add_argument("--valid", help="validation rows whose greedy accuracy chooses the step whose adapter is kept "
                                    "(a split's .parquet, or JSONL)")
    ap.add_argument("--overrides", action="append", default=[], metavar="SECTION")
    args = ap.parse_args()
    cfg = config.load("sft", seed=args.seed, overrides=args.overrides)
    style = cfg.style
    launch.ensure_ranks(cfg.ranks, " + ".join(["sft", *args.overrides]))
    model, tokenizer = lora.load_model(args.model_dir)
    fmt = PromptFormat(tokenizer, style)
    rows = read_split(args.train)
    calls = [gold_calls(row["ground_truth"]) for row in rows]
    examples = [fmt.example(row, c, cfg.decision_weight) for row, c in zip(rows, calls)]
    valid_rows = read_split(args.valid) if args.valid else []
    valid = [fmt.example(row, gold_calls(row["ground_truth"])) for row in valid_rows]
    longest = max(len(ex[0]) for ex in examples + valid)
    if longest > cfg.max_seq_len:
        sys.exit(f"train_sft: an example has {longest} tokens > max_seq_len={cfg.max_seq_len}; "
                 "raise max_seq_len or drop long rows in validation rather than cut targets")
    format_info = {"style": style, "mask_prompt": cfg.mask_prompt, "max_seq_len": cfg.max_seq_len,
                   "tokens_max": longest}
    if style != "structured":  # what this style changes, counted on the very rows trained on
        structured = PromptFormat(tokenizer)
        format_info["targets_unlike_structured"] = sum(
            ex[:2] != structured.example(row, c) for ex, row, c in zip(examples, rows, calls))
    if not cfg.mask_prompt:
        examples, valid = [unmasked(ex) for ex in examples], [unmasked(ex) for ex in valid]
    train_cfg = cfg.train(len(examples))
    if cfg.decision_weight != 1 and not supports_split_head(model):
        raise ConfigError(f"params.yaml [sft]: decision_weight={cfg.decision_weight} needs the completion loss, "
                          f"which model type {model.model_type!r} cannot use (mlx-lm's default loss weighs all alike)")
    lora.add_lora(model, lora.adapter_config(cfg), cfg.seed)
    print(f"{len(examples)} examples, {lora.count_trainable(model):,} trainable parameters")
    chooser = selection.on_validation(model, fmt, valid_rows, "sft valid", cfg.patience) if valid_rows else None
    from dvclive import Live

    key = checkpoint.fingerprint("train_sft", dataclasses.asdict(cfg), style, checkpoint.examples_digest(examples),
                                 checkpoint.examples_digest(valid), checkpoint.files_digest(args.model_dir),
                                 chooser and chooser.valid.settings())
    ckpt = checkpoint.Checkpoint(args.out_dir, key, cfg.checkpoint_every)
    # Rank 0 alone writes (logs, checkpoints, outputs); the others hold the same weights.
    writes = launch.is_main()
    with Live(args.live, dvcyaml=None, save_dvc_exp=False) if writes else contextlib.nullcontext() as live:
        result = train_lora(model, examples, train_cfg, live, prefix="sft", checkpoint=ckpt, selection=chooser,
                            valid=valid, steps_per_eval=cfg.steps_per_eval)
    if not writes:
        return
    lora.save_adapters(model, lora.adapter_config(cfg), args.out_dir)
    n_tokens = sum(len(ex[0]) for ex in examples)
    per_epoch = epoch_steps(1, len(examples), cfg.batch_size, cfg.ranks)  # batches.length_buckets keeps every row
    chosen = result.get("chosen_step", result["last_step"])
    losses = [h["loss"] for h in result["history"] if "loss" in h]
    val_loss = {h["step"]: h["val_loss"] for h in result["history"] if "val_loss" in h}
    write_json(args.metrics, {
        "examples": len(examples),
        "steps_budget": train_cfg.iters,
        "epochs_budget": round(train_cfg.iters / per_epoch, 2),
        "steps_trained": result["last_step"],
        "chosen_step": chosen,
        "epochs": round(chosen / per_epoch, 2),  # of the adapter written
        "final_loss": round(losses[-1], 4),
        **({"valid_examples": len(valid), "stopped_early": result["stopped_early"],
            # The validation loss at the same steps: whether it would have chosen as the accuracy did.
            "val_loss_start": round(val_loss[0], 4), "val_loss_chosen": round(val_loss[chosen], 4),
            "val_loss_lowest": round(min(val_loss.values()), 4),
            "selection": {**chooser.summary(), "val_loss": [round(v, 4) for v in val_loss.values()]}}
           if valid else {}),
        "trainable_parameters": lora.count_trainable(model),
        **format_info,
    })
    # A resumed run times only its own steps; the training speed leaves out the greedy evaluations' time.
    seconds, steps = result["train_seconds"], result["steps"]
    decoding = chooser.valid.seconds if chooser else []
    write_timings(args.metrics, {"train_seconds": seconds, "steps": steps, "tokens_per_second":
                                 round(n_tokens / len(examples) * cfg.batch_size * steps / (seconds - sum(decoding)), 1)
                                 if steps else None, **({"valid_eval_seconds": decoding} if chooser else {})})
    ckpt.clear()


if __name__ == "__main__":
    run_stage(main)
