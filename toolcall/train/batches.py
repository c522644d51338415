"""Training batches: length-bucketed, seeded, padded into the layout the losses read.

One bucketer for every trainer (SFT, DPO pairs, RL samples): rows sorted by
length and cut into batches, so rows of a batch pad little; the batch order
comes from a private seeded RNG, so training is reproducible without touching
numpy's global state. Every row is in one batch: a pass over the buckets (an
epoch) trains on each row exactly once.
"""

import math

import mlx.core as mx
import numpy as np


def length_buckets(lengths, batch_size, ranks=1):
    """Row indices sorted by length, cut into batches of ``batch_size``.

    The remainder is a last, smaller batch of the longest rows, not dropped:
    dropping it (as mlx-lm's ``iterate_batches`` does) meant the longest rows
    were never trained on. It is the longest rows' batch because a smaller batch
    is where long rows cost least memory. A remainder smaller than ``ranks``
    (data-parallel ranks each take every ``ranks``-th row of a batch) joins the
    batch before it, so that no rank is left with an empty share.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    buckets = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(buckets) > 1 and len(buckets[-1]) < ranks:
        buckets[-2:] = [buckets[-2] + buckets[-1]]
    return buckets


def shuffled(buckets, seed, loop=True):
    """The buckets in a seeded random order, reshuffled each pass; endless when ``loop``."""
    rng = np.random.default_rng(seed)
    while True:
        for b in rng.permutation(len(buckets)):
            yield buckets[b]
        if not loop:
            return


def iterate_batches(dataset, batch_size, max_seq_length, loop=False, seed=None, comm_group=None, skip=0):
    """Batches of ``(tokens, lengths, positions, weights)`` for mlx-lm's ``trainer.train``.

    ``dataset`` holds ``(token_ids, prompt_length)`` pairs, or triples with
    token weights (``collate``) (rows longer than
    ``max_seq_length`` are refused before training, so none is cut here).
    Signature and rank striding follow ``mlx_lm.tuner.trainer.iterate_batches``:
    under ``mlx.launch`` each rank takes every world-size-th row of a batch.
    ``skip``: batches a resumed run already trained on, passed over uncollated.
    """
    if len(dataset) < batch_size:
        raise ValueError(f"need at least batch_size={batch_size} examples, have {len(dataset)}")
    offset, step = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
    if batch_size % step:
        raise ValueError("the batch size must be divisible by the number of workers")
    buckets = [b[offset::step] for b in length_buckets([len(ex[0]) for ex in dataset], batch_size, step)]
    for n, bucket in enumerate(shuffled(buckets, seed, loop)):
        if n >= skip:
            yield collate([dataset[i] for i in bucket])


def _round_up(n, multiple):
    return multiple * math.ceil(n / multiple)


def collate(examples, pad_to=32):
    """Pad a list of ``(tokens, prompt_len)`` into ``(tokens, lengths, positions, weights)``.

    An example may carry a third item, its completion tokens' loss weights
    (``PromptFormat.example``'s ``decision_weight``); else each weighs 1.
    Lengths are rounded up to multiples of ``pad_to`` so the compiled step sees
    few distinct shapes.
    """
    width = 1 + _round_up(max(len(ex[0]) for ex in examples), pad_to)
    n_comp = _round_up(max(len(ex[0]) - ex[1] for ex in examples), 8)
    tokens = np.zeros((len(examples), width), np.int32)
    positions = np.zeros((len(examples), n_comp), np.int32)
    weights = np.zeros((len(examples), n_comp), np.float32)
    lengths = []
    for row, (toks, prompt_len, *token_weights) in enumerate(examples):
        tokens[row, : len(toks)] = toks
        # Predicting token t uses the input at t-1; completion tokens are
        # toks[prompt_len:], i.e. input positions prompt_len-1 .. len-2.
        idx = np.arange(max(prompt_len, 1) - 1, len(toks) - 1)
        positions[row, : len(idx)] = idx
        positions[row, len(idx) :] = idx[-1] if len(idx) else 0
        weights[row, : len(idx)] = token_weights[0] if token_weights else 1.0
        lengths.append((max(prompt_len, 1), len(toks) - 1))
    return mx.array(tokens), mx.array(lengths), mx.array(positions), mx.array(weights)


def pad(rows, width):
    """Right-pad variable-length float rows with zeros to ``[len(rows), width]``."""
    out = np.zeros((len(rows), width), np.float32)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return mx.array(out)
