"""RL on top of the SFT adapter, rewarded by the project's own AST check.

``reward = reward_ast * [BFCL's AST check passes]
         + reward_format * [parses into >= 1 call, every call to an offered function]``

Each round takes fresh training prompts, samples ``samples_per_prompt``
completions per prompt from the current policy, rewards them, and updates the
LoRA parameters. ``rl.algo`` picks the update:

* ``rft`` (default): reward-filtered fine-tuning (rejection sampling /
  expert iteration): the distinct samples with reward >= ``min_reward`` are
  SFT examples (prompt + the sampled tokens + end-of-turn) for
  ``training.train_lora``.
* ``grpo`` (Shao et al. 2024): the samples of a prompt form a group,
  advantage ``(r - mean) / (std + eps)`` within it (population std; groups
  whose samples all score the same carry no signal and are dropped). Loss per
  completion token: the clipped PPO surrogate (the round's samples are reused
  for ``iters`` steps, so the policy drifts from the one that sampled them and
  the ratio to it is clipped at ``1 +- clip_eps``) plus ``kl_coef`` times the
  k3 estimate of KL(policy || SFT reference), ``exp(ref - logp) - (ref - logp)
  - 1``; averaged over all completion tokens of the batch (DAPO's token-level
  mean, so long samples are not down-weighted).

Cost at the defaults (SmolLM2-135M, 2 idle cores at ~110-250 trained
tokens/s), per round: 160 samples ~1-2 min, 10 steps of 4 sequences ~1-2.5
min; grpo adds ~0.5 min of scoring (old and reference log-probs). Two rounds:
~4.5-9 min.
"""

import dataclasses
import time

import mlx.core as mx
import numpy as np

from . import policy, training
from .evaluation import score_output

ALGOS = ("rft", "grpo")
ADV_EPS = 1e-4


@dataclasses.dataclass
class RlConfig:
    algo: str = "rft"
    seed: int = 0
    rounds: int = 2
    prompts: int = 40               # fresh training prompts per round
    samples_per_prompt: int = 4
    temperature: float = 0.7
    max_tokens: int = 256
    learning_rate: float = 1e-4
    iters: int = 10                 # updates per round
    batch_size: int = 4
    kl_coef: float = 0.04           # grpo
    clip_eps: float = 0.2           # grpo
    reward_ast: float = 1.0
    reward_format: float = 0.2
    min_reward: float = 1.0         # rft keeps samples with at least this reward

    def check(self):
        if self.algo not in ALGOS:
            yield f"algo={self.algo!r} must be one of {ALGOS}"
        for key in ("rounds", "prompts", "samples_per_prompt", "max_tokens", "iters", "batch_size"):
            if getattr(self, key) < 1:
                yield f"{key}={getattr(self, key)} must be >= 1"
        if self.algo == "grpo" and self.samples_per_prompt < 2:
            yield f"samples_per_prompt={self.samples_per_prompt} must be >= 2 for grpo (advantages are within a group)"
        if self.temperature <= 0:
            yield f"temperature={self.temperature} must be > 0 (0 is greedy: every sample the same)"
        if not 0 < self.learning_rate < 1:
            yield f"learning_rate={self.learning_rate} must be in (0, 1)"
        if self.kl_coef < 0 or self.clip_eps <= 0:
            yield f"kl_coef={self.kl_coef} must be >= 0 and clip_eps={self.clip_eps} > 0"
        if self.reward_ast <= 0 or self.reward_format < 0:
            yield f"reward_ast={self.reward_ast} must be > 0 and reward_format={self.reward_format} >= 0"
        if self.min_reward > self.reward_ast + self.reward_format:
            yield (f"min_reward={self.min_reward} is above the best possible reward "
                   f"{self.reward_ast + self.reward_format}: rft would keep nothing")


def reward(row, text, reward_ast=1.0, reward_format=0.2):
    """Reward of one raw output for ``row``, with its two terms."""
    record = score_output(row, text)
    offered = {f["name"] for f in row["functions"]}
    well_formed = bool(record["calls"]) and all(c["name"] in offered for c in record["calls"])
    return {"reward": reward_ast * record["valid"] + reward_format * well_formed,
            "valid": record["valid"], "well_formed": well_formed}


def group_advantages(rewards):
    """GRPO advantages of one group: rewards standardized within the group."""
    r = np.asarray(rewards, np.float64)
    return (r - r.mean()) / (r.std() + ADV_EPS)


def round_rows(rows, cfg, r):
    """Round ``r``'s prompts: the next ``cfg.prompts`` of one seeded order, wrapping around."""
    order = policy.choose_rows(rows, len(rows), cfg.seed)
    return [order[(r * cfg.prompts + j) % len(order)] for j in range(cfg.prompts)]


def completion_ids(ids, eos, max_tokens, always_eos):
    """Sampled ids plus end-of-turn; a sample cut at ``max_tokens`` never sampled one, so
    only ``always_eos`` (SFT targets should end their turn) adds it there."""
    return list(ids) + eos if always_eos or len(ids) < max_tokens else list(ids)


def rft_examples(prompts, samples, scores, cfg, eos):
    """Distinct samples with reward >= ``min_reward`` as ``(tokens, prompt_len)`` SFT examples."""
    examples = []
    for prompt, group, group_scores in zip(prompts, samples, scores, strict=True):
        seen = set()
        for (_, ids), s in zip(group, group_scores):
            if s["reward"] >= cfg.min_reward and tuple(ids) not in seen:
                seen.add(tuple(ids))
                examples.append((prompt + completion_ids(ids, eos, cfg.max_tokens, True), len(prompt)))
    return examples


