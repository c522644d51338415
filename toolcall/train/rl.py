"""RL on top of the SFT adapter, rewarded by the project's own AST check.

``reward = reward_ast * [BFCL's AST check passes]
         + reward_format * [parses into >= 1 call, every call to an offered function]``

Each round takes fresh training prompts, samples ``samples_per_prompt``
completions per prompt from the current policy, rewards them, and updates the
LoRA parameters. ``rl.algo`` picks the update:

* ``rft`` (default): reward-filtered fine-tuning (rejection sampling /
  expert iteration): the distinct samples with reward >= ``min_reward`` are
  SFT examples (prompt + the sampled tokens + end-of-turn) for
  ``trainer.train_lora``.
* ``grpo`` (Shao et al. 2024): the samples of a prompt form a group,
  advantage ``(r - mean) / (std + eps)`` within it (population std; groups
  whose samples all score the same carry no signal and are dropped). Loss per
  completion token: the clipped PPO surrogate (the round's samples are reused
  for ``iters`` steps, so the policy drifts from the one that sampled them and
  the ratio to it is clipped at ``1 +- clip_eps``) plus ``kl_coef`` times the
  k3 estimate of KL(policy || SFT reference), ``exp(ref - logp) - (ref - logp)
  - 1``; averaged over all completion tokens of the batch (DAPO's token-level
  mean, so long samples are not down-weighted). Every log-prob (policy, the
  sampling policy, the reference) is taken at the sampling temperature, of
  ``softmax(logits / T)``: the samples were drawn from that distribution, so
  the ratio is an importance weight only on it (TRL's ``GRPOTrainer`` divides
  the logits by its sampling temperature in the same places).

The reward of each round's samples (drawn before its update) is logged to
dvclive under ``rl/round/`` at the training step they were drawn at, beside
the step curves, which run on across rounds. Given a ``selection.Selection``,
the policy's greedy validation accuracy is measured before round 1 (the SFT
model, step 0) and after every round, and the run ends with the weights of
the best.
"""

import json
import time

import mlx.core as mx
import numpy as np

from toolcall.evaluate.score import score_output
from toolcall.model.lora import restore, snapshot
from toolcall.train import launch
from toolcall.train.batches import collate, length_buckets, pad, shuffled
from toolcall.train.loss import token_logps
from toolcall.train.rollouts import choose_rows, completion_ids, completion_logps, sample
from toolcall.train.trainer import StepLog, optimize, train_lora

ADV_EPS = 1e-4


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
    order = choose_rows(rows, len(rows), cfg.seed)
    return [order[(r * cfg.prompts + j) % len(order)] for j in range(cfg.prompts)]


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


