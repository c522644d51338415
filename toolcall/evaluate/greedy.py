"""mlx-lm's continuous-batching ``BatchGenerator`` for greedy decoding, less the log-softmax.

mlx-lm's decode step (``GenerationBatch._step``) turns every row's logits into
log-probabilities, a logsumexp over the whole vocabulary (49152 entries for
SmolLM2) per sequence and step, then hands them to the sampler and to each
response. Greedy decoding reads neither: the argmax of the logits is the
argmax of the log-probabilities (they differ by one number per row), and
``generation.generate`` drops the responses' ``logprobs``. About a tenth of a
decode step at batch 32 was that logsumexp.

``GreedyBatchGenerator`` is ``BatchGenerator`` with its prompt and generation
batches swapped for subclasses whose decode step takes the argmax of the
(processed) logits and reports no log-probabilities (``logprobs`` None), and
whose KV caches let finished sequences go without copying the others
(``kvcache``); its prefill batches take only queued prompts of like length
(``like_lengths``). Everything else is mlx-lm's: prefill, stop tokens, per-prompt
logits processors (``constrained``'s grammars mask logits, which is what the
argmax then reads). Sampling at a temperature keeps mlx-lm's own generator
(``generation.generate``), and so does ``generate(..., reference=True)``, the
path this one is checked against (``tests/test_fastpath.py``, ``make bench``).

``_step`` and ``generate`` follow mlx-lm 0.32.2's (pinned in requirements.txt)
line for line but for the log-softmax and the cache class.
"""

import itertools

import mlx.core as mx
from mlx_lm.generate import BatchGenerator, GenerationBatch, PromptProcessingBatch
from mlx_lm.models.cache import BatchKVCache

from toolcall.evaluate.kvcache import InPlaceKVCache, fill_holes


class GreedyGenerationBatch(GenerationBatch):
    def _step(self):
        self._current_tokens = self._next_tokens
        self._current_logprobs = self._next_logprobs
        inputs = self._current_tokens
        logits = self.model(inputs[:, None], cache=self.prompt_cache)[:, -1, :]

        token_context = []
        if any(self.logits_processors):
            processed = []
            for e in range(len(self.uids)):
                row = logits[e: e + 1]
                if processors := self.logits_processors[e]:  # only sequences with processors need a context
                    context = self._token_context[e].update_and_fetch(inputs[e: e + 1])
                    token_context.append(context)
                    for processor in processors:
                        row = processor(context, row)
                processed.append(row)
            logits = mx.concatenate(processed, axis=0)

        # The next tokens start computing while the caller reads this step's.
        self._next_tokens = mx.argmax(logits, axis=-1)
        self._next_logprobs = [None] * len(self.uids)
        mx.async_eval(self._next_tokens, token_context)
        mx.eval(inputs)
        inputs = inputs.tolist()
        for seen, token in zip(self.tokens, inputs):  # self.tokens: what the KV cache holds
            seen.append(token)
        return inputs, self._current_logprobs

    _responding = False  # inside next()

    def next(self):
        """mlx-lm's, but the responses of finished rows carry no prompt cache (``prompt_cache`` None).

        mlx-lm's would be a lazy slice of each layer's cache, never computed here
        (``generation.generate`` reads no cache) but alive as long as the
        response: the next step's cache update then cannot write in place and
        copies every layer's cache, and building it waits for the step in flight.
        """
        self._responding = True
        try:
            return super().next()
        finally:
            self._responding = False

    def extract_cache(self, idx):
        return None if self._responding else super().extract_cache(idx)

    def filter(self, keep):
        """Drop the finished rows; the last rows move into their slots (``kvcache``: no copy of the rest)."""
        super().filter(fill_holes(len(self.uids), keep))


class GreedyPromptBatch(PromptProcessingBatch):
    def generate(self, tokens):
        """Start decoding: the prompts' last tokens go in with ``GreedyGenerationBatch``'s step."""
        if any(len(t) > 1 for t in tokens):
            self.prompt([t[:-1] for t in tokens])
        for cache in self.prompt_cache:
            if type(cache) is BatchKVCache:  # same state, filtered in place
                cache.__class__ = InPlaceKVCache
        generation = GreedyGenerationBatch(
            self.model, self.uids, mx.array([t[-1] for t in tokens]), self.prompt_cache, self.tokens,
            self.samplers, self.fallback_sampler, self.logits_processors, self.stop_sequences, self.max_tokens)
        self.uids, self.prompt_cache, self.tokens = [], [], []
        self.samplers, self.logits_processors, self.max_tokens = [], [], []
        return generation


# Queued prompts prefill together only while their lengths differ by at most this many tokens or this
# share of the longest: mlx-lm right-pads a prefill batch to its longest prompt, and a padded position
# costs what a real one does, while a batch of one more call rereads the weights (~30 tokens' work).
PAD_TOKENS = 32
PAD_SHARE = 0.125


def like_lengths(lengths):
    """How many of ``lengths`` (the queue's next prompts, in order) to prefill in one batch: the longest run
    from the first whose longest and shortest differ by at most ``PAD_TOKENS`` or ``PAD_SHARE`` of the longest."""
    k, hi, lo = 1, lengths[0], lengths[0]
    for n in lengths[1:]:
        hi, lo = max(hi, n), min(lo, n)
        if hi - lo > max(PAD_TOKENS, PAD_SHARE * hi):
            break
        k += 1
    return k


class GreedyBatchGenerator(BatchGenerator):
    """``BatchGenerator(model, sampler=greedy, ...)`` that decodes with ``GreedyGenerationBatch``.

    Takes ``BatchGenerator``'s keyword arguments but ``sampler``; per-sequence
    samplers given to ``insert`` would not be called.
    """

    def __init__(self, model, **kwargs):
        if "sampler" in kwargs:
            raise TypeError("GreedyBatchGenerator takes no sampler: it decodes greedily")
        super().__init__(model, **kwargs)
        # mlx-lm's batches hand their work on through these two (split, extend, generate).
        self._prompt_batch = GreedyPromptBatch.empty(self.model, self.sampler, self.prefill_step_size)
        self._generation_batch = GreedyGenerationBatch.empty(self.model, self.sampler)

    def _make_batch(self, n):
        """mlx-lm's, but of the next ``n`` queued prompts only those of like length (``like_lengths``).

        With shared prefixes the queue holds whole prompts beside short
        remainders: in a profile of 46 live test items one batch of 8 computed
        8 x 1,321 positions for 5,296 prompt tokens, a third of the eval.
        """
        queued = [sum(map(len, seq[1])) for seq in itertools.islice(self._unprocessed_sequences, n)]
        return super()._make_batch(like_lengths(queued))
