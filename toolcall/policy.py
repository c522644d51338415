"""What the post-SFT stages (DPO, RL) share: the SFT policy, on-policy samples,
completion log-probs and a small update loop.

The loop is ours rather than ``mlx_lm.tuner.trainer.train`` because DPO and
GRPO must report per-step metrics beside the loss (reward margin, preference
accuracy, KL), and mlx-lm's compiled step passes on only ``(loss, ntoks)``.
It is the same compiled Adam step with ``training.make_optimizer``'s schedule.
"""

import random
import time
from collections import defaultdict
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import training
from .generation import generate

# Completions of one prompt scored per forward (no gradient).
SCORE_BATCH = 8
# Same generation batch as the eval stage.
GENERATE_BATCH = 32
# Prompts prefilled at a time when sampling (~24 MB of KV cache each for SmolLM2-135M).
SAMPLE_CHUNK = 32


def load_policy(model_dir, adapter_dir):
    """The SFT model with only its LoRA matrices trainable.

    ``mlx_lm.load(..., adapter_path=)`` leaves every parameter trainable
    (embeddings, norms, base weights); training them would change far more
    than the adapter and ``save_adapters`` would write the whole model.
    """
    model, tokenizer = training.load_model(model_dir, adapter_dir)
    model.freeze()
    model.unfreeze(keys=["lora_a", "lora_b"], strict=False)
    if training.count_trainable(model) == 0:
        raise ValueError(f"{adapter_dir} holds no LoRA adapter (lora_a/lora_b)")
    return model, tokenizer


def lora_config(adapter_dir, section, **fields):
    """A ``LoraConfig`` with the SFT adapter's LoRA shape and this stage's training fields.

    The LoRA shape is read from the adapter rather than repeated in params.yaml,
    so it cannot disagree with the weights being continued. Bad training
    fields are reported as keys of ``section``.
    """
    info = training.adapter_info(adapter_dir)
    lora = info["lora_parameters"]
    shape = {"lora_rank": lora["rank"], "lora_scale": float(lora["scale"]),
             "lora_dropout": float(lora["dropout"]), "lora_layers": info["num_layers"]}
    return training.from_params(training.LoraConfig, {**shape, **fields}, section)


def choose_rows(rows, n, seed):
    """``n`` rows in a seeded random order (all of them when ``n >= len(rows)``)."""
    return random.Random(seed).sample(rows, min(n, len(rows)))


def sample(model, tokenizer, prompts, k, temperature, max_tokens, seed, progress="sample"):
    """``k`` sampled completions per token-id prompt: ``[[(text, token_ids)] * k]``.

    Each prompt is prefilled once and its KV cache shared by its ``k`` samples:
    with ~400-token prompts the prefill is most of the generation time on a CPU.
    Prompts go in chunks so that only a chunk's caches are held at once.
    """
    model.eval()  # LoRA dropout off: samples come from the policy as it is
    mx.random.seed(seed)
    out = []
    for start in range(0, len(prompts), SAMPLE_CHUNK):
        chunk = prompts[start:start + SAMPLE_CHUNK]
        caches = []
        for prompt in chunk:
            cache = _prefill(model, prompt[:-1])
            caches += [[_repeat(c, 1) for c in cache] for _ in range(k)]
        flat = generate(model, tokenizer, [p[-1:] for p in chunk for _ in range(k)], max_tokens=max_tokens,
                        temperature=temperature, batch_size=GENERATE_BATCH, return_tokens=True, caches=caches,
                        progress=progress and f"{progress} {start + len(chunk)}/{len(prompts)} prompts")
        out += [[(text, ids) for text, _, ids in flat[i * k:(i + 1) * k]] for i in range(len(chunk))]
    return out


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


