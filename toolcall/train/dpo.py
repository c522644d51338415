"""DPO on top of the SFT adapter: the loss, the reference log-probs, the batches and the update loop.

The preference pairs come from ``toolcall.train.pairs``: chosen is one of the
SFT model's own passing samples (``dpo.chosen: own``; the gold rendering where
no sample passes, or always with ``gold``), rejected one of its failing
samples or, where every sample passes, a corruption of the chosen calls.

The loss (Rafailov et al. 2023) compares summed completion log-probs of the
policy and of the frozen SFT reference. At step 0 policy == reference, so the
reference log-probs are computed once before any update and no second model
is kept. ``loss_type: ipo`` (Azar et al. 2023) regresses the margin to
``1 / (2 beta)``; like TRL and mlx-lm-lora it uses per-token mean log-probs,
the scale on which that target is meant. ``rpo_alpha`` adds that times the
chosen completions' negative log-likelihood (RPO: Pang et al. 2024, TRL's
``rpo_alpha``): DPO alone only widens the margin, and may do it by lowering
the chosen completion's likelihood too; the NLL term holds the chosen one up.

The update loop is ``trainer.optimize``: ``dpo.warmup`` steps of linear
warmup, then cosine decay, gradients clipped to ``dpo.max_grad_norm``.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from toolcall.config import LOSSES
from toolcall.train import launch
from toolcall.train.batches import collate, length_buckets, shuffled
from toolcall.train.loss import token_logps
from toolcall.train.rollouts import completion_logps
from toolcall.train.trainer import optimize


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


def chosen_nll(token_logps, weights):
    """Per-token mean negative log-likelihood of each row's completion (RPO's term, per pair)."""
    return -(token_logps * weights).sum(-1) / weights.sum(-1)


def dpo_loss(model, tokens, positions, weights, ref, beta, loss_type, rpo_alpha):
    """Mean preference loss of a batch whose first half are chosen rows, second half rejected.

    Plus ``rpo_alpha`` times the chosen rows' NLL, each row's a per-token
    mean and then averaged over the pairs (Pang et al. 2024 normalize each
    example's NLL by its length; a mean per pair also keeps each rank's share
    of a batch weighted by its pairs, as the preference loss is).
    """
    per_token = token_logps(model, tokens, positions)
    logps = sequence_logps(per_token, weights, loss_type)
    half = logps.shape[0] // 2
    losses, chosen_r, rejected_r = preference_loss(logps[:half], logps[half:], ref[:half], ref[half:],
                                                   beta, loss_type)
    # One mean node, used twice: mx.compile fails (IndexError) on two equal ones of which one is an output.
    preference, nll = losses.mean(), chosen_nll(per_token[:half], weights[:half]).mean()
    return preference + rpo_alpha * nll, {
        "preference_loss": preference,
        "chosen_nll": nll,
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


def train(model, pairs, ref, cfg, log, checkpoint=None, heldout=None, selection=None):
    """``cfg.epochs`` passes of DPO steps over ``pairs`` on the LoRA parameters (``cfg``: a ``DpoConfig``).

    ``ref``: ``reference_logps`` of ``pairs``. ``heldout``: ``(pairs, ref)``
    not trained on, scored (``heldout_scores``) every ``cfg.steps_per_eval``
    steps and after the last. ``selection`` (``selection.Selection``): the
    greedy validation accuracy at step 0 (the SFT model) and at those steps;
    the model ends with the weights of the best.
    """

    def loss(model, tokens, positions, weights, ref_logps):
        return dpo_loss(model, tokens, positions, weights, ref_logps, cfg.beta, cfg.loss_type, cfg.rpo_alpha)

    def evaluate(model):
        return heldout_scores(model, *heldout, cfg.beta, cfg.loss_type)

    optimize(model, cfg.train(len(pairs)), loss, pair_batches(pairs, ref, cfg.batch_size, cfg.seed), log, checkpoint,
             evaluate=evaluate if heldout else None, every=cfg.steps_per_eval, selection=selection)