def grpo_examples(prompts, samples, scores, cfg, eos):
    """``(examples, advantages)`` of the groups whose rewards differ."""
    examples, advantages = [], []
    for prompt, group, group_scores in zip(prompts, samples, scores, strict=True):
        rewards = [s["reward"] for s in group_scores]
        if max(rewards) == min(rewards):
            continue
        for (_, ids), adv in zip(group, group_advantages(rewards)):
            examples.append((prompt + completion_ids(ids, eos, cfg.max_tokens, False), len(prompt)))
            advantages.append(adv)
    return examples, np.asarray(advantages, np.float32)


def grpo_loss(model, tokens, positions, weights, advantages, old, ref, clip_eps, kl_coef):
    """Clipped policy-gradient loss with a k3 KL penalty, mean over completion tokens."""
    logp = policy.token_logps(model, tokens, positions)
    # Masked before exp: padding positions hold no log-probs.
    log_ratio = (logp - old) * weights
    log_ref_ratio = (ref - logp) * weights
    ratio = mx.exp(log_ratio)
    adv = advantages[:, None]
    surrogate = mx.minimum(ratio * adv, mx.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    kl = mx.exp(log_ref_ratio) - log_ref_ratio - 1
    n = weights.sum()
    loss = ((kl_coef * kl - surrogate) * weights).sum() / n
    clipped = (mx.abs(ratio - 1) > clip_eps).astype(mx.float32) * weights
    return loss, {"kl": (kl * weights).sum() / n, "clip_fraction": clipped.sum() / n}


def grpo_batches(examples, advantages, old, ref, batch_size, seed):
    """Endless ``(tokens, positions, weights, advantages, old, ref)`` batches."""
    for idx in policy.index_batches([len(t) for t, _ in examples], batch_size, seed):
        tokens, _, positions, weights = training.collate([examples[i] for i in idx])
        width = positions.shape[1]
        yield (tokens, positions, weights, mx.array(advantages[idx]),
               policy.pad([old[i] for i in idx], width), policy.pad([ref[i] for i in idx], width))


def grpo_update(model, examples, advantages, reference, cfg, lora_cfg, on_step):
    """One round of GRPO steps; ``reference``: the SFT LoRA weights (``policy.snapshot``)."""
    old = policy.completion_logps(model, examples)
    current = policy.snapshot(model)
    policy.restore(model, reference)
    ref = policy.completion_logps(model, examples)
    policy.restore(model, current)

    def loss(model, tokens, positions, weights, adv, old_logp, ref_logp):
        return grpo_loss(model, tokens, positions, weights, adv, old_logp, ref_logp, cfg.clip_eps, cfg.kl_coef)

    batches = grpo_batches(examples, advantages, old, ref, cfg.batch_size, lora_cfg.seed)
    policy.optimize(model, lora_cfg, loss, batches, on_step)


def run(model, tokenizer, fmt, rows, cfg, adapter_dir, live=None):
    """``cfg.rounds`` rounds of sampling, rewarding and updating; per-round stats.

    Step curves go to ``live`` under ``rl/`` (rft: ``train_lora``'s loss;
    grpo: loss, KL to the reference, fraction of clipped ratios).
    """
    eos = fmt.encode(fmt.eos)
    reference = policy.snapshot(model)
    stats = []
    for r in range(cfg.rounds):
        lora_cfg = policy.lora_config(adapter_dir, "rl", seed=cfg.seed + r, learning_rate=cfg.learning_rate,
                                      iters=cfg.iters, batch_size=cfg.batch_size, warmup=0, steps_per_report=1)
        batch_rows = round_rows(rows, cfg, r)
        prompts = [fmt.encode(fmt.prompt(row["messages"], row["functions"])) for row in batch_rows]
        start = time.perf_counter()
        samples = policy.sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.temperature,
                                cfg.max_tokens, cfg.seed + r, progress=f"rl round {r + 1} sample")
        scores = [[reward(row, text, cfg.reward_ast, cfg.reward_format) for text, _ in group]
                  for row, group in zip(batch_rows, samples)]
        sample_seconds = time.perf_counter() - start
        if cfg.algo == "rft":
            examples = rft_examples(prompts, samples, scores, cfg, eos)
        else:
            examples, advantages = grpo_examples(prompts, samples, scores, cfg, eos)
        flat = [s for group in scores for s in group]
        n = len(flat)
        round_stats = {
            "prompts": len(prompts),
            "samples": n,
            "mean_reward": round(float(np.mean([s["reward"] for s in flat])), 4),
            "pass_rate": round(sum(s["valid"] for s in flat) / n, 4),
            "format_rate": round(sum(s["well_formed"] for s in flat) / n, 4),
            # rft: samples kept for fine-tuning; grpo: samples in groups with a learning signal
            "kept": len(examples),
            "fraction_kept": round(len(examples) / n, 4),
            "sample_seconds": round(sample_seconds, 1),
        }
        start = time.perf_counter()
        # Too few examples for one batch: the round samples but does not update.
        round_stats["updated"] = len(examples) >= cfg.batch_size
        if round_stats["updated"] and cfg.algo == "rft":
            history = training.train_lora(model, examples, lora_cfg, live, prefix="rl")["history"]
            round_stats["final_loss"] = round(history[-1]["train_loss"], 4)
        elif round_stats["updated"]:
            log = policy.StepLog(live, "rl", cfg.iters)
            grpo_update(model, examples, advantages, reference, cfg, lora_cfg, log)
            round_stats.update({f"final_{k}": v for k, v in log.last().items()})
        round_stats["train_seconds"] = round(time.perf_counter() - start, 1)
        print(f"[rl] round {r + 1}/{cfg.rounds}: {round_stats}", flush=True)
        stats.append(round_stats)
    return stats
