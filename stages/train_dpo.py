"""DPO on top of the SFT adapter, with on-policy negatives from the training split.

    python -m stages.train_dpo models/base models/sft/s0 data/validated/train.jsonl models/sft_dpo/s0 --seed 0 \
        --metrics metrics/train_dpo/s0.json --live dvclive/train_dpo/s0

Reads params [dpo] and its seed from ``--seed`` (dvc.yaml: once per seed of
study.seeds, on that seed's SFT); the LoRA shape comes from the SFT
adapter's adapter_config.json.
Samples the SFT model on ``dpo.prompts`` training prompts, pairs the gold
calls (chosen) with failing samples or, where every sample passes, a
corruption of the gold calls (rejected), then trains the LoRA with the DPO
loss against the frozen SFT model. Writes mlx-lm adapters to the output
directory, the metrics (pairs per source, sample pass rate, last-steps loss,
reward margin, preference accuracy), the seconds of each phase beside them
(.timings.json) and step curves under ``--live``.
"""

import time

import numpy as np

from toolcall.cli import continuation_parser
from toolcall import checkpoint, dpo, lora
from toolcall.config import DpoConfig, from_params, seeded
from toolcall.data import read_rows
from toolcall.errors import run_stage
from toolcall.io import read_params, write_json, write_timings
from toolcall.prompts import PromptFormat
from toolcall.rollouts import choose_rows, sample
from toolcall.trainer import StepLog


def main():
    args = continuation_parser(__doc__, "train_dpo").parse_args()
    cfg = from_params(DpoConfig, seeded(read_params("dpo"), args.seed, "dpo"), "dpo")
    model, tokenizer = lora.load_policy(args.model_dir, args.sft_dir)
    fmt = PromptFormat(tokenizer)
    rows = choose_rows(read_rows(args.train), cfg.prompts, cfg.seed)
    key = checkpoint.continuation_key("train_dpo", cfg, args.model_dir, args.sft_dir, args.train)
    ckpt = checkpoint.Checkpoint(args.out_dir, key, cfg.checkpoint_every)
    seconds = {}

    start = time.perf_counter()
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    samples = sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.temperature, cfg.max_tokens,
                     cfg.seed, cfg.sample_batch, label="dpo sample")
    pairs, verdicts = dpo.build_pairs(rows, samples, fmt, np.random.default_rng(cfg.seed))
    seconds["sample"] = round(time.perf_counter() - start, 1)
    print(f"{len(pairs)} pairs from {len(rows)} prompts: {dpo.count_sources(pairs)}; "
          f"sample pass rate {np.mean(verdicts):.1%}", flush=True)

    start = time.perf_counter()
    ref = dpo.reference_logps(model, pairs, cfg.loss_type)
    seconds["reference"] = round(time.perf_counter() - start, 1)

    from dvclive import Live

    start = time.perf_counter()
    with Live(args.live, dvcyaml=None, save_dvc_exp=False) as live:
        log = StepLog(live, "dpo", cfg.iters)
        dpo.train(model, pairs, ref, cfg, log, ckpt)
    seconds["train"] = round(time.perf_counter() - start, 1)
    lora.save_adapters(model, lora.read_adapter_config(args.sft_dir), args.out_dir)
    write_json(args.metrics, {
        "prompts": len(rows),
        "samples": len(verdicts),
        "sample_pass_rate": round(float(np.mean(verdicts)), 4),
        "pairs": len(pairs),
        "pairs_by_source": dpo.count_sources(pairs),
        "epochs": round(cfg.iters * cfg.batch_size / len(pairs), 2),
        "last_10_steps": log.last(10),
    })
    write_timings(args.metrics, seconds)
    ckpt.clear()


if __name__ == "__main__":
    run_stage(main)
