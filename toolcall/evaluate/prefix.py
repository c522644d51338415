"""Prompts that begin alike share one prefill of what they share (the eval's fast path).

A BFCL prompt is the system turn with the offered functions' schemas, then
the question. Items offered the same functions begin with the same tokens: on
the live test set 71% of the prompt tokens are a prefix shared with another
item's (463 function sets over 1,215 items), on the non-live test 17%.
Prefill is most of an eval's time there (its prompts average ~900 tokens).

``groups`` puts the prompts in groups whose members share at least
``MIN_SHARED`` leading tokens; ``prefill`` runs a group's shared tokens
through the model once, into an mlx-lm KV cache, and each member then enters
the batch generator with that cache (mlx-lm merges it into the batch's: a
copy, so one cache serves every member) and only its own remaining tokens.
A member's greedy output depends on its own tokens only, as without the
sharing; the arithmetic differs in order (the shared part is computed
once, in a batch of one), so the fast path is checked against the reference
(``tests/test_fastpath.py``, ``make bench``).
"""

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

# Below this many shared tokens a group's extra prefill call (a batch of one) costs about what it saves.
MIN_SHARED = 32


def _common(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def groups(prompts, min_shared=MIN_SHARED):
    """``[(shared, [index, ...])]``: every prompt in one group, its members' first ``shared`` tokens alike.

    Sorted by their tokens, prompts lie next to those they share most with;
    the groups cut that order into runs so that the prefill saved, each
    group's (members - 1) x shared tokens, is the most it can be (a dynamic
    programme over the cuts; a group of several shares at least
    ``min_shared``, a group of one 0). ``shared`` leaves each member at least
    one token of its own: the generator starts decoding from a prompt's last
    token. Groups come by what their longest member leaves to prefill
    (its tokens past ``shared``), most first; members longest first. mlx-lm
    prefills the queue ``prefill_batch_size`` prompts at a time, right-padded
    to the batch's longest: ordered by total length instead, whole prompts
    shared batches with short remainders (``greedy.like_lengths``).
    """
    order = sorted(range(len(prompts)), key=lambda i: prompts[i])
    seq = [prompts[i] for i in order]
    adjacent = [_common(a, b) for a, b in zip(seq, seq[1:])]
    best, cut = [0] * (len(seq) + 1), [(0, 0)] * (len(seq) + 1)  # cut[j]: (start, shared) of the group ending at j
    for j in range(1, len(seq) + 1):
        best[j], cut[j] = best[j - 1], (j - 1, 0)
        shared = len(seq[j - 1]) - 1
        for i in range(j - 2, -1, -1):  # the group seq[i:j]
            shared = min(shared, adjacent[i], len(seq[i]) - 1)
            if shared < min_shared:
                break
            if best[i] + (j - 1 - i) * shared > best[j]:
                best[j], cut[j] = best[i] + (j - 1 - i) * shared, (i, shared)
    out, j = [], len(seq)
    while j:
        i, shared = cut[j]
        out.append((shared, sorted(order[i:j], key=lambda k: -len(prompts[k]))))
        j = i
    return sorted(out, key=lambda g: -(len(prompts[g[1][0]]) - g[0]))


def prefill(model, tokens, step):
    """An mlx-lm prompt cache holding ``tokens``, run through ``model`` ``step`` tokens at a time."""
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens), step):
        model(mx.array(tokens[start: start + step])[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache
