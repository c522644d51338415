"""On-policy rollouts for DPO and RL: samples of the current policy, and log-probs of completions.

Both share one trick: a prompt is prefilled once into a KV cache and that
cache is repeated for every completion of it (a prompt's ``k`` samples; a
pair's chosen and rejected rows; a GRPO group). Prompts are several times
longer than completions here, so the prefill is most of the work.
"""

import random
from collections import defaultdict

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.cache import KVCache, make_prompt_cache

from toolcall.evaluate.generation import generate
from toolcall.model import kernels
from toolcall.train import launch

# Completions of one prompt scored per forward (no gradient); bounds memory.
SCORE_BATCH = 8
# Prompts whose KV caches are held at once while sampling; bounds memory.
SAMPLE_CHUNK = 32


def choose_rows(rows, n, seed):
    """``n`` rows in a seeded random order (all of them when ``n >= len(rows)``)."""
    return random.Random(seed).sample(rows, min(n, len(rows)))


def sample(model, tokenizer, prompts, k, temperature, max_tokens, seed, batch_size, label="sample"):
    """``k`` sampled completions per token-id prompt: ``[[(text, token_ids)] * k]``.

    ``batch_size``: sequences generated side by side. ``label``: progress
    label (None: quiet). Each chunk of ``SAMPLE_CHUNK`` prompts seeds itself
    from ``(seed, chunk)``, so data-parallel ranks share the chunks
    (``launch.share``) and the samples do not depend on the rank count.
    """
    model.eval()  # LoRA dropout off: samples come from the policy as it is
    chunks = [(start, prompts[start:start + SAMPLE_CHUNK]) for start in range(0, len(prompts), SAMPLE_CHUNK)]

    def run(block):
        return [_sample_chunk(model, tokenizer, start, chunk, k, temperature, max_tokens, seed, batch_size,
                              label and f"{label} {start + len(chunk)}/{len(prompts)} prompts")
                for start, chunk in block]

    return [group for groups in launch.share(run, chunks) for group in groups]


def _sample_chunk(model, tokenizer, start, chunk, k, temperature, max_tokens, seed, batch_size, progress):
    mx.random.seed(int(np.random.SeedSequence([seed, start]).generate_state(1)[0]))
    caches = []
    for prompt in chunk:
        cache = _prefill(model, prompt[:-1])
        caches += [[_repeat(c, 1) for c in cache] for _ in range(k)]
    flat = generate(model, tokenizer, [p[-1:] for p in chunk for _ in range(k)], max_tokens=max_tokens,
                    temperature=temperature, batch_size=batch_size, return_tokens=True, caches=caches,
                    progress=progress)
    return [[(text, ids) for text, _, ids in flat[i * k:(i + 1) * k]] for i in range(len(chunk))]


def completion_ids(ids, eos, max_tokens, always_eos=False):
    """Sampled ids plus end-of-turn, as the policy produced them.

    A sample cut at ``max_tokens`` never sampled an end-of-turn, so it gets one
    only with ``always_eos`` (RFT's SFT targets should end their turn); DPO's
    rejected rows and GRPO's samples are scored as sampled.
    """
    return list(ids) + list(eos) if always_eos or len(ids) < max_tokens else list(ids)


def _prefill(model, tokens):
    """A fresh KV cache holding ``tokens``."""
    cache = make_prompt_cache(model)
    if not all(isinstance(c, KVCache) for c in cache):
        raise TypeError(f"shared prompts need a plain KV cache; {type(model).__name__} has another")
    if tokens:
        model(mx.array(tokens)[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache


def _repeat(cache, n):
    """A new KV cache holding ``cache``'s content ``n`` times along the batch axis (a view if once)."""
    out = KVCache()
    if cache.keys is not None:
        keys, values = cache.keys[..., : cache.offset, :], cache.values[..., : cache.offset, :]
        if n > 1:
            keys, values = mx.repeat(keys, n, axis=0), mx.repeat(values, n, axis=0)
        out.state = (keys, values, cache.offset)
    return out


def completion_logps(model, examples, temperature=1.0):
    """Per-token completion log-probs of each ``(tokens, prompt_len)`` example, no gradient.

    Returns one float32 numpy array per example (its completion length);
    equal to ``loss.token_logps`` on the same rows (at the same
    ``temperature``), with each distinct prompt run once.
    """
    model.eval()
    with kernels.kv_cache_dtype(mx.float32):  # the training step's forward has no cache: its values, not rounded
        return _completion_logps(model, examples, temperature)


def _completion_logps(model, examples, temperature):
    groups = defaultdict(list)
    for i, (tokens, prompt_len) in enumerate(examples):
        groups[tuple(tokens[:prompt_len])].append(i)
    out = [None] * len(examples)
    for prompt, members in groups.items():
        for start in range(0, len(members), SCORE_BATCH):
            idx = members[start:start + SCORE_BATCH]
            completions = [examples[i][0][len(prompt):] for i in idx]
            for i, logps in zip(idx, _shared_prompt_logps(model, list(prompt), completions, temperature)):
                out[i] = logps
    return out


def _shared_prompt_logps(model, prompt, completions, temperature):
    """Log-probs of each completion's tokens after one shared prompt."""
    cache = [_repeat(c, len(completions)) for c in _prefill(model, prompt[:-1])]
    # Input: the last prompt token, then each completion (right-padded: causal, so padding
    # after a row's end does not change its earlier positions).
    targets = np.zeros((len(completions), max(len(c) for c in completions)), np.int32)
    for row, comp in enumerate(completions):
        targets[row, : len(comp)] = comp
    inputs = np.concatenate([np.full((len(completions), 1), prompt[-1], np.int32), targets[:, :-1]], axis=1)
    logits = model(mx.array(inputs), cache=cache).astype(mx.float32) / temperature
    logps = np.array(-nn.losses.cross_entropy(logits, mx.array(targets)))
    return [logps[row, : len(comp)] for row, comp in enumerate(completions)]
