"""mlx-lm's batched KV cache, but a finished sequence leaves without a copy of the others.

mlx-lm's ``BatchKVCache.filter`` gathers the remaining rows into new arrays:
each sequence that finishes copies the whole cache (every layer's keys and
values of every other sequence, ~0.9 GB at 32 sequences of 600 positions for
SmolLM2 in float32), several decode steps' worth of memory traffic.
``InPlaceKVCache.filter`` takes the new rows as old row indices in any order
and copies only the rows whose index changes, in place; ``greedy``'s
generation batch fills each finished row's slot with a row from the end
(``fill_holes``), so one finish copies one row. The rows past the live ones
stay in the buffer unread (attention and updates see ``[:live]``) until the
buffer grows or another batch joins, which make new arrays anyway.

mlx-lm's filter also drops the padding all rows share on the left; this one
keeps it (shifting would make the next update copy the cache): the native
attention kernel skips each row's left padding (``native/attention.cpp``,
``first_key``), so it costs memory only.
"""

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache


def fill_holes(n, keep):
    """Old row indices of the new rows when rows ``keep`` (sorted) of ``n`` stay: each row of
    ``keep`` past the new end moves into a slot left free below it, the others stay put."""
    size, kept = len(keep), set(keep)
    order = list(range(size))
    holes = [i for i in range(size) if i not in kept]
    for hole, row in zip(holes, [i for i in keep if i >= size]):
        order[hole] = row
    return order


class InPlaceKVCache(BatchKVCache):
    def _trim(self):
        live = self.offset.shape[0]
        if self.keys is not None and self.keys.shape[0] > live:
            self.keys, self.values = self.keys[:live], self.values[:live]

    def update_and_fetch(self, keys, values):
        live, prev = keys.shape[0], self._idx
        if self.keys is None or self.keys.shape[0] == live or prev + keys.shape[2] > self.keys.shape[2]:
            self._trim()  # growing makes new arrays anyway: without the finished rows
            return super().update_and_fetch(keys, values)
        self.offset = self.offset + keys.shape[2]
        self._idx += keys.shape[2]
        self.keys[:live, :, prev: self._idx, :] = keys
        self.values[:live, :, prev: self._idx, :] = values
        return self.keys[:live, :, : self._idx, :], self.values[:live, :, : self._idx, :]

    def filter(self, batch_indices):
        order = batch_indices.tolist() if isinstance(batch_indices, mx.array) else list(batch_indices)
        moved = [(new, old) for new, old in enumerate(order) if new != old]
        if self.keys is not None and moved:
            source = mx.array([old for _, old in moved])
            keys, values = self.keys[source], self.values[source]
            mx.eval(keys, values)  # read out before the writes: a moved row's source may be another's target
            for i, (new, _) in enumerate(moved):  # slice updates, in place (an indexed scatter was slower)
                self.keys[new: new + 1] = keys[i: i + 1]
                self.values[new: new + 1] = values[i: i + 1]
        index = mx.array(order)
        self.offset = self.offset[index]
        self.left_padding = self.left_padding[index]

    def extend(self, other):
        self._trim()
        super().extend(other)
