"""Batched generation with mlx-lm's continuous-batching ``BatchGenerator``.

Prompts go in longest first, so sequences that share a batch have similar
lengths and the batch drains evenly; each sequence stops at its own
end-of-turn token. Greedy by default, through ``greedy.GreedyBatchGenerator``
(mlx-lm's generator less the full-vocabulary log-softmax greedy does not need;
``reference=True``: mlx-lm's own, the path it is checked against); a
temperature gives sampling (best-of-N, DPO negatives, RL rollouts) through
mlx-lm's own generator. Per-prompt logits processors (``constrained``'s
grammars) are optional; without them the batch is sampled in one call as before.
On the greedy fast path prompts that begin alike (the same offered functions)
share one prefill of their common tokens (``prefix``), their groups fed to the
generator as its queue runs low.
"""

from mlx_lm.generate import BatchGenerator
from mlx_lm.sample_utils import make_sampler

from toolcall.evaluate import prefix
from toolcall.evaluate.greedy import GreedyBatchGenerator
from toolcall.progress import Progress


def generate(model, tokenizer, prompts, *, max_tokens, batch_size, temperature=0.0,
             seed=None, progress=None, return_tokens=False, caches=None, logits_processors=None, reference=False,
             share_prefixes=True):
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
    ``share_prefixes``: on the greedy fast path, prefill the tokens prompts share
    once (``prefix``); False: each prompt whole (what the bench compares it to).
    """
    import mlx.core as mx

    if seed is not None:
        mx.random.seed(seed)
    options = dict(stop_tokens=[[t] for t in tokenizer.eos_token_ids], completion_batch_size=batch_size,
                   prefill_batch_size=min(batch_size, 8))
    fast = temperature == 0 and not reference
    if fast:
        gen = GreedyBatchGenerator(model, **options)
    else:
        gen = BatchGenerator(model, sampler=make_sampler(temp=temperature), **options)
    if fast and share_prefixes and not caches:  # the fast path: shared prefixes prefilled once
        plan = prefix.groups(prompts)
    else:
        plan = [(0, sorted(range(len(prompts)), key=lambda i: -len(prompts[i])))]
    index, tokens = {}, {}

    def insert(shared, members):
        if caches:
            member_caches = [caches[i] for i in members]
        else:  # one cache for the group: mlx-lm copies it into the batch's
            member_caches = [prefix.prefill(model, prompts[members[0]][:shared], gen.prefill_step_size)] * len(
                members) if shared else None
        uids = gen.insert([prompts[i][shared:] for i in members], [max_tokens] * len(members), caches=member_caches,
                          all_tokens=[prompts[i][:shared] for i in members],
                          logits_processors=[logits_processors[i] for i in members] if logits_processors else None)
        index.update(zip(uids, members))
        tokens.update((uid, []) for uid in uids)

    def top_up():  # a group's prefix cache lives until its members join a batch: groups go in as the queue runs low
        while plan and len(tokens) - done < batch_size + options["prefill_batch_size"]:
            insert(*plan.pop(0))

    bar = Progress(progress, len(prompts), unit="seq") if progress else None
    n_tokens = done = 0
    try:
        top_up()
        while responses := gen.next_generated():
            finished = 0
            for r in responses:
                if r.finish_reason != "stop":  # the stop token itself is not text
                    tokens[r.uid].append(r.token)
                    n_tokens += 1
                finished += r.finish_reason is not None
            done += finished
            top_up()
            if bar:
                bar.update(finished, tok_per_s=round(n_tokens / bar.elapsed(), 1))
    finally:
        gen.close()
    out = [None] * len(prompts)
    for uid, toks in tokens.items():
        text = tokenizer.decode(toks)
        out[index[uid]] = (text, len(toks), toks) if return_tokens else (text, len(toks))
    return out
