"""One progress reporter for every long loop (training steps, generated items, sampled prompts).

On a terminal it redraws one live line; in a log (DVC stage output, ``nohup``)
it writes a line at most every ``every`` seconds and at the end, each with
the count, rate, elapsed time and ETA, so a log shows how a run went without
a line per item.
"""

import sys
import time


class Progress:
    """``Progress(label, total)``; call ``update(n, **stats)`` as work is done.

    ``stats`` (e.g. ``loss=0.12``) are shown after the count as ``name value``.
    ``every=0`` writes every update (training reports, which are already sparse).
    """

    def __init__(self, label, total, unit="it", every=15.0, stream=None):
        self.label, self.total, self.unit, self.every = label, total, unit, every
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty()
        self.done = 0
        self.start = self.last = time.perf_counter()

    def elapsed(self):
        return time.perf_counter() - self.start

    def update(self, n=1, **stats):
        self.done += n
        now = time.perf_counter()
        finished = self.done >= self.total
        if not (self.live or finished or now - self.last >= self.every):
            return
        self.last = now
        line = self.line(stats)
        if self.live:
            self.stream.write("\r\033[K" + line + ("\n" if finished else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def line(self, stats):
        elapsed = self.elapsed()
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        shown = "".join(f"  {k} {_fmt(v)}" for k, v in stats.items())
        return (f"[{self.label}] {self.done}/{self.total} {self.unit}{shown}  {rate:.3g} {self.unit}/s  "
                f"elapsed {elapsed:.0f}s  ETA {eta:.0f}s")


def _fmt(value):
    return f"{value:.4g}" if isinstance(value, float) else str(value)
