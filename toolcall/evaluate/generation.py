"""Batched generation with mlx-lm's continuous-batching ``BatchGenerator``.

Prompts go in longest first, so sequences that share a batch have similar
lengths and the batch drains evenly; each sequence stops at its own
end-of-turn token. Greedy by default, through ``greedy.GreedyBatchGenerator``
(mlx-lm's generator less the full-vocabulary log-softmax greedy does not need;
``reference=True``: mlx-lm's own, the path it is checked against); a
temperature gives sampling (best-of-N, DPO negatives, RL rollouts) through
mlx-lm's own generator. Per-prompt logits processors (``constrained``'s
grammars) are optional; without them the batch is sampled in one call as before.
"""

from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from toolcall.evaluate.greedy import GreedyBatchGenerator
from toolcall.progress import Progress


def generate(model, tokenizer, prompts, *, max_tokens, batch_size, temperature=0.0,
             seed=None, progress=None, return_tokens=False, caches=None, logits_processors=None, reference=False):
    """Complete each token-id prompt; return ``[(text, n_generated_tokens)]`` in input order.

    ``max_tokens`` and ``batch_size`` (sequences decoded side by side) have no
    defaults here: they are params (``eval``, ``dpo``, ``rl``) the caller passes.

    ``progress``: a label; when given, reports items done, tokens/s and ETA.
    ``return_tokens``: return ``(text, n, token_ids)`` instead, the ids exactly as
    sampled (stop token excluded), for training on the samples themselves (RL).
    ``caches``: per prompt, an mlx-lm prompt cache already holding all of it but
    its last token, which alone is then given in ``prompts``: several samples
    of one prompt then share a single prefill.
    ``logits_processors``: per prompt, a list of mlx-lm logits processors
    (``processor(tokens, logits) -> logits``, ``tokens`` the prompt and what was
    sampled so far), e.g. ``constrained.Constraint``.
    ``reference``: greedy decoding through mlx-lm's own ``BatchGenerator`` (the
    log-softmax computed), the path the default one is checked against.
    """
    import mlx.core as mx

    if seed is not None:
        mx.random.seed(seed)
    options = dict(stop_tokens=[[t] for t in tokenizer.eos_token_ids], completion_batch_size=batch_size,
                   prefill_batch_size=min(batch_size, 8))
    if temperature == 0 and not reference:
        gen = GreedyBatchGenerator(model, **options)
    else:
        gen = BatchGenerator(model, sampler=make_sampler(temp=temperature), **options)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    uids = gen.insert([prompts[i] for i in order], [max_tokens] * len(order),
                      caches=[caches[i] for i in order] if caches else None,
                      logits_processors=[logits_processors[i] for i in order] if logits_processors else None)
    index = dict(zip(uids, order))
    tokens = {uid: [] for uid in uids}
    bar = Progress(progress, len(prompts), unit="seq") if progress else None
    n_tokens = 0
    try:
        while responses := gen.next_generated():
            finished = 0
            for r in responses:
                if r.finish_reason != "stop":  # the stop token itself is not text
                    tokens[r.uid].append(r.token)
                    n_tokens += 1
                finished += r.finish_reason is not None
            if bar:
                bar.update(finished, tok_per_s=round(n_tokens / bar.elapsed(), 1))
    finally:
        gen.close()
    out = [None] * len(prompts)
    for uid, toks in tokens.items():
        text = tokenizer.decode(toks)
        out[index[uid]] = (text, len(toks), toks) if return_tokens else (text, len(toks))
    return out
