"""DPO on top of the SFT adapter, on the SFT model's own samples; held-out pairs from the validation split.

    python -m stages.train_dpo models/base models/sft/s0 data/validated/dataset/train.parquet models/sft_dpo/s0 \
        --seed 0 --metrics metrics/train_dpo/s0.json --live dvclive/train_dpo/s0 \
        --valid data/validated/dataset/valid.parquet

Reads params [dpo] and its seed from ``--seed`` (dvc.yaml: once per seed of
study.seeds, on that seed's SFT); the LoRA shape comes from the SFT
adapter's adapter_config.json.
Samples the SFT model on ``dpo.prompts`` training prompts and pairs
(toolcall/train/pairs.py) a passing sample (chosen; ``dpo.chosen: gold``, or
no sample passing: the gold calls) with each failing sample or, where every
sample passes, a corruption of the chosen calls (rejected); with
``dpo.eos_balance`` at most half the pairs may be ones whose rejected answer
ends its turn where the chosen one goes on. Then trains the LoRA for
``dpo.epochs`` passes over the pairs with the DPO loss against the frozen SFT
model plus ``dpo.rpo_alpha`` times the chosen answers' NLL, after
``dpo.warmup`` warmup steps, gradients clipped to ``dpo.max_grad_norm``.
Pairs built the same way from ``dpo.valid_prompts`` validation prompts
are held out and scored every ``dpo.steps_per_eval`` steps and at the end:
pair accuracy (the chosen row's implicit reward above the rejected one's)
and mean reward margin. Writes mlx-lm adapters to the output directory, the
metrics (pairs by the source of each side and by where the two first differ,
sample pass rate, last-steps loss, reward margin and preference accuracy, the
held-out pairs and scores), the seconds of each phase
beside them (.timings.json) and step curves under ``--live``. On a CPU it
runs as ``dpo.ranks`` data-parallel processes (toolcall/train/launch.py): they
share the sampling and the reference scoring, and each trains on its share
of each batch.

The adapter written is chosen on every validation row, decoded greedily as
stage eval decodes (toolcall/train/selection.py; [eval]'s max_tokens and
batch_size): at step 0 (the SFT model itself), every ``dpo.steps_per_eval``
steps and after the last, the highest accuracy's (a tie: the earlier step).
The metrics' ``selection`` holds each evaluation's accuracy and answer format,
the chosen step's and step 0's; the held-out pair scores stay a curve beside it.
"""

import contextlib
import json
import time

from toolcall.bfcl.dataset import read_split
from toolcall.calls.prompts import PromptFormat
from toolcall.cli import continuation_parser
from toolcall import config
from toolcall.sections import epoch_steps
from toolcall.errors import run_stage
from toolcall.io import write_json, write_timings
from toolcall.model import lora
from toolcall.train import checkpoint, dpo, launch, pairs, selection
from toolcall.train.rollouts import choose_rows
from toolcall.train.trainer import StepLog


def main():
    ap = continuation_parser(__doc__, "train_dpo")
    ap.add_argument("--valid", required=True,
                    help="validation rows, whose greedy accuracy chooses the adapter kept and whose prompts give the "
                         "held-out pairs (a dataset split's .parquet, or JSONL)")
    args = ap.parse_args()
    cfg = config.load("dpo", seed=args.seed)
    launch.ensure_ranks(cfg.ranks, "dpo")
    model, tokenizer = lora.load_policy(args.model_dir, args.sft_dir)
    fmt = PromptFormat(tokenizer)
    rows = choose_rows(read_split(args.train), cfg.prompts, cfg.seed)
    valid_split = read_split(args.valid)
    valid_rows = choose_rows(valid_split, cfg.valid_prompts, cfg.seed)
    chooser = selection.on_validation(model, fmt, valid_split, "dpo valid")
    key = checkpoint.continuation_key("train_dpo", cfg, args.model_dir, args.sft_dir, args.train, args.valid,
                                      settings=chooser.valid.settings())
    ckpt = checkpoint.Checkpoint(args.out_dir, key, cfg.checkpoint_every)
    seconds = {}

    start = time.perf_counter()
    train_pairs, summary = pairs.preference_pairs(model, tokenizer, fmt, rows, cfg, cfg.seed, "dpo sample")
    # Another seed than the training prompts': the two sets of draws stay independent.
    heldout, heldout_summary = pairs.preference_pairs(model, tokenizer, fmt, valid_rows, cfg, cfg.heldout_seed(),
                                                    "dpo held-out sample")
    launch.agree(json.dumps([train_pairs, heldout]).encode(), "the preference pairs", launch.SAME_EVERYWHERE)
    seconds["sample"] = round(time.perf_counter() - start, 1)
    print(f"{len(train_pairs)} pairs from {len(rows)} prompts: {summary}; {len(heldout)} held-out pairs from "
          f"{len(valid_rows)} validation prompts: {heldout_summary}", flush=True)

    start = time.perf_counter()
    ref = dpo.reference_logps(model, train_pairs, cfg.loss_type)
    heldout_ref = dpo.reference_logps(model, heldout, cfg.loss_type)
    seconds["reference"] = round(time.perf_counter() - start, 1)

    from dvclive import Live

    start = time.perf_counter()
    train_cfg = cfg.train(len(train_pairs))
    writes = launch.is_main()  # rank 0 alone writes (logs, checkpoints, outputs)
    with Live(args.live, dvcyaml=None, save_dvc_exp=False) if writes else contextlib.nullcontext() as live:
        log = StepLog(live, "dpo", train_cfg.iters)
        dpo.train(model, train_pairs, ref, cfg, log, ckpt, heldout=(heldout, heldout_ref), selection=chooser)
    seconds["train"] = round(time.perf_counter() - start, 1)
    seconds["valid_eval"] = chooser.valid.seconds  # in train's; of the evaluations this process ran
    if not writes:
        return
    lora.save_adapters(model, lora.read_adapter_config(args.sft_dir), args.out_dir)
    write_json(args.metrics, {
        **summary,  # prompts, samples, pass rate, pairs by source and by first difference
        "steps": train_cfg.iters,
        "epochs": round(train_cfg.iters / epoch_steps(1, len(train_pairs), cfg.batch_size, cfg.ranks), 2),
        "last_10_steps": log.last(10),
        "heldout": {
            **heldout_summary,
            # After the last step (the curve, every steps_per_eval steps, is in dvclive).
            "accuracy": round(log.latest("heldout_accuracy"), 4),
            "reward_margin": round(log.latest("heldout_reward_margin"), 4),
        },
        "selection": chooser.summary(),
    })
    write_timings(args.metrics, seconds)
    ckpt.clear()


if __name__ == "__main__":
    run_stage(main)