def grpo_loss(model, tokens, positions, weights, advantages, old, ref, clip_eps, kl_coef, temperature):
    """Clipped policy-gradient loss with a k3 KL penalty, mean over completion tokens.

    ``old`` and ``ref``: per-token log-probs at the same ``temperature`` as the policy's here.
    """
    logp = token_logps(model, tokens, positions, temperature)
    # Masked before exp: padding positions hold no log-probs.
    log_ratio = (logp - old) * weights
    log_ref_ratio = (ref - logp) * weights
    ratio = mx.exp(log_ratio)
    adv = advantages[:, None]
    surrogate = mx.minimum(ratio * adv, mx.clip(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    kl = mx.exp(log_ref_ratio) - log_ref_ratio - 1
    n = weights.sum()
    # Means over every rank's tokens under data-parallel ranks (launch.token_mean).
    loss = launch.token_mean(((kl_coef * kl - surrogate) * weights).sum(), n)
    clipped = (mx.abs(ratio - 1) > clip_eps).astype(mx.float32) * weights
    return loss, {"kl": launch.token_mean((kl * weights).sum(), n),
                  "clip_fraction": launch.token_mean(clipped.sum(), n)}


def grpo_batches(examples, advantages, old, ref, batch_size, seed):
    """Endless ``(tokens, positions, weights, advantages, old, ref)`` batches (this rank's share of each)."""
    for idx in shuffled(length_buckets([len(t) for t, _ in examples], batch_size, launch.size()), seed):
        idx = launch.shard(idx)
        tokens, _, positions, weights = collate([examples[i] for i in idx])
        width = positions.shape[1]
        yield (tokens, positions, weights, mx.array(advantages[idx]),
               pad([old[i] for i in idx], width), pad([ref[i] for i in idx], width))


def grpo_update(model, examples, advantages, reference, cfg, train_cfg, log):
    """One round of GRPO steps; ``reference``: the SFT LoRA weights (``lora.snapshot``)."""
    old = completion_logps(model, examples, cfg.temperature)
    current = snapshot(model)
    restore(model, reference)
    ref = completion_logps(model, examples, cfg.temperature)
    restore(model, current)

    def loss(model, tokens, positions, weights, adv, old_logp, ref_logp):
        return grpo_loss(model, tokens, positions, weights, adv, old_logp, ref_logp, cfg.clip_eps, cfg.kl_coef,
                         cfg.temperature)

    batches = grpo_batches(examples, advantages, old, ref, cfg.batch_size, train_cfg.seed)
    optimize(model, train_cfg, loss, batches, log)


# Per-round values logged to dvclive (rl/round/<name>).
ROUND_CURVES = ("mean_reward", "pass_rate", "format_rate", "kept")


def _log_round(live, step, stats):
    if live is not None:
        live.step = step
        for key in ROUND_CURVES:
            live.log_metric(f"rl/round/{key}", stats[key])
        live.next_step()


def run(model, tokenizer, fmt, rows, cfg, live=None, checkpoint=None, selection=None):
    """``cfg.rounds`` rounds of sampling, rewarding and updating; per-round stats.

    Step curves go to ``live`` under ``rl/`` (rft: ``train_lora``'s loss;
    grpo: loss, KL to the reference, fraction of clipped ratios), numbered
    across rounds; each round's sample rewards under ``rl/round/``. With a
    ``checkpoint`` each finished round is saved, and a rerun resumes after it
    (showing dvclive the finished rounds' rewards again). With a ``selection``
    each round's stats add its metrics after the update, which also go to
    ``live`` under ``rl/`` at the step the round ended at (step 0: before
    round 1), and the model ends with the weights of its best.
    """
    eos = fmt.encode(fmt.eos)
    reference = snapshot(model)
    meta = checkpoint.resume(model, None) if checkpoint else None
    stats = meta["extra"]["rounds"] if meta else []
    launch.agree(json.dumps(stats).encode(), "the rounds to resume after",
                 f"keep {checkpoint and checkpoint.dir} on storage every host sees, or delete it to start over")
    if selection is not None:
        valid_log = StepLog(live, "rl", cfg.rounds * cfg.iters)  # the evaluations, on the step curves' axis
        if meta:
            selection.load(meta["extra"]["selection"], meta["tensors"])
            valid_log.replay(selection.curve)
        else:
            valid_log(0, selection(0))
    steps_done = 0
    for done in stats:
        _log_round(live, steps_done, done)
        steps_done += cfg.iters if done["updated"] else 0
    for r in range(len(stats), cfg.rounds):
        train_cfg = cfg.train(r)
        batch_rows = round_rows(rows, cfg, r)
        prompts = [fmt.encode(fmt.prompt(row["messages"], row["functions"])) for row in batch_rows]
        start = time.perf_counter()
        samples = sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.temperature, cfg.max_tokens,
                         cfg.round_seed(r), cfg.sample_batch, label=f"rl round {r + 1} sample")
        # The ranks share the sampling (the samples do not depend on the rank count); each then trains on
        # its share of the batches.
        launch.agree(json.dumps([[list(map(int, ids)) for _, ids in group] for group in samples]).encode(),
                     f"round {r + 1}'s samples", launch.SAME_EVERYWHERE)
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
        _log_round(live, steps_done, round_stats)
        start = time.perf_counter()
        # Too few examples for one batch: the round samples but does not update.
        round_stats["updated"] = len(examples) >= cfg.batch_size
        log = StepLog(live, "rl", cfg.iters, offset=steps_done)
        if round_stats["updated"] and cfg.algo == "rft":
            history = train_lora(model, examples, train_cfg, log=log)["history"]
            round_stats["final_loss"] = round(history[-1]["loss"], 4)
        elif round_stats["updated"]:
            grpo_update(model, examples, advantages, reference, cfg, train_cfg, log)
            round_stats.update({f"final_{k}": v for k, v in log.last().items()})
        steps_done += cfg.iters if round_stats["updated"] else 0
        round_stats["train_seconds"] = round(time.perf_counter() - start, 1)
        if selection is not None:
            valid = selection(steps_done)
            valid_log(steps_done, valid)
            round_stats.update(valid)
        print(f"[rl] round {r + 1}/{cfg.rounds}: {round_stats}", flush=True)
        stats.append(round_stats)
        if checkpoint is not None:  # each round seeds itself, so a resumed run needs only the weights (and the best)
            extra, tensors = selection.state() if selection is not None else (None, None)
            checkpoint.save(r + 1, model, None, [], extra={"rounds": stats, "selection": extra}, tensors=tensors)
    if selection is not None:
        selection.restore()
    return stats
