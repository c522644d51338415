"""DPO on top of the SFT adapter: preference pairs from the training split, and the loss.

Pairs (training rows only): *chosen* is the gold calls rendered by the SFT
template (``PromptFormat.example``), exactly the SFT target; *rejected* is one
of the SFT model's own samples that fails the AST check (on-policy negatives,
one pair per distinct failing sample). When every sample of a prompt is right
there is no negative to learn from, so a controlled corruption of the gold
calls, rendered by the same template, takes its place (see ``CORRUPTIONS``);
each corruption is kept only if the AST check rejects it.

The loss (Rafailov et al. 2023) compares summed completion log-probs of the
policy and of the frozen SFT reference. At step 0 policy == reference, so the
reference log-probs are computed once before any update and no second model
is kept. ``loss_type: ipo`` (Azar et al. 2023) regresses the margin to
``1 / (2 beta)``; like TRL and mlx-lm-lora it uses per-token mean log-probs,
the scale on which that target is meant.
"""

import copy
import json
from collections import Counter

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from toolcall.bfcl.rows import gold_calls
from toolcall.calls.scoring import check
from toolcall.config import LOSSES
from toolcall.evaluate.score import score_output
from toolcall.train import launch
from toolcall.train.batches import collate, length_buckets, shuffled
from toolcall.train.loss import token_logps
from toolcall.train.rollouts import completion_ids, completion_logps, sample
from toolcall.train.trainer import optimize

CORRUPTIONS = ("wrong_value", "wrong_type", "missing_required", "wrong_function", "dropped_call", "extra_call")


# ---------------------------------------------------------------- corruptions


