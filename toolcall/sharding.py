"""Greedy generation split over one process per core (the eval stages' fast path).

MLX's CPU kernels other than matmul (softmax, SiLU, norms, cache updates) run
on one thread, so one generating process leaves the other core idle between
matmuls (``make bench``, ops section). Each worker process here loads the
model itself and generates its share of the prompts with OpenBLAS held to one
thread. Prompts are sorted longest first and dealt round-robin, so the shares
cost about the same and each worker's batches hold similar lengths.

Processes, not threads: two generating threads in one process (each on its
own MLX stream) overlapped little when measured (README, Speed). Greedy outputs do not depend on
the split: each sequence's tokens depend on its own prompt only.
"""

import multiprocessing
import os
import signal


def default_workers():
    return os.cpu_count() or 1


def generate_sharded(model_dir, adapter_dir, prompts, workers=None, progress=None, generator=None, per_prompt=None,
                     **kwargs):
    """``generation.generate`` over ``workers`` processes; same return value, input order.

    ``kwargs`` go to ``generate`` (``max_tokens``, ``batch_size``); the model is
    loaded in each worker from ``model_dir`` and ``adapter_dir``. ``generator``:
    another function with ``generate``'s signature to run instead (a module-level
    one: workers import it, e.g. ``constrained.generate``); ``per_prompt``: its
    keyword arguments that hold one entry per prompt (``{"grammars": [...]}``),
    dealt out with the prompts.
    """
    per_prompt = per_prompt or {}
    workers = max(1, min(workers or default_workers(), len(prompts)))
    if workers == 1:
        return _generate_share(model_dir, adapter_dir, prompts, progress, {**kwargs, **per_prompt}, None, generator)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    shares = [order[j::workers] for j in range(workers)]
    # spawn, not fork: MLX's and OpenBLAS's threads do not survive a fork. A Pool,
    # not a ProcessPoolExecutor: leaving its block terminates the workers, so
    # Ctrl-C stops the stage at once instead of waiting for every share to finish.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint) as pool:
        results = pool.starmap(_generate_share, [
            (model_dir, adapter_dir, [prompts[i] for i in share], progress and f"{progress} {j + 1}/{workers}",
             {**kwargs, **{k: [v[i] for i in share] for k, v in per_prompt.items()}}, 1, generator)
            for j, share in enumerate(shares)])  # re-raises a worker's error here
    out = [None] * len(prompts)
    for share, result in zip(shares, results):
        for i, r in zip(share, result):
            out[i] = r
    return out


def _ignore_sigint():
    # Ctrl-C reaches the whole process group; the parent alone handles it (and
    # ends the workers), so the user sees one line, not a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _generate_share(model_dir, adapter_dir, prompts, progress, kwargs, threads, generator):
    from . import blas
    from .generation import generate
    from .lora import load_model

    model, tokenizer = load_model(model_dir, adapter_dir)
    with blas.threads(threads):
        return (generator or generate)(model, tokenizer, prompts, progress=progress, **kwargs)
