"""Losses and log-probs over completion tokens, in the batch layout of ``batches.collate``.

The vocabulary projection (49k x 576 for SmolLM2) is the most expensive
matmul of a step; applying it only at completion positions, not over the
whole prompt, gives the same values as mlx-lm's ``default_loss`` for less work.
The cross-entropy is ``kernels.cross_entropy`` (mlx's, or the native kernel).
"""

import mlx.core as mx
from mlx_lm.tuner.trainer import default_loss

from toolcall.model.kernels import cross_entropy
from toolcall.train import launch

# Model families whose forward is body (`model.model`) + vocabulary projection,
# so the projection can be applied to a subset of positions.
_SPLIT_HEAD_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def supports_split_head(model):
    return getattr(model, "model_type", None) in _SPLIT_HEAD_TYPES


def lm_head(model, hidden):
    """The vocabulary projection of hidden states (tied to the embeddings where the model ties them)."""
    if getattr(model.args, "tie_word_embeddings", False) or not hasattr(model, "lm_head"):
        return model.model.embed_tokens.as_linear(hidden)
    return model.lm_head(hidden)


def completion_loss(model, batch, lengths, positions, weights):
    """Mean cross-entropy over completion tokens; ``(loss, ntoks)`` like mlx-lm's.

    Under data-parallel ranks the mean is over every rank's tokens
    (``launch.token_mean``), so the averaged gradient is one process's.

    ``positions[b, j]`` is the index (into ``batch[:, :-1]``) of the j-th
    predicted completion token of row b, ``weights`` 1 there (or the token's
    own weight: then the mean is weighted) and 0 on padding.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    hidden = model.model(inputs)
    picked = mx.take_along_axis(hidden, positions[..., None], axis=1)
    logits = lm_head(model, picked)
    ce = cross_entropy(logits, mx.take_along_axis(targets, positions, axis=1)) * weights
    ntoks = weights.sum()
    return launch.token_mean(ce.astype(mx.float32).sum(), ntoks), ntoks


def full_loss(model, batch, lengths, positions, weights):
    """mlx-lm's ``default_loss`` with our batch layout (for models we cannot split); every token weighs 1."""
    loss, ntoks = default_loss(model, batch, lengths)
    if launch.size() == 1:
        return loss, ntoks
    return launch.token_mean(loss * ntoks, ntoks), ntoks  # its per-rank mean, made a mean over all ranks


def sft_loss(model):
    """The SFT loss for ``model``: ``completion_loss`` where the head can be split."""
    return completion_loss if supports_split_head(model) else full_loss


def token_logps(model, tokens, positions, temperature=1.0):
    """``log p(token)`` at each completion position, shape ``positions.shape``.

    ``positions[b, j]`` indexes ``tokens[:, :-1]`` and predicts
    ``tokens[b, positions[b, j] + 1]``; as in ``completion_loss``, the
    vocabulary projection runs only there. ``temperature``: the log-probs of
    ``softmax(logits / temperature)``, the distribution a sampler at that
    temperature draws from (mlx-lm's ``categorical_sampling``).
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if supports_split_head(model):
        hidden = mx.take_along_axis(model.model(inputs), positions[..., None], axis=1)
        logits = lm_head(model, hidden)
    else:
        logits = mx.take_along_axis(model(inputs), positions[..., None], axis=1)
    picked = mx.take_along_axis(targets, positions, axis=1)
    return -cross_entropy(logits.astype(mx.float32) / temperature, picked)