def _other_value(value):
    """A value of the same type that differs from ``value`` (also after BFCL's string standardizing)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 7
    if isinstance(value, float):
        return value * 2 + 1.5
    if isinstance(value, str):
        return value + "zq"
    if isinstance(value, list):
        return value + value[:1] if value else ["zq"]
    if isinstance(value, dict) and value:
        key = next(iter(value))
        return {**value, key: _other_value(value[key])}
    return None


def _other_type(value):
    """``value`` as another JSON type: numbers and booleans as strings, strings as a number."""
    if isinstance(value, (bool, int, float)):
        return json.dumps(value)
    if isinstance(value, str):
        return 1
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return None


def _candidates(row, calls, kind):
    """Every way of applying corruption ``kind`` to ``calls`` (AST validity not yet checked)."""
    offered = [f["name"] for f in row["functions"]]
    required = {f["name"]: f["parameters"].get("required", []) for f in row["functions"]}
    for i, call in enumerate(calls):
        if kind in ("wrong_value", "wrong_type"):
            change = _other_value if kind == "wrong_value" else _other_type
            for param, value in call["arguments"].items():
                new = change(value)
                if new is not None:
                    out = copy.deepcopy(calls)
                    out[i]["arguments"][param] = new
                    yield out
        elif kind == "missing_required":
            for param in required.get(call["name"], []):
                if param in call["arguments"]:
                    out = copy.deepcopy(calls)
                    del out[i]["arguments"][param]
                    yield out
        elif kind == "wrong_function":
            for name in offered:
                if name != call["name"]:
                    out = copy.deepcopy(calls)
                    out[i]["name"] = name
                    yield out
        elif kind == "dropped_call" and len(calls) > 1:
            yield calls[:i] + calls[i + 1:]
        elif kind == "extra_call":
            yield calls + [copy.deepcopy(call)]


def corrupt(row, calls, kind, rng):
    """One AST-invalid corruption of ``calls`` of the given kind, or None if none applies."""
    options = list(_candidates(row, calls, kind))
    for j in rng.permutation(len(options)):
        if not check(row["functions"], options[j], row["ground_truth"], row["category"]).valid:
            return options[j]
    return None


def corruption(row, calls, rng):
    """``(kind, calls)``: a corruption of a randomly chosen applicable kind.

    ``extra_call`` always applies (every category wants an exact call count),
    so there is always one.
    """
    for k in rng.permutation(len(CORRUPTIONS)):
        out = corrupt(row, calls, CORRUPTIONS[k], rng)
        if out is not None:
            return CORRUPTIONS[k], out
    raise ValueError(f"{row['id']}: no corruption of the gold calls fails the AST check")


# ---------------------------------------------------------------- pairs


def preference_pairs(model, tokenizer, fmt, rows, cfg, seed, label):
    """``(pairs, sample verdicts)`` from the SFT model's samples on ``rows``' prompts."""
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    samples = sample(model, tokenizer, prompts, cfg.samples_per_prompt, cfg.temperature, cfg.max_tokens,
                     seed, cfg.sample_batch, label=label)
    return build_pairs(rows, samples, fmt, np.random.default_rng(seed), cfg.max_tokens)


def build_pairs(rows, samples, fmt, rng, max_tokens):
    """Preference pairs from ``rows`` and the policy's ``samples`` of each.

    ``samples[i]`` is ``[(text, token_ids)]`` sampled for ``rows[i]``'s prompt
    with at most ``max_tokens`` tokens; a sample cut there is rejected as it
    was sampled, with no end-of-turn it never produced. Returns pairs ``{"id",
    "source", "prompt_len", "chosen", "rejected"}`` (token ids: prompt +
    completion) and the per-row sample verdicts.
    """
    eos = fmt.encode(fmt.eos)
    pairs, verdicts = [], []
    for row, row_samples in zip(rows, samples, strict=True):
        gold = gold_calls(row["ground_truth"])
        chosen, prompt_len = fmt.example(row, gold)
        chosen_text = fmt.completion(row["messages"], row["functions"], gold)
        seen = {chosen_text}
        rejected = []
        for text, ids in row_samples:
            valid = score_output(row, text)["valid"]
            verdicts.append(valid)
            # The stop token is not part of the sampled text; the rendered
            # completion ends with it, so compare with it appended (a cut sample has none).
            key = text + fmt.eos if len(ids) < max_tokens else text
            if valid or key in seen:
                continue
            seen.add(key)
            rejected.append(("on_policy", chosen[:prompt_len] + completion_ids(ids, eos, max_tokens)))
        if not rejected:
            kind, calls = corruption(row, gold, rng)
            text = fmt.completion(row["messages"], row["functions"], calls)
            if text not in seen:
                rejected.append((f"corruption:{kind}", chosen[:prompt_len] + fmt.encode(text)))
        for source, tokens in rejected:
            pairs.append({"id": row["id"], "source": source, "prompt_len": prompt_len,
                          "chosen": chosen, "rejected": tokens})
    return pairs, verdicts


def count_sources(pairs):
    return dict(sorted(Counter(p["source"] for p in pairs).items()))


# ---------------------------------------------------------------- loss


def preference_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, loss_type="sigmoid"):
    """Per-pair loss and implicit rewards ``beta * (log pi - log ref)`` of chosen and rejected."""
    chosen_reward = beta * (policy_chosen - ref_chosen)
    rejected_reward = beta * (policy_rejected - ref_rejected)
    margin = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -nn.log_sigmoid(beta * margin)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}: expected one of {LOSSES}")
    return losses, chosen_reward, rejected_reward


def sequence_logps(token_logps, weights, loss_type):
    """Summed completion log-probs per row; per-token mean for IPO."""
    total = (token_logps * weights).sum(-1)
    return total / weights.sum(-1) if loss_type == "ipo" else total


def dpo_loss(model, tokens, positions, weights, ref, beta, loss_type):
    """Mean preference loss of a batch whose first half are chosen rows, second half rejected."""
    logps = sequence_logps(token_logps(model, tokens, positions), weights, loss_type)
    half = logps.shape[0] // 2
    losses, chosen_r, rejected_r = preference_loss(logps[:half], logps[half:], ref[:half], ref[half:],
                                                   beta, loss_type)
    return losses.mean(), {
        "reward_margin": (chosen_r - rejected_r).mean(),
        "accuracy": (chosen_r > rejected_r).astype(mx.float32).mean(),
        "chosen_reward": chosen_r.mean(),
        "rejected_reward": rejected_r.mean(),
    }


def reference_logps(model, pairs, loss_type):
    """Reference sequence log-probs ``(chosen, rejected)`` per pair, from the model as it is now.

    Data-parallel ranks score a share of the pairs each (``launch.share``).
    """

    def score(block):
        examples = [(p[side], p["prompt_len"]) for p in block for side in ("chosen", "rejected")]
        seq = [t.mean() if loss_type == "ipo" else t.sum() for t in completion_logps(model, examples)]
        return list(zip(seq[0::2], seq[1::2]))

    seq = np.array(launch.share(score, pairs), np.float32).reshape(len(pairs), 2)
    return seq[:, 0], seq[:, 1]


def pair_batches(pairs, ref, batch_size, seed):
    """Endless batches ``(tokens, positions, weights, ref)`` of ``batch_size`` pairs.

    Chosen rows first, then their rejected rows. Under data-parallel ranks,
    this rank's share of each batch's pairs (``launch.shard``).
    """
    if len(pairs) < batch_size:
        raise ValueError(f"only {len(pairs)} preference pairs for dpo.batch_size={batch_size}: "
                         "raise dpo.prompts or lower dpo.batch_size")
    ref_chosen, ref_rejected = ref
    lengths = [len(p["chosen"]) + len(p["rejected"]) for p in pairs]
    for idx in shuffled(length_buckets(lengths, batch_size, launch.size()), seed):
        idx = launch.shard(idx)
        examples = [(pairs[i]["chosen"], pairs[i]["prompt_len"]) for i in idx]
        examples += [(pairs[i]["rejected"], pairs[i]["prompt_len"]) for i in idx]
        tokens, _, positions, weights = collate(examples)
        yield tokens, positions, weights, mx.array(np.concatenate([ref_chosen[idx], ref_rejected[idx]]))


def heldout_scores(model, pairs, ref, beta, loss_type):
    """How the model as it is now ranks held-out ``pairs`` (``ref``: their ``reference_logps``).

    ``heldout_accuracy``: the fraction of pairs whose implicit reward (``beta *
    (log pi - log ref)``) is higher for chosen than for rejected: 0 at the
    reference, where every margin is exactly 0, and above 0.5 once DPO has
    learned a preference that carries over to prompts it did not train on;
    ``heldout_reward_margin``: the mean of chosen minus rejected reward.
    """
    chosen, rejected = reference_logps(model, pairs, loss_type)
    margin = beta * ((chosen - ref[0]) - (rejected - ref[1]))
    return {"heldout_accuracy": float(np.mean(margin > 0)), "heldout_reward_margin": float(np.mean(margin))}


def train(model, pairs, ref, cfg, log, checkpoint=None, heldout=None):
    """``cfg.epochs`` passes of DPO steps over ``pairs`` on the LoRA parameters (``cfg``: a ``DpoConfig``).

    ``ref``: ``reference_logps`` of ``pairs``. ``heldout``: ``(pairs, ref)``
    not trained on, scored (``heldout_scores``) every ``cfg.steps_per_eval``
    steps and after the last.
    """

    def loss(model, tokens, positions, weights, ref_logps):
        return dpo_loss(model, tokens, positions, weights, ref_logps, cfg.beta, cfg.loss_type)

    def evaluate(model):
        return heldout_scores(model, *heldout, cfg.beta, cfg.loss_type)

    optimize(model, cfg.train(len(pairs)), loss, pair_batches(pairs, ref, cfg.batch_size, cfg.seed), log, checkpoint,
             evaluate=evaluate if heldout else None, every=cfg.steps_per_eval)
