"""RL on top of the SFT adapter, rewarded by the AST check (rl.algo: rft or grpo).

    python -m stages.train_rl models/base models/sft data/validated/train.jsonl models/sft_rl

Reads params [rl]; the LoRA shape comes from models/sft/adapter_config.json.
Each of ``rl.rounds`` rounds samples fresh training prompts from the current
policy, rewards the samples and updates the LoRA (see toolcall/rl.py).
Writes mlx-lm adapters to models/sft_rl, metrics/train_rl.json (per round:
mean reward, pass rate, format rate, fraction kept, seconds) and step curves
under dvclive/train_rl.
"""

import argparse

from toolcall import policy, rl, training
from toolcall.io import read_params, write_json
from toolcall.prompts import PromptFormat
from toolcall.data import read_rows
from toolcall.errors import run_stage


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir")
    ap.add_argument("sft_dir")
    ap.add_argument("train")
    ap.add_argument("out_dir")
    ap.add_argument("--metrics", default="metrics/train_rl.json")
    ap.add_argument("--live", default="dvclive/train_rl")
    args = ap.parse_args()
    cfg = training.from_params(rl.RlConfig, read_params("rl"), "rl")
    # Checked before the slow part: a bad LoRA training field fails here, not after sampling.
    lora_cfg = policy.lora_config(args.sft_dir, "rl", seed=cfg.seed, learning_rate=cfg.learning_rate,
                                  iters=cfg.iters, batch_size=cfg.batch_size, warmup=0)
    model, tokenizer = policy.load_policy(args.model_dir, args.sft_dir)
    fmt = PromptFormat(tokenizer)
    rows = read_rows(args.train)
    from dvclive import Live

    with Live(args.live, dvcyaml=None, save_dvc_exp=False) as live:
        rounds = rl.run(model, tokenizer, fmt, rows, cfg, args.sft_dir, live)
    training.save_adapters(model, lora_cfg, args.out_dir)
    write_json(args.metrics, {
        "algo": cfg.algo,
        "rounds": {f"round_{i + 1}": r for i, r in enumerate(rounds)},
        "train_seconds": round(sum(r["sample_seconds"] + r["train_seconds"] for r in rounds), 1),
    })


if __name__ == "__main__":
    run_stage(main)