def token_logps(model, tokens, positions):
    """``log p(token)`` at each completion position, shape ``positions.shape``.

    Layout of ``training.collate``: ``positions[b, j]`` indexes ``tokens[:, :-1]``
    and predicts ``tokens[b, positions[b, j] + 1]``. As in
    ``training.completion_loss``, the vocabulary projection runs only there.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    if training.supports_split_head(model):
        hidden = mx.take_along_axis(model.model(inputs), positions[..., None], axis=1)
        logits = training._lm_head(model, hidden)
    else:
        logits = mx.take_along_axis(model(inputs), positions[..., None], axis=1)
    picked = mx.take_along_axis(targets, positions, axis=1)
    return -nn.losses.cross_entropy(logits.astype(mx.float32), picked)


def completion_logps(model, examples):
    """Per-token completion log-probs of each ``(tokens, prompt_len)`` example, no gradient.

    Returns one float32 numpy array per example (its completion length).
    Examples with the same prompt (a pair's chosen and rejected, a GRPO group)
    run the prompt once: its KV cache is repeated for their completions, which
    makes scoring ~3x cheaper at ~400 prompt and ~60 completion tokens.
    """
    model.eval()
    groups = defaultdict(list)
    for i, (tokens, prompt_len) in enumerate(examples):
        groups[tuple(tokens[:prompt_len])].append(i)
    out = [None] * len(examples)
    for prompt, members in groups.items():
        for start in range(0, len(members), SCORE_BATCH):
            idx = members[start:start + SCORE_BATCH]
            for i, logps in zip(idx, _shared_prompt_logps(model, list(prompt), [examples[i][0][len(prompt):]
                                                                                for i in idx])):
                out[i] = logps
    return out


def _shared_prompt_logps(model, prompt, completions):
    """Log-probs of each completion's tokens after one shared prompt."""
    cache = [_repeat(c, len(completions)) for c in _prefill(model, prompt[:-1])]
    # Input: the last prompt token, then each completion (right-padded: causal, so padding
    # after a row's end does not change its earlier positions).
    targets = np.zeros((len(completions), max(len(c) for c in completions)), np.int32)
    for row, comp in enumerate(completions):
        targets[row, : len(comp)] = comp
    inputs = np.concatenate([np.full((len(completions), 1), prompt[-1], np.int32), targets[:, :-1]], axis=1)
    logits = model(mx.array(inputs), cache=cache).astype(mx.float32)
    logps = np.array(-nn.losses.cross_entropy(logits, mx.array(targets)))
    return [logps[row, : len(comp)] for row, comp in enumerate(completions)]


def index_batches(lengths, batch_size, seed):
    """Endless lists of ``batch_size`` indices, length-bucketed, in a seeded random order.

    Bucketing as ``training.iterate_batches`` (sorted by length, cut into
    batches, the remainder dropped) so rows of a batch pad little.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    batches = [order[i:i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]
    rng = np.random.default_rng(seed)
    while True:
        for b in rng.permutation(len(batches)):
            yield batches[b]


def pad(rows, width):
    """Right-pad variable-length float rows with zeros to ``[len(rows), width]``."""
    out = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return mx.array(out)


def snapshot(model):
    """The trainable (LoRA) weights as they are now; arrays are immutable, so this is a copy."""
    return tree_flatten(model.trainable_parameters())


def restore(model, weights):
    model.update(tree_unflatten(weights))


class StepLog:
    """``on_step`` for ``optimize``: prints each step, keeps the history, logs it to dvclive."""

    def __init__(self, live, prefix, total):
        self.live, self.prefix, self.total = live, prefix, total
        self.history = []
        self.start = time.perf_counter()

    def __call__(self, it, loss, metrics):
        self.history.append({"step": it, "loss": loss, **metrics})
        elapsed = time.perf_counter() - self.start
        shown = "  ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        print(f"[{self.prefix}] step {it}/{self.total}  loss {loss:.4f}  {shown}  elapsed {elapsed:.0f}s  "
              f"ETA {elapsed / it * (self.total - it):.0f}s", flush=True)
        if self.live is not None:
            for key, value in {"loss": loss, **metrics}.items():
                self.live.log_metric(f"{self.prefix}/{key}", value)
            self.live.next_step()

    def last(self, n=10):
        """Mean of each logged value over the last ``n`` steps (one step is noisy)."""
        tail = self.history[-n:]
        return {k: round(float(np.mean([h[k] for h in tail])), 4) for k in tail[0] if k != "step"} if tail else {}


def optimize(model, cfg, loss_fn, batches, on_step):
    """``cfg.iters`` Adam steps on ``loss_fn(model, *batch) -> (loss, {name: scalar})``.

    ``cfg`` is a ``LoraConfig`` (seed, learning_rate, warmup, iters);
    ``on_step(iteration, loss, metrics)`` gets plain floats after each step.
    """
    mx.random.seed(cfg.seed)
    optimizer = training.make_optimizer(cfg)
    value_and_grad = nn.value_and_grad(model, loss_fn)
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(*batch):
        (loss, metrics), grad = value_and_grad(model, *batch)
        optimizer.update(model, grad)
        return loss, metrics

    model.train()
    for it, batch in zip(range(1, cfg.iters + 1), batches):
        loss, metrics = step(*batch)
        mx.eval(state, loss, metrics)
        on_step(it, loss.item(), {k: v.item() for k, v in metrics.items()})
    model.eval()
