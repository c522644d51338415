"""DPO on top of the SFT adapter, with on-policy negatives; held-out pairs from the validation split.

    python -m stages.train_dpo models/base models/sft/s0 data/validated/dataset/train.parquet models/sft_dpo/s0 \
        --seed 0 --metrics metrics/train_dpo/s0.json --live dvclive/train_dpo/s0 \
        --valid data/validated/dataset/valid.parquet

Reads params [dpo] and its seed from ``--seed`` (dvc.yaml: once per seed of
study.seeds, on that seed's SFT); the LoRA shape comes from the SFT
adapter's adapter_config.json.
Samples the SFT model on ``dpo.prompts`` training prompts, pairs the gold
calls (chosen) with failing samples or, where every sample passes, a
corruption of the gold calls (rejected), then trains the LoRA for
``dpo.epochs`` passes over the pairs with the DPO loss against the frozen SFT
model. Pairs built the same way from ``dpo.valid_prompts`` validation prompts
are held out and scored every ``dpo.steps_per_eval`` steps and at the end:
pair accuracy (the chosen row's implicit reward above the rejected one's)
and mean reward margin. Writes mlx-lm adapters to the output directory, the
metrics (pairs per source, sample pass rate, last-steps loss, reward margin
and preference accuracy, the held-out scores), the seconds of each phase
beside them (.timings.json) and step curves under ``--live``. On a CPU it
runs as ``dpo.ranks`` data-parallel processes (toolcall/train/launch.py): they
share the sampling and the reference scoring, and each trains on its share
of each batch.
"""

import contextlib
import json
import time

import numpy as np

from toolcall.bfcl.dataset import read_split
from toolcall.calls.prompts import PromptFormat
from toolcall.cli import continuation_parser
from toolcall import config
from toolcall.sections import epoch_steps
from toolcall.errors import run_stage
from toolcall.io import write_json, write_timings
from toolcall.model import lora
from toolcall.train import checkpoint, dpo, launch
from toolcall.train.rollouts import choose_rows
from toolcall.train.trainer import StepLog


def main():
    ap = continuation_parser(__doc__, "train_dpo")
    ap.add_argument("--valid", required=True,
                    help="validation rows whose prompts give the held-out pairs (a dataset split's .parquet, or JSONL)")
    args = ap.parse_args()
    cfg = config.load("dpo", seed=args.seed)
    launch.ensure_ranks(cfg.ranks, "dpo")
    model, tokenizer = lora.load_policy(args.model_dir, args.sft_dir)
    fmt = PromptFormat(tokenizer)
    rows = choose_rows(read_split(args.train), cfg.prompts, cfg.seed)
    valid_rows = choose_rows(read_split(args.valid), cfg.valid_prompts, cfg.seed)
    key = checkpoint.continuation_key("train_dpo", cfg, args.model_dir, args.sft_dir, args.train, args.valid)
    ckpt = checkpoint.Checkpoint(args.out_dir, key, cfg.checkpoint_every)
    seconds = {}

    start = time.perf_counter()
    pairs, verdicts = dpo.preference_pairs(model, tokenizer, fmt, rows, cfg, cfg.seed, "dpo sample")
    # Another seed than the training prompts': the two sets of draws stay independent.
    heldout, heldout_verdicts = dpo.preference_pairs(model, tokenizer, fmt, valid_rows, cfg, cfg.heldout_seed(),
                                                     "dpo held-out sample")
    launch.agree(json.dumps([pairs, heldout]).encode(), "the preference pairs", launch.SAME_EVERYWHERE)
    seconds["sample"] = round(time.perf_counter() - start, 1)
    print(f"{len(pairs)} pairs from {len(rows)} prompts: {dpo.count_sources(pairs)}; "
          f"sample pass rate {np.mean(verdicts):.1%}; {len(heldout)} held-out pairs from {len(valid_rows)} "
          "validation prompts", flush=True)

    start = time.perf_counter()
    ref = dpo.reference_logps(model, pairs, cfg.loss_type)
    heldout_ref = dpo.reference_logps(model, heldout, cfg.loss_type)
    seconds["reference"] = round(time.perf_counter() - start, 1)

    from dvclive import Live

    start = time.perf_counter()
    train_cfg = cfg.train(len(pairs))
    writes = launch.is_main()  # rank 0 alone writes (logs, checkpoints, outputs)
    with Live(args.live, dvcyaml=None, save_dvc_exp=False) if writes else contextlib.nullcontext() as live:
        log = StepLog(live, "dpo", train_cfg.iters)
        dpo.train(model, pairs, ref, cfg, log, ckpt, heldout=(heldout, heldout_ref))
    seconds["train"] = round(time.perf_counter() - start, 1)
    if not writes:
        return
    lora.save_adapters(model, lora.read_adapter_config(args.sft_dir), args.out_dir)
    write_json(args.metrics, {
        "prompts": len(rows),
        "samples": len(verdicts),
        "sample_pass_rate": round(float(np.mean(verdicts)), 4),
        "pairs": len(pairs),
        "pairs_by_source": dpo.count_sources(pairs),
        "steps": train_cfg.iters,
        "epochs": round(train_cfg.iters / epoch_steps(1, len(pairs), cfg.batch_size, cfg.ranks), 2),
        "last_10_steps": log.last(10),
        "heldout": {
            "prompts": len(valid_rows),
            "pairs": len(heldout),
            "pairs_by_source": dpo.count_sources(heldout),
            "sample_pass_rate": round(float(np.mean(heldout_verdicts)), 4),
            # After the last step (the curve, every steps_per_eval steps, is in dvclive).
            "accuracy": round(log.latest("heldout_accuracy"), 4),
            "reward_margin": round(log.latest("heldout_reward_margin"), 4),
        },
    })
    write_timings(args.metrics, seconds)
    ckpt.clear()


if __name__ == "__main__":
    run_stage(main)
