"""Greedy generation split over one process per core (the eval stages' fast path).

Each worker decodes with the adapter fused into the weights (``fuse``) and
greedy's own decode step (``greedy``); ``reference=True``: the adapter as
separate LoRA layers and mlx-lm's step, the path those are checked against.

MLX's CPU kernels other than matmul (softmax, SiLU, norms, cache updates) run
on one thread, so one generating process leaves the other core idle between
matmuls (``make bench``, ops section). Each worker process here loads the
model itself and generates its share of the prompts with OpenBLAS held to one
thread. Prompts that share a prefix go to one worker whole (``deal``: it is
prefilled once, ``prefix``), the groups dealt so the shares cost about the
same; the reference path deals prompts longest first, round-robin.

Processes, not threads: two generating threads in one process (each on its
own MLX stream) overlapped little when measured (README, Speed). Greedy outputs do not depend on
the split: each sequence's tokens depend on its own prompt only.

How many (``default_workers``; params ``eval.workers: auto``): one per core
this process may use (``resources.usable_cores``: its affinity and cgroup
quota, not the host's core count), no more than free memory holds model
copies of, and one where MLX computes on a GPU (Metal, CUDA): one process
already uses the whole device, and each more would load another model onto it.
"""

import json
import multiprocessing
import signal
from pathlib import Path

from toolcall import resources
from toolcall.evaluate import prefix

# A worker's interpreter with mlx and mlx-lm imported: ~0.3 GB resident (measured on Linux).
PROCESS_BYTES = 300 * 2**20
# What decoding one answer costs, in prompt tokens prefilled, for balancing the shares only (outputs do not
# depend on it): ~100 tokens an answer, a row's decode step ~3 times a prefilled token's time at batch 32.
DECODE_WEIGHT = 300


def copy_bytes(model_dir, batch_size, tokens):
    """Memory one generating process needs: the weights, a float32 KV cache of ``batch_size`` x
    ``tokens`` positions (the longest prompt plus max_tokens), and the interpreter."""
    weights = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors"))
    c = json.loads((Path(model_dir) / "config.json").read_text())
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    kv_per_token = 2 * c["num_hidden_layers"] * c.get("num_key_value_heads", c["num_attention_heads"]) * head_dim * 4
    return weights + kv_per_token * batch_size * tokens + PROCESS_BYTES


def default_workers(per_copy_bytes=None, cores=None, memory=None, gpu=None):
    """Generating processes for this machine: its usable cores, capped by memory; 1 on a GPU.

    ``per_copy_bytes``: what one process needs (``copy_bytes``; None: no
    memory cap). ``cores``, ``memory`` and ``gpu`` default to what
    ``resources`` finds.
    """
    if resources.gpu_default() if gpu is None else gpu:
        return 1
    n = resources.usable_cores() if cores is None else cores
    memory = resources.available_memory() if memory is None else memory
    if per_copy_bytes and memory is not None:
        n = min(n, memory // per_copy_bytes)
    return max(1, n)


def resolve_workers(setting, model_dir, batch_size, tokens):
    """params ``eval.workers``: ``"auto"`` (``default_workers`` for this model, batch and length) or a count."""
    if setting == "auto":
        return default_workers(copy_bytes(model_dir, batch_size, tokens))
    return setting


def generate_sharded(model_dir, adapter_dir, prompts, workers=None, progress=None, generator=None, per_prompt=None,
                     reference=False, **kwargs):
    """``generation.generate`` over ``workers`` processes; same return value, input order.

    ``kwargs`` go to ``generate`` (``max_tokens``, ``batch_size``); the model is
    loaded in each worker from ``model_dir`` and ``adapter_dir``. ``generator``:
    another function with ``generate``'s signature to run instead (a module-level
    one: workers import it, e.g. ``constrained.generate``); ``per_prompt``: its
    keyword arguments that hold one entry per prompt (``{"grammars": [...]}``),
    dealt out with the prompts. ``reference``: load the adapter unfused and
    pass ``reference=True`` on to ``generate`` (the path the default is checked against).
    """
    per_prompt = per_prompt or {}
    workers = max(1, min(workers or default_workers(), len(prompts)))
    if workers == 1:
        return _generate_share(model_dir, adapter_dir, prompts, progress, {**kwargs, **per_prompt}, None, generator,
                               reference)
    shares = deal(prompts, workers, share_prefixes=not reference and kwargs.get("share_prefixes", True))
    # spawn, not fork: MLX's and OpenBLAS's threads do not survive a fork. A Pool,
    # not a ProcessPoolExecutor: leaving its block terminates the workers, so
    # Ctrl-C stops the stage at once instead of waiting for every share to finish.
    with multiprocessing.get_context("spawn").Pool(workers, initializer=_ignore_sigint) as pool:
        results = pool.starmap(_generate_share, [
            (model_dir, adapter_dir, [prompts[i] for i in share], progress and f"{progress} {j + 1}/{workers}",
             {**kwargs, **{k: [v[i] for i in share] for k, v in per_prompt.items()}}, 1, generator, reference)
            for j, share in enumerate(shares)])  # re-raises a worker's error here
    out = [None] * len(prompts)
    for share, result in zip(shares, results):
        for i, r in zip(share, result):
            out[i] = r
    return out


def deal(prompts, workers, share_prefixes):
    """Each worker's prompt indices: longest first, round-robin; with ``share_prefixes`` (the fast path), whole
    ``prefix.groups`` instead, each to the worker with the least work so far (a group split over two workers
    would be prefilled by each). A prompt's work: the tokens it prefills, plus ``DECODE_WEIGHT`` for decoding."""
    if not share_prefixes:
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        return [order[j::workers] for j in range(workers)]
    shares, work = [[] for _ in range(workers)], [0] * workers
    plan = [(shared + sum(len(prompts[i]) - shared + DECODE_WEIGHT for i in members), members)
            for shared, members in prefix.groups(prompts)]
    for cost, members in sorted(plan, key=lambda g: -g[0]):
        j = work.index(min(work))
        shares[j] += members
        work[j] += cost
    return shares


def _ignore_sigint():
    # Ctrl-C reaches the whole process group; the parent alone handles it (and
    # ends the workers), so the user sees one line, not a traceback per worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _generate_share(model_dir, adapter_dir, prompts, progress, kwargs, threads, generator, reference):
    from toolcall.evaluate.generation import generate
    from toolcall.model import blas
    from toolcall.model.lora import load_model

    model, tokenizer = load_model(model_dir, adapter_dir, fused=not reference)
    if reference:
        kwargs = {**kwargs, "reference": True}
    with blas.threads(threads):
        return (generator or generate)(model, tokenizer, prompts, progress=progress, **kwargs)
