"""RL on top of the SFT adapter, rewarded by the AST check (rl.algo: rft or grpo).

    python -m stages.train_rl models/base models/sft/s0 data/validated/dataset/train.parquet models/sft_rl/s0 --seed 0 \
        --metrics metrics/train_rl/s0.json --live dvclive/train_rl/s0 --valid data/validated/dataset/valid.parquet

Reads params [rl] and its seed from ``--seed`` (dvc.yaml: once per seed of
study.seeds, on that seed's SFT), with ``--overrides SECTION``'s keys in place
of [rl]'s (stage train_grpo: ``--overrides grpo``, the GRPO arm, into
models/sft_grpo/s<seed>); the LoRA shape comes from the SFT
adapter's adapter_config.json. Each of ``rl.rounds`` rounds samples fresh
training prompts from the current policy, rewards the samples and updates
the LoRA (see toolcall/train/rl.py). Writes mlx-lm adapters to the output
directory, the metrics (per round: mean reward, pass rate, format rate,
samples kept; the update steps in all), the seconds of each round beside
them (.timings.json), and under ``--live`` the step curves and each round's
reward and kept count. On a CPU it runs as ``rl.ranks`` data-parallel
processes (toolcall/train/launch.py): they share the sampling, and each trains on
its share of each batch.

With ``--valid`` (and [eval]'s max_tokens and batch_size) the validation rows
are decoded greedily as stage eval decodes (toolcall/train/selection.py)
before round 1 (step 0: the SFT model) and after every round; the adapter
written is the highest accuracy's (a tie: the earlier), the metrics'
``selection`` holds each evaluation (``steps``: update steps done),
``chosen_round`` the rounds behind the chosen one (0: none), and each round's
stats its accuracy after the update. Without it (the ablation arms, whose
test items the main validation rows may be) the last round's adapter is written.
"""

import contextlib

from toolcall.bfcl.dataset import read_split
from toolcall.calls.prompts import PromptFormat
from toolcall.cli import continuation_parser
from toolcall import config
from toolcall.errors import run_stage
from toolcall.io import write_json, write_timings
from toolcall.model import lora
from toolcall.train import checkpoint, launch, rl, selection


def main():
    ap = continuation_parser(__doc__, "train_rl")
    ap.add_argument("--valid", help="validation rows whose greedy accuracy chooses the round whose adapter is kept "
                                    "(a dataset split's .parquet, or JSONL)")
    ap.add_argument("--overrides", action="append", default=[], metavar="SECTION",
                    help="sections whose keys replace [rl]'s, later ones winning (train_grpo: --overrides grpo)")
    args = ap.parse_args()
    cfg = config.load("rl", seed=args.seed, overrides=args.overrides)
    launch.ensure_ranks(cfg.ranks, " + ".join(["rl", *args.overrides]))
    model, tokenizer = lora.load_policy(args.model_dir, args.sft_dir)
    fmt = PromptFormat(tokenizer)
    rows = read_split(args.train)
    chooser = selection.on_validation(model, fmt, read_split(args.valid), "rl valid") if args.valid else None
    key = checkpoint.continuation_key("train_rl", cfg, args.model_dir, args.sft_dir, args.train,
                                      *([args.valid] if args.valid else []),
                                      settings=chooser and chooser.valid.settings())
    ckpt = checkpoint.Checkpoint(args.out_dir, key, every=1)  # after every round
    from dvclive import Live

    writes = launch.is_main()  # rank 0 alone writes (logs, checkpoints, outputs)
    with Live(args.live, dvcyaml=None, save_dvc_exp=False) if writes else contextlib.nullcontext() as live:
        rounds = rl.run(model, tokenizer, fmt, rows, cfg, live, ckpt, chooser)
    if not writes:
        return
    lora.save_adapters(model, lora.read_adapter_config(args.sft_dir), args.out_dir)
    timed = ("sample_seconds", "train_seconds")
    write_json(args.metrics, {
        "algo": cfg.algo,
        "steps": sum(cfg.iters for r in rounds if r["updated"]),
        "rounds": {f"round_{i + 1}": {k: v for k, v in r.items() if k not in timed} for i, r in enumerate(rounds)},
        # One evaluation before the rounds and one after each: the chosen one's index is its round.
        **({"chosen_round": chooser.best, "selection": chooser.summary()} if chooser else {}),
    })
    write_timings(args.metrics, {**{f"round_{i + 1}": {k: r[k] for k in timed} for i, r in enumerate(rounds)},
                                 **({"valid_eval_seconds": chooser.valid.seconds} if chooser else {})})
    ckpt.clear()


if __name__ == "__main__":
    run_stage(main)
