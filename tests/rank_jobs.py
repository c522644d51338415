"""Small jobs that tests/test_launch.py runs as data-parallel ranks (or as one plain process).

    python tests/rank_jobs.py JOB OUT_DIR

Each rank writes what it saw to OUT_DIR/<job>.rank<r>.json.
"""

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import toolcall  # noqa: E402,F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_flatten, tree_unflatten  # noqa: E402

from configs import config  # noqa: E402
from tiny_model import make_tiny_model  # noqa: E402
from toolcall.train import dpo, launch, rl, rollouts
from toolcall.model import lora# noqa: E402
from toolcall.config import DpoConfig, RlConfig, SftConfig# noqa: E402
from toolcall.train.trainer import StepLog# noqa: E402


def policy(out):
    """The tiny model with a seeded, nonzero LoRA: the same weights in every rank and run."""
    base = make_tiny_model(out / f"base{launch.rank()}")  # deterministic; a directory per rank: no write race
    model, _ = lora.load_model(base)
    lora.add_lora(model, lora.adapter_config(config(SftConfig, "sft", lora_layers=2)), seed=0)
    mx.random.seed(1)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.01) for k, v in lora.snapshot(model)]))
    return model


def optimize(out):
    """DPO and GRPO steps (trainer.optimize: gradient all-reduce, metrics averaged over ranks).

    Rows of different lengths, so the ranks' shares of a batch hold different
    numbers of completion tokens.
    """
    model = policy(out)
    start = lora.snapshot(model)
    rng = np.random.default_rng(0)
    pairs = [{"id": str(i), "source": "on_policy", "prompt_len": 12,
              "chosen": rng.integers(3, 200, 20 + 3 * i).tolist(), "rejected": rng.integers(3, 200, 15 + 5 * i).tolist()}
             for i in range(8)]
    ref = dpo.reference_logps(model, pairs, "sigmoid")
    cfg = config(DpoConfig, "dpo", epochs=1.5, batch_size=4, learning_rate=1e-2, ranks=launch.size())  # 3 steps
    dpo_log = StepLog(None, "dpo", cfg.train(len(pairs)).iters)
    dpo.train(model, pairs, ref, cfg, dpo_log)
    lora.restore(model, start)
    examples = [(rng.integers(3, 200, 12).tolist() + rng.integers(3, 200, 2 + 6 * i).tolist(), 12) for i in range(8)]
    advantages = np.linspace(-1, 1, 8).astype(np.float32)
    rl_cfg = config(RlConfig, "rl", algo="grpo", iters=3, batch_size=4, learning_rate=1e-2, ranks=launch.size())
    grpo_log = StepLog(None, "rl", rl_cfg.iters)
    # The policy has moved from the reference (a KL term to learn from): restore the start as reference.
    lora.restore(model, [(k, v * 1.5) for k, v in start])
    rl.grpo_update(model, examples, advantages, start, rl_cfg, rl_cfg.train(0), grpo_log)
    weights = {k: np.array(v).tolist() for k, v in tree_flatten(model.trainable_parameters())}
    return {"dpo": dpo_log.history, "grpo": grpo_log.history, "weights": weights}


def shared_rollouts(out):
    """Samples (3 chunks of prompts) and DPO reference log-probs, the work the ranks share (launch.share)."""
    model = policy(out)
    tokenizer = lora.load_model(out / f"base{launch.rank()}")[1]
    prompts = [tokenizer.encode(f"Call tool number {i} please") for i in range(2 * rollouts.SAMPLE_CHUNK + 5)]
    samples = rollouts.sample(model, tokenizer, prompts, k=2, temperature=1.0, max_tokens=5, seed=3, batch_size=16,
                              label=None)
    rng = np.random.default_rng(0)
    pairs = [{"prompt_len": 6, "chosen": rng.integers(3, 200, 9 + i).tolist(),
              "rejected": rng.integers(3, 200, 8 + 2 * i).tolist()} for i in range(7)]
    chosen, rejected = dpo.reference_logps(model, pairs, "sigmoid")
    return {"samples": [[[text, list(map(int, ids))] for text, ids in group] for group in samples],
            "ref": [chosen.tolist(), rejected.tolist()]}


def selection_answers(out):
    """The validation rows' greedy answers and the selection's evaluation of them (the ranks share the decoding)."""
    from test_dpo import fixture_split
    from toolcall.calls.prompts import PromptFormat
    from toolcall.train import selection

    model = policy(out)
    # A LoRA far from zero: answers that differ from prompt to prompt (the tiny model alone repeats one token).
    lora.restore(model, [(k, v * 100) for k, v in lora.snapshot(model)])
    tokenizer = lora.load_model(out / f"base{launch.rank()}")[1]
    valid = selection.ValidationSet(fixture_split()[1], PromptFormat(tokenizer), 24, 4)
    chooser = selection.Selection(model, valid, 0)
    chooser(0)
    return {"answers": valid.answers(model), "curve": chooser.curve}


def pid_then_sleep(out):
    launch.ensure_ranks(2, "test")
    (out / f"pid{launch.rank()}").write_text(str(os.getpid()))
    time.sleep(120)


def rank1_fails(out):
    if os.environ["MLX_RANK"] == "1":
        sys.exit("rank 1: something went wrong")
    time.sleep(120)  # rank 0 would wait for rank 1 forever


def wrong_ranks(out):
    launch.ensure_ranks(3, "sft")


def disagree(out):
    launch.agree(str(launch.rank()).encode(), "the samples", launch.SAME_EVERYWHERE)


if __name__ == "__main__":
    job, out = sys.argv[1], Path(sys.argv[2])
    result = globals()[job](out)
    (out / f"{job}.rank{launch.rank()}.json").write_text(json.dumps(result))
