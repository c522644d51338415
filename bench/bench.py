"""`make bench`: this pipeline vs plain mlx-lm on this machine, measured in one run.

    python bench/bench.py [--train-steps 8] [--eval-items 64] [--repeats 3] [--out metrics/bench.json]

Rows (each: ours, the baseline, their ratio; medians over ``--repeats`` runs,
arms interleaved so drifting background load hits both):

* float32 matmul GFLOP/s through MLX with our OpenBLAS loading vs without
  (``TOOLCALL_NO_OPENBLAS=1``): the machine's practical ceiling.
* Where one transformer block's time goes at eval shapes (prefill, decode):
  the BLAS projections vs MLX's own single-threaded CPU kernels.
* SFT training tokens/s (prompt + completion tokens) of ``toolcall.trainer.train_lora``
  vs ``python -m mlx_lm lora`` (its own ``main()``; with OpenBLAS loaded the same way,
  so the row measures the training code, not the BLAS) on the same rows, tokens,
  LoRA settings and iterations. Both run exactly one epoch of the slice, so both
  train on the same examples. Time = the trainer's own step time (batch building
  excluded on both sides), from its per-step report.
* Eval examples/s of what the eval stage runs (``toolcall.sharding.generate_sharded``:
  batched ``toolcall.generation.generate`` in one process per core, model loading
  included), and of batched ``generate`` in one process, vs one prompt at a time
  through ``mlx_lm.stream_generate`` (the engine of ``mlx_lm.generate``), greedy,
  same max_tokens and stop tokens; token ids compared item by item.
* No-op ``dvc repro`` wall time.

Each measurement runs in its own subprocess (``--worker``): OpenBLAS has to be
loaded before ``mlx.core`` is imported, and every arm starts from a fresh process.
"""

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
RESULT_TAG = "BENCH_RESULT "
# Renders [prompt, completion] as prompt + completion: mlx-lm's completions
# dataset then yields exactly our PromptFormat tokens (checked in the worker).
IDENTITY_TEMPLATE = (
    "{{ messages[0]['content'] }}{% if messages|length > 1 %}{{ messages[1]['content'] }}{% endif %}"
)


def log(msg):
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def median(xs):
    return statistics.median(xs) if xs else None


def spread(xs):
    return [round(min(xs), 4), round(max(xs), 4)] if xs else None


def evenly(n_total, n):
    """``n`` row indices spread evenly over ``n_total`` rows (all categories, all lengths)."""
    if n > n_total:
        raise SystemExit(f"asked for {n} rows, the file has {n_total}")
    return [i * n_total // n for i in range(n)]


# ====================================================================== workers
# Each runs in a fresh interpreter and prints one RESULT_TAG line of JSON.


def _load_rows(path, indices):
    from toolcall.io import read_jsonl

    rows = read_jsonl(path)
    return [rows[i] for i in indices]


def _examples(tokenizer, rows):
    from toolcall.data import gold_calls
    from toolcall.prompts import PromptFormat

    fmt = PromptFormat(tokenizer)
    return [fmt.example(r, gold_calls(r["ground_truth"])) for r in rows]


def _rusage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _batch_counter(iterate, counts, per_row):
    """Wrap an ``iterate_batches`` to count the padded positions it hands out."""

    def wrapped(*args, **kwargs):
        for batch in iterate(*args, **kwargs):
            tokens, lengths = batch[0], batch[1]
            counts["batches"] += 1
            real = int(lengths[:, 1].sum().item()) + per_row * tokens.shape[0]
            counts.setdefault("first_batch_tokens", real)
            counts["padded_positions"] += int(tokens.size)
            counts["real_tokens"] += real
            yield batch

    return wrapped


class _Recorder:
    """Keeps every trainer report (we run with steps_per_report=1)."""

    def __init__(self):
        self.reports = []

    def on_train_loss_report(self, info):
        self.reports.append(dict(info))

    def on_val_loss_report(self, info):
        pass

    def summary(self):
        step_s = [1.0 / r["iterations_per_second"] for r in self.reports]
        return {
            "step_seconds": [round(s, 4) for s in step_s],
            "train_seconds": sum(step_s),
            "losses": [r["train_loss"] for r in self.reports],
            "peak_memory_gb": max(r["peak_memory"] for r in self.reports),
            "target_tokens": self.reports[-1]["trained_tokens"],
        }


def worker_matmul(spec):
    import toolcall  # noqa: F401  (loads OpenBLAS unless TOOLCALL_NO_OPENBLAS)
    import mlx.core as mx

    from toolcall import blas

    out = {"blas": blas.loaded_path}
    for name, (m, k, n) in spec["shapes"].items():
        a = mx.random.normal((m, k))
        b = mx.random.normal((k, n))
        mx.eval(a, b)
        mx.eval(a @ b)
        rates = []
        deadline = time.perf_counter() + spec["seconds"]
        while time.perf_counter() < deadline or len(rates) < 3:
            t = time.perf_counter()
            mx.eval(a @ b)
            rates.append(2 * m * k * n / (time.perf_counter() - t) / 1e9)
        out[name] = median(rates)
    return out


def worker_ops(spec):
    """Milliseconds per op of one transformer block at eval shapes, ``mx.eval`` after each.

    ``prefill``: one prompt of ``L`` tokens; ``decode``: ``B`` sequences, one new
    token each, over a KV cache of ``L``. Shows where generation time goes: the
    seven projections go through BLAS (both cores), every other op through MLX's
    own CPU kernels (one thread).
    """
    import toolcall  # noqa: F401
    import mlx.core as mx
    import mlx.nn as nn

    s = spec["shape"]
    d, heads, kv_heads, hd, inter = s["hidden"], s["heads"], s["kv_heads"], s["head_dim"], s["intermediate"]
    w = {k: mx.random.normal(shape) * 0.02 for k, shape in {
        "q": (d, heads * hd), "k": (d, kv_heads * hd), "v": (d, kv_heads * hd), "o": (heads * hd, d),
        "gate": (d, inter), "up": (d, inter), "down": (inter, d)}.items()}
    norm = mx.ones((d,))
    mx.eval(w, norm)

    def timed(fn):
        mx.eval(fn())
        ts = []
        deadline = time.perf_counter() + spec["seconds"]
        while time.perf_counter() < deadline or len(ts) < 5:
            t = time.perf_counter()
            mx.eval(fn())
            ts.append(time.perf_counter() - t)
        return 1000 * median(ts)

    out = {}
    for name, (b, q_len, kv_len) in {"prefill": (1, s["L"], s["L"]), "decode": (s["B"], 1, s["L"])}.items():
        x = mx.random.normal((b, q_len, d))
        g = mx.random.normal((b, q_len, inter))
        q = mx.random.normal((b, heads, q_len, hd))
        k = mx.random.normal((b, kv_heads, kv_len, hd))
        v = mx.random.normal((b, kv_heads, kv_len, hd))
        mx.eval(x, g, q, k, v)
        mask = "causal" if q_len > 1 else None
        ops = {
            "projections (7 matmuls, BLAS)": lambda: [x @ w["q"], x @ w["k"], x @ w["v"], x @ w["o"],
                                                      x @ w["gate"], x @ w["up"], g @ w["down"]],
            "attention (scaled_dot_product_attention)": lambda: mx.fast.scaled_dot_product_attention(
                q, k, v, scale=hd ** -0.5, mask=mask),
            "swiglu (silu(gate) * up)": lambda: nn.silu(g) * g,
            "2 rms_norm + 2 residual adds": lambda: [mx.fast.rms_norm(x, norm, 1e-5),
                                                     mx.fast.rms_norm(x, norm, 1e-5), x + x, x + x],
            "rope (q and k)": lambda: [mx.fast.rope(q, hd, traditional=False, base=10000.0, scale=1.0, offset=0),
                                       mx.fast.rope(k[:, :, -q_len:], hd, traditional=False, base=10000.0,
                                                    scale=1.0, offset=0)],
        }
        out[name] = {op: timed(fn) for op, fn in ops.items()}
    x = mx.random.normal((s["L"], inter))
    mx.eval(x)
    out["exp_ns_per_element"] = 1e6 * timed(lambda: mx.exp(x)) / x.size
    return out


def worker_train(spec):
    """Our trainer (``arm=ours``) or the same trainer with mlx-lm's full-vocabulary loss (``plain``)."""
    import toolcall  # noqa: F401
    import mlx.core as mx

    from toolcall import lora, loss, trainer
    from toolcall.config import SftConfig

    rows = _load_rows(spec["train"], spec["indices"])
    model, tokenizer = lora.load_model(spec["model"])
    examples = _examples(tokenizer, rows)
    cfg = SftConfig(**spec["cfg"])
    lora.add_lora(model, lora.adapter_config(cfg), cfg.seed)  # LoRA init: identical in every arm
    if spec["arm"] == "plain":
        trainer.sft_loss = lambda m: loss.full_loss  # mlx-lm's default_loss
    rec = _Recorder()

    class Callback(trainer._Reports):
        def on_train_loss_report(self, info):
            rec.on_train_loss_report(info)

    trainer._Reports = Callback
    counts = {"batches": 0, "padded_positions": 0, "real_tokens": 0}
    trainer.iterate_batches = _batch_counter(trainer.iterate_batches, counts, per_row=1)
    u0, s0 = _rusage()
    t0 = time.perf_counter()
    trainer.train_lora(model, examples, cfg.train())
    wall = time.perf_counter() - t0
    u1, s1 = _rusage()
    return {
        **rec.summary(),
        **counts,
        "lengths": [[len(t), p] for t, p in examples],
        "wall_seconds": wall,
        "cpu_user_s": u1 - u0,
        "cpu_system_s": s1 - s0,
        "tokens": sum(len(t) for t, _ in examples),
        "completion_tokens": sum(len(t) - p for t, p in examples),
        "lora_parameters": lora.count_trainable(model),
    }


def worker_mlxlm(spec):
    """``python -m mlx_lm lora`` (its ``main()``), observed through a training callback."""
    import toolcall  # noqa: F401  (the same OpenBLAS as ours; nothing else of ours runs)
    import mlx.core as mx  # noqa: F401
    import mlx_lm.lora as lora
    from mlx_lm.tuner import trainer
    from mlx_lm.tuner.datasets import CompletionsDataset
    from mlx_lm.utils import load_tokenizer

    work = Path(spec["workdir"])
    # Same tokens as ours? mlx-lm's dataset (identity template) vs our PromptFormat.
    ours = _examples(load_tokenizer(Path(spec["model"])), _load_rows(spec["train"], spec["indices"]))
    data = [json.loads(line) for line in (work / "data" / "train.jsonl").open()]
    ds = CompletionsDataset(data, load_tokenizer(work / "model"), "prompt", "completion", mask_prompt=True)
    theirs = [ds.process(d) for d in data]
    mismatches = sum(tuple(a) != (list(b[0]), b[1]) for a, b in zip(ours, theirs))

    rec = _Recorder()
    lora.get_reporting_callbacks = lambda *a, **k: rec
    counts = {"batches": 0, "padded_positions": 0, "real_tokens": 0}
    timing = {}
    real_train = lora.train

    def timed_train(*args, **kwargs):
        kwargs["iterate_batches"] = _batch_counter(trainer.iterate_batches, counts, per_row=0)
        timing["u0"], timing["s0"] = _rusage()
        t0 = time.perf_counter()
        real_train(*args, **kwargs)
        timing["wall"] = time.perf_counter() - t0
        timing["u1"], timing["s1"] = _rusage()

    lora.train = timed_train
    sys.argv = ["mlx_lm.lora", *spec["argv"]]
    lora.main()
    return {
        **rec.summary(),
        **counts,
        "wall_seconds": timing["wall"],
        "cpu_user_s": timing["u1"] - timing["u0"],
        "cpu_system_s": timing["s1"] - timing["s0"],
        "tokens": sum(len(t) for t, _ in ours),
        "completion_tokens": sum(len(t) - p for t, p in ours),
        "token_mismatches": mismatches,
    }


def worker_eval(spec):
    """Greedy outputs and timings of one eval arm: ``batched`` (the pipeline's
    ``generate``) or ``sequential`` (``mlx_lm.stream_generate``, one prompt at a time)."""
    import inspect

    import toolcall  # noqa: F401
    import mlx.core as mx

    from toolcall import generation
    from toolcall.prompts import PromptFormat
    from toolcall.lora import load_model

    model, tokenizer = load_model(spec["model"], spec.get("adapter"))
    fmt = PromptFormat(tokenizer)
    rows = _load_rows(spec["test"], spec["indices"])
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    max_tokens = spec["max_tokens"]
    out = {"prompt_tokens": [len(p) for p in prompts]}
    if spec["arm"] == "sharded":  # what the eval stage runs: one process per core
        from toolcall.sharding import generate_sharded

        generate_sharded(spec["model"], spec.get("adapter"), prompts[:2], workers=spec["workers"], max_tokens=4,
                         **spec.get("kwargs", {}))
        t0 = time.perf_counter()  # timed from here: the workers' model loading is part of the eval's cost
        res = generate_sharded(spec["model"], spec.get("adapter"), prompts, workers=spec["workers"],
                               max_tokens=max_tokens, return_tokens=True, **spec.get("kwargs", {}))
        out["seconds"] = time.perf_counter() - t0
        out["tokens"] = [list(map(int, r[2])) for r in res]
        out["texts"] = [r[0] for r in res]
        out["generated"] = [r[1] for r in res]
    elif spec["arm"] == "batched":
        kwargs = dict(spec.get("kwargs", {}))
        counters = []
        real = generation.BatchGenerator

        class Observed(real):  # keeps the prefill/decode split mlx-lm already counts
            def close(self):
                counters.append(self._counters)
                super().close()

        generation.BatchGenerator = Observed
        generate = _generate_variant if spec.get("variant") else generation.generate
        with_tokens = "return_tokens" in inspect.signature(generate).parameters
        if with_tokens:
            kwargs["return_tokens"] = True
        generate(model, tokenizer, prompts[:1], max_tokens=4, **kwargs)  # warm-up
        t0 = time.perf_counter()
        res = generate(model, tokenizer, prompts, max_tokens=max_tokens, **kwargs)
        out["seconds"] = time.perf_counter() - t0
        c = counters[-1] if counters and not spec.get("variant") else None
        if c is not None:
            out["split"] = {"prefill_s": c.prompt_time, "decode_s": c.decode_time, "decode_steps": c.generation_steps}
        out["tokens"] = [list(map(int, r[2])) for r in res] if with_tokens else None
        out["texts"] = [r[0] for r in res] if res and res[0][0] is not None else None
        out["generated"] = [r[1] for r in res]
    else:
        from mlx_lm import stream_generate

        def one(prompt, n):
            toks, t0, first = [], time.perf_counter(), None
            for r in stream_generate(model, tokenizer, prompt, max_tokens=n):
                if first is None:
                    first = time.perf_counter() - t0  # prompt processing + first token
                if r.finish_reason != "stop":  # the stop token itself is not output
                    toks.append(int(r.token))
            return toks, first, time.perf_counter() - t0 - first

        one(prompts[0], 4)  # warm-up
        t0 = time.perf_counter()
        res = [one(p, max_tokens) for p in prompts]
        out["seconds"] = time.perf_counter() - t0
        out["tokens"] = [r[0] for r in res]
        out["generated"] = [len(r[0]) for r in res]
        out["split"] = {"prefill_s": sum(r[1] for r in res), "decode_s": sum(r[2] for r in res)}
    if out.get("texts") is None and out.get("tokens") is not None:
        out["texts"] = [tokenizer.decode(t) for t in out["tokens"]]
    out["peak_memory_gb"] = mx.get_peak_memory() / 1e9
    return out


def worker_profile(spec):
    """Where a training step's time goes, with ``mx.eval`` barriers between the parts.

    On a few real batches: body forward, vocab projection + loss (at completion
    positions / at every position), forward+backward, optimizer update; plus the
    leads from the issue: stop-gradient at the first LoRA block's input, and the
    compiled vs uncompiled step.
    """
    import toolcall  # noqa: F401
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from toolcall import batches as batching
    from toolcall import lora, loss, trainer
    from toolcall.config import SftConfig

    rows = _load_rows(spec["train"], spec["indices"])
    model, tokenizer = lora.load_model(spec["model"])
    examples = _examples(tokenizer, rows)
    cfg = SftConfig(**spec["cfg"])
    lora.add_lora(model, lora.adapter_config(cfg), cfg.seed)
    model.train()
    it = batching.iterate_batches(examples, cfg.batch_size, cfg.max_seq_len, loop=True, seed=cfg.seed)
    batches = [next(it) for _ in range(spec["batches"])]
    mx.eval(batches)
    opt = trainer.make_optimizer(cfg)
    ours = nn.value_and_grad(model, loss.completion_loss)
    plain = nn.value_and_grad(model, loss.full_loss)
    params = lambda: [v for _, v in tree_flatten(model.trainable_parameters())]  # noqa: E731

    def body(batch):
        return model.model(batch[0][:, :-1])

    def head_ours(batch, hidden):
        _, positions, weights = batch[1:]
        targets = batch[0][:, 1:]
        picked = mx.take_along_axis(hidden, positions[..., None], axis=1)
        logits = loss.lm_head(model, picked)
        ce = nn.losses.cross_entropy(logits, mx.take_along_axis(targets, positions, axis=1)) * weights
        return ce.sum() / weights.sum()

    def head_full(batch, hidden):
        lengths, targets = batch[1], batch[0][:, 1:]
        logits = loss.lm_head(model, hidden)
        steps = mx.arange(1, targets.shape[1] + 1)
        mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
        return (nn.losses.cross_entropy(logits, targets) * mask).sum() / mask.sum()

    def timed(fn, batch, reps=spec["reps"]):
        fn(batch)  # warm-up (and compile, for a compiled fn)
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn(batch)
            ts.append(time.perf_counter() - t)
        return median(ts)

    parts = {name: [] for name in (
        "body_forward", "head_loss_forward_completion", "head_loss_forward_all_positions",
        "forward_backward_ours", "forward_backward_plain", "optimizer_update",
        "forward_backward_ours_stop_gradient", "step_uncompiled", "step_compiled",
    )}
    first = len(model.layers) - cfg.lora_layers
    n_positions, n_completion = [], []
    for batch in batches:
        n_positions.append(int(batch[0].shape[0] * (batch[0].shape[1] - 1)))
        n_completion.append(int(batch[3].sum().item()))
        hidden = body(batch)
        mx.eval(hidden)
        parts["body_forward"].append(timed(lambda b: mx.eval(body(b)), batch))
        parts["head_loss_forward_completion"].append(timed(lambda b: mx.eval(head_ours(b, hidden)), batch))
        parts["head_loss_forward_all_positions"].append(timed(lambda b: mx.eval(head_full(b, hidden)), batch))
        parts["forward_backward_ours"].append(timed(lambda b: mx.eval(ours(model, *b)), batch))
        parts["forward_backward_plain"].append(timed(lambda b: mx.eval(plain(model, *b)), batch))
        (_, _), grads = ours(model, *batch)
        mx.eval(grads)

        def update(_):
            opt.update(model, grads)
            mx.eval(params(), opt.state)

        parts["optimizer_update"].append(timed(update, batch))
    # Stop-gradient at the input of the first LoRA block: does MLX already skip
    # the backward of the frozen blocks below it?
    block = model.model.layers[first]

    class StopGrad(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner
            self.use_sliding = getattr(inner, "use_sliding", False)

        def __call__(self, x, *args, **kwargs):
            return self.inner(mx.stop_gradient(x), *args, **kwargs)

    model.model.layers[first] = StopGrad(block)
    for batch in batches:
        parts["forward_backward_ours_stop_gradient"].append(timed(lambda b: mx.eval(ours(model, *b)), batch))
    model.model.layers[first] = block
    # Compiled vs uncompiled step (trainer.train compiles one; each new padded shape recompiles).
    state = [model.state, opt.state, mx.random.state]

    def step(*batch):
        (loss, ntoks), grads = ours(model, *batch)
        opt.update(model, grads)
        return loss, ntoks

    compiled = mx.compile(step, inputs=state, outputs=state)
    first_compiled = []
    for batch in batches:
        parts["step_uncompiled"].append(timed(lambda b: mx.eval(step(*b), state), batch))
        t = time.perf_counter()
        mx.eval(compiled(*batch), state)
        first_compiled.append(time.perf_counter() - t)
        parts["step_compiled"].append(timed(lambda b: mx.eval(compiled(*b), state), batch))
    out = {k: sum(v) / len(v) for k, v in parts.items()}  # mean over batches of per-batch medians
    out["step_compiled_first_call"] = sum(first_compiled) / len(first_compiled)
    out["backward_ours"] = out["forward_backward_ours"] - out["body_forward"] - out["head_loss_forward_completion"]
    out["positions_per_batch"] = sum(n_positions) / len(n_positions)
    out["completion_tokens_per_batch"] = sum(n_completion) / len(n_completion)
    out["batches"] = len(batches)
    return out


def _generate_variant(model, tokenizer, prompts, max_tokens=256, batch_size=32, prefill_batch_size=8,
                      order="longest", return_tokens=True):
    """``toolcall.generation.generate`` with its fixed choices as knobs, for the eval sweep."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.sample_utils import make_sampler

    gen = BatchGenerator(model, stop_tokens=[[t] for t in tokenizer.eos_token_ids], sampler=make_sampler(temp=0.0),
                         completion_batch_size=batch_size, prefill_batch_size=min(batch_size, prefill_batch_size))
    idx = list(range(len(prompts)))
    if order == "longest":
        idx.sort(key=lambda i: -len(prompts[i]))
    elif order == "shortest":
        idx.sort(key=lambda i: len(prompts[i]))
    uids = gen.insert([prompts[i] for i in idx], [max_tokens] * len(idx))
    where = dict(zip(uids, idx))
    tokens = {uid: [] for uid in uids}
    try:
        while responses := gen.next_generated():
            for r in responses:
                if r.finish_reason != "stop":
                    tokens[r.uid].append(r.token)
    finally:
        gen.close()
    out = [None] * len(prompts)
    for uid, toks in tokens.items():
        out[where[uid]] = (None, len(toks), toks)
    return out


def worker_padding(spec):
    """Padding over the whole training file: our length buckets vs mlx-lm's batches (file order:
    its length sort is a no-op, CacheDataset.itemlen counts dict keys, ml-explore/mlx-lm#596)."""
    from mlx_lm.utils import load_tokenizer

    from toolcall.io import read_jsonl

    rows = read_jsonl(spec["train"])
    lengths = [len(t) for t, _ in _examples(load_tokenizer(Path(spec["model"])), rows)]
    b, cap = spec["batch_size"], spec["max_seq_len"]

    def waste(order):
        real = padded = 0
        for i in range(0, len(order) - b + 1, b):
            group = [lengths[j] for j in order[i:i + b]]
            width = min(1 + 32 * -(-max(group) // 32), cap + 1)
            real, padded = real + sum(group), padded + b * width
        return 1 - real / padded

    return {"rows": len(rows), "ours": waste(sorted(range(len(rows)), key=lengths.__getitem__)),
            "mlx_lm": waste(list(range(len(rows)))), "tokens_mean": sum(lengths) / len(lengths)}


def worker_tiny_model(spec):
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_model import make_tiny_model

    return {"path": str(make_tiny_model(spec["out"]))}


WORKERS = {"matmul": worker_matmul, "ops": worker_ops, "train": worker_train, "mlxlm": worker_mlxlm,
           "eval": worker_eval, "profile": worker_profile, "tiny_model": worker_tiny_model,
           "padding": worker_padding}


def run_worker(name, spec, env=None, timeout=3600):
    """Run one worker in a fresh interpreter; return its JSON result."""
    full_env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    full_env.update(env or {})
    with tempfile.NamedTemporaryFile("w", prefix="bench-spec-", suffix=".json") as f:
        json.dump(spec, f)
        f.flush()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--worker", name, f.name],
            env=full_env, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        )
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG):])
    raise RuntimeError(f"worker {name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def worker_main(name, spec_path):
    with open(spec_path) as f:
        result = WORKERS[name](json.load(f))
    print(RESULT_TAG + json.dumps(result), flush=True)


# ====================================================================== orchestration


def machine_info():
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        cpu = platform.processor() or "unknown"

    def version(pkg):
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "dvc": version("dvc"),
        "openblas_threads_env": os.environ.get("OPENBLAS_NUM_THREADS"),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def model_shape(model_dir):
    with open(Path(model_dir) / "config.json") as f:
        c = json.load(f)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    d, q, kv = c["hidden_size"], c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
    return {
        "hidden": d,
        "layers": c["num_hidden_layers"],
        "vocab": c["vocab_size"],
        "heads": c["num_attention_heads"],
        "kv_heads": c["num_key_value_heads"],
        "head_dim": head_dim,
        "intermediate": c["intermediate_size"],
        "attn_width": q,
        # q, k, v, o projections + gate, up, down
        "block_params": d * q + 2 * d * kv + q * d + 3 * d * c["intermediate_size"],
    }


def train_flops(shape, lengths, lora_layers, lora_params):
    """Required FLOPs to train on these ``(length, prompt_length)`` examples once.

    Per token: forward 2*P_block through every block; backward through the
    ``lora_layers`` LoRA blocks 2*P_block each (input gradients only: the base
    weights are frozen, so no weight gradients); LoRA adapters 6*P_lora
    (forward, input and weight gradients); causal attention QK^T and PV
    4*width*(L+1)/2 per token and layer forward, twice that backward in the LoRA
    blocks; vocabulary projection 2*V*d forward + 2*V*d backward at completion
    tokens only (mask_prompt). Returns ``(flops, flops_if_frozen_backward_cost_2x)``.
    """
    pb, n, k = shape["block_params"], shape["layers"], lora_layers
    head = 2 * shape["vocab"] * shape["hidden"]
    total = alt = 0.0
    for length, prompt_len in lengths:
        attn = 4 * shape["attn_width"] * length * (length + 1) / 2  # per layer, forward, whole sequence
        common = 2 * pb * n * length + 6 * lora_params * length + attn * n + 2 * attn * k
        common += 2 * head * (length - prompt_len)
        total += common + 2 * pb * k * length
        alt += common + 4 * pb * k * length
    return total, alt


def shown(value):
    """A path inside the repo as repo-relative (for metrics/bench.json); anything else unchanged."""
    if isinstance(value, (str, Path)) and Path(value).is_absolute():
        try:
            return str(Path(value).resolve().relative_to(ROOT)) or "."
        except ValueError:
            return str(value)
    return value


def rate_stats(values):
    return {"median": median(values), "min_max": spread(values), "runs": [round(v, 4) for v in values]}


def bench_matmul(args):
    shapes = {"square_1024": (1024, 1024, 1024), "model_mlp_1664x576x1536": (1664, 576, 1536)}
    runs = {"openblas": [], "no_openblas": [], "openblas_1_thread": []}
    envs = {"openblas": {}, "no_openblas": {"TOOLCALL_NO_OPENBLAS": "1"},
            "openblas_1_thread": {"OPENBLAS_NUM_THREADS": "1"}}
    for r in range(args.repeats):
        for arm, env in envs.items():
            runs[arm].append(run_worker("matmul", {"shapes": shapes, "seconds": 2}, env))
        log(f"matmul {r + 1}/{args.repeats}: " + ", ".join(
            f"{a} {runs[a][-1]['square_1024']:.1f}" for a in runs) + " GFLOP/s")
    out = {"blas": runs["openblas"][0]["blas"], "shapes": {k: list(v) for k, v in shapes.items()}}
    for arm, rs in runs.items():
        out[arm] = {name: rate_stats([x[name] for x in rs]) for name in shapes}
    return out


def bench_ops(args):
    """Per-op time of one block at eval shapes (see ``worker_ops``), median over repeats."""
    model = model_shape(args.model)
    shape = {k: model[k] for k in ("hidden", "heads", "kv_heads", "head_dim", "intermediate")} | {"L": 400, "B": 32}
    runs = [run_worker("ops", {"shape": shape, "seconds": 1}) for _ in range(args.repeats)]
    out = {"shape": shape, "layers": model["layers"],
           "exp_ns_per_element": median([r["exp_ns_per_element"] for r in runs])}
    for phase in ("prefill", "decode"):
        ms = {op: median([r[phase][op] for r in runs]) for op in runs[0][phase]}
        total = sum(ms.values())
        out[phase] = {op: {"ms": round(v, 3), "share": round(v / total, 3)} for op, v in ms.items()}
    log("ops: " + ", ".join(f"{p} {sum(v['ms'] for v in out[p].values()):.1f} ms/block" for p in ("prefill", "decode")))
    return out


def prepare_mlxlm(args, indices, cfg, workdir):
    """mlx-lm's inputs: model dir (symlinked weights, identity chat template), completions
    JSONL whose prompt/completion text comes from our PromptFormat, config YAML; and its argv."""
    import yaml

    work, model_dir = Path(workdir), args.model
    (work / "model").mkdir(parents=True)
    (work / "data").mkdir()
    for f in Path(model_dir).iterdir():
        if f.name != "tokenizer_config.json":
            (work / "model" / f.name).symlink_to(f.resolve())
    with open(Path(model_dir) / "tokenizer_config.json") as f:
        tok_cfg = json.load(f)
    tok_cfg["chat_template"] = IDENTITY_TEMPLATE
    (work / "model" / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    code = (
        "import json, sys\n"
        "import toolcall\n"
        "from mlx_lm.utils import load_tokenizer\n"
        "from pathlib import Path\n"
        "from toolcall.data import gold_calls\n"
        "from toolcall.io import read_jsonl\n"
        "from toolcall.prompts import PromptFormat\n"
        "model, train, out, idx = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])\n"
        "fmt = PromptFormat(load_tokenizer(Path(model)))\n"
        "rows = read_jsonl(train)\n"
        "with open(out, 'w') as f:\n"
        "    for i in idx:\n"
        "        r = rows[i]\n"
        "        p = fmt.prompt(r['messages'], r['functions'])\n"
        "        c = fmt.completion(r['messages'], r['functions'], gold_calls(r['ground_truth']))\n"
        "        f.write(json.dumps({'prompt': p, 'completion': c}) + '\\n')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, "-c", code, args.model, args.train, str(work / "data" / "train.jsonl"),
                    json.dumps(indices)], check=True, env=env, cwd=ROOT)
    decay = max(cfg["iters"] - cfg["warmup"], 1)
    (work / "config.yaml").write_text(yaml.safe_dump({
        "lora_parameters": {"rank": cfg["lora_rank"], "scale": cfg["lora_scale"], "dropout": cfg["lora_dropout"]},
        "lr_schedule": {"name": "cosine_decay", "arguments": [cfg["learning_rate"], decay, 0.0],
                        "warmup": cfg["warmup"]},
    }))
    argv = [
        "--model", str(work / "model"), "--train", "--data", str(work / "data"),
        "--fine-tune-type", "lora", "--optimizer", "adam", "--mask-prompt",
        "--num-layers", str(cfg["lora_layers"]), "--batch-size", str(cfg["batch_size"]),
        "--iters", str(cfg["iters"]), "--max-seq-length", str(cfg["max_seq_len"]),
        "--grad-accumulation-steps", str(cfg["grad_accumulation"]),
        "--learning-rate", str(cfg["learning_rate"]), "--steps-per-report", "1",
        "--save-every", str(cfg["iters"] + 1), "--adapter-path", str(work / "adapters"),
        "--seed", str(cfg["seed"]), "-c", str(work / "config.yaml"),
    ]
    return work, argv


def train_summary(runs, shape, cfg, flops):
    tokens = runs[0]["tokens"]
    tps = [r["tokens"] / r["train_seconds"] for r in runs]
    later = [(r["tokens"] - r["first_batch_tokens"]) / sum(r["step_seconds"][1:]) for r in runs if len(r["step_seconds"]) > 1]
    return {
        "tokens_per_s": rate_stats(tps),
        "tokens_per_s_after_first_step": rate_stats(later),
        "tokens_per_s_wall": rate_stats([r["tokens"] / r["wall_seconds"] for r in runs]),
        "train_seconds": rate_stats([r["train_seconds"] for r in runs]),
        "first_step_seconds": rate_stats([r["step_seconds"][0] for r in runs]),
        "peak_memory_gb": max(r["peak_memory_gb"] for r in runs),
        "system_cpu_fraction": median([r["cpu_system_s"] / max(r["cpu_user_s"] + r["cpu_system_s"], 1e-9)
                                       for r in runs]),
        "cpu_seconds_per_wall_second": median([(r["cpu_user_s"] + r["cpu_system_s"]) / r["wall_seconds"]
                                               for r in runs]),
        "padded_positions": runs[0]["padded_positions"],
        "padding_fraction": round(1 - runs[0]["real_tokens"] / runs[0]["padded_positions"], 4),
        "batches": runs[0]["batches"],
        "tokens": tokens,
        "mean_loss": median([sum(r["losses"]) / len(r["losses"]) for r in runs]),
        "target_tokens": runs[0]["target_tokens"],
        "completion_tokens": runs[0]["completion_tokens"],
        "achieved_gflops": median(tps) * flops / tokens / 1e9,
    }


def bench_train(args, params):
    from toolcall.config import SftConfig, from_params, seeded

    # The main study's first seed, as the ablation arms train at.
    sft = seeded(params["sft"], params["study"]["seeds"][0], "sft")
    cfg = dict(from_params(SftConfig, sft, "sft").__dict__)
    cfg.update(iters=args.train_steps, steps_per_report=1, warmup=min(cfg["warmup"], args.train_steps - 1))
    if cfg["grad_accumulation"] != 1:
        raise SystemExit("bench assumes sft.grad_accumulation == 1")
    n_rows = args.train_steps * cfg["batch_size"]
    with open(args.train) as f:
        total = sum(1 for line in f if line.strip())
    indices = evenly(total, n_rows)
    spec = {"model": args.model, "train": args.train, "indices": indices, "cfg": cfg}
    tmp = Path(tempfile.mkdtemp(prefix="bench-mlxlm-"))
    try:
        work, argv = prepare_mlxlm(args, indices, cfg, tmp / "mlxlm")
        runs = {"ours": [], "mlx_lm": []}
        for r in range(args.repeats):
            runs["ours"].append(run_worker("train", {**spec, "arm": "ours"}))
            shutil.rmtree(work / "adapters", ignore_errors=True)
            runs["mlx_lm"].append(run_worker("mlxlm", {**spec, "workdir": str(work), "argv": argv}))
            log(f"train {r + 1}/{args.repeats}: ours {runs['ours'][-1]['tokens'] / runs['ours'][-1]['train_seconds']:.1f}"
                f" tok/s, mlx-lm {runs['mlx_lm'][-1]['tokens'] / runs['mlx_lm'][-1]['train_seconds']:.1f} tok/s")
        extras = {}
        # Same trainer, same batches, mlx-lm's full-vocabulary loss: isolates our loss, checks its value.
        extras["plain_loss"] = [run_worker("train", {**spec, "arm": "plain"})]
        log(f"train plain-loss arm: {extras['plain_loss'][0]['tokens'] / extras['plain_loss'][0]['train_seconds']:.1f} tok/s")
        if args.leads:
            for name, env in (("ours_1_blas_thread", {"OPENBLAS_NUM_THREADS": "1"}),
                              ("ours_blas_thread_timeout_4", {"OPENBLAS_THREAD_TIMEOUT": "4"})):
                extras[name] = [run_worker("train", {**spec, "arm": "ours"}, env)]
                log(f"train lead {name}: {extras[name][0]['tokens'] / extras[name][0]['train_seconds']:.1f} tok/s")
        if not args.no_profile:
            extras["profile"] = run_worker("profile", {**spec, "batches": args.profile_batches, "reps": 2})
            log("train profile done")
        full = run_worker("padding", {"model": args.model, "train": args.train, "batch_size": cfg["batch_size"],
                                      "max_seq_len": cfg["max_seq_len"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shape = model_shape(args.model)
    lengths = runs["ours"][0]["lengths"]
    flops, flops_2x = train_flops(shape, lengths, cfg["lora_layers"], runs["ours"][0]["lora_parameters"])
    out = {
        "rows": n_rows, "steps": args.train_steps, "batch_size": cfg["batch_size"], "max_seq_len": cfg["max_seq_len"],
        "lora": {k: cfg[k] for k in ("lora_rank", "lora_scale", "lora_layers", "lora_dropout")},
        "tokens_identical_to_mlx_lm": runs["mlx_lm"][0]["token_mismatches"] == 0,
        "token_mismatches": runs["mlx_lm"][0]["token_mismatches"],
        "flops_per_token": flops / runs["ours"][0]["tokens"],
        "flops_per_token_if_frozen_backward_2x": flops_2x / runs["ours"][0]["tokens"],
        "model_shape": shape,
        "padding_whole_train_file": full,
    }
    for arm, rs in runs.items():
        out[arm] = train_summary(rs, shape, cfg, flops)
    for arm, rs in extras.items():
        if arm != "profile":
            out[arm] = train_summary(rs, shape, cfg, flops)
    if "plain_loss" in extras:
        a, b = runs["ours"][0]["losses"], extras["plain_loss"][0]["losses"]
        out["loss_check"] = {
            "ours_step_losses": a, "plain_step_losses": b,
            "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
            "max_rel_diff": max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)),
        }
    if "profile" in extras:
        out["profile"] = extras["profile"]
    return out


def bench_eval(args, params):
    """Batched over ``--eval-items`` rows; sequential over an evenly spread subset of them.

    One-at-a-time generation of an item does not depend on the other items, so
    its cost on the subset gives its cost on every item: seconds per prompt
    token (prefill) and per generated token (decode), applied to the prompts and
    the (identical, checked on the subset) output lengths of all items. Batched
    throughput does depend on how many items share the batches, so that arm runs
    on all of them. With ``--sequential-items == --eval-items`` nothing is estimated.
    """
    with open(args.test) as f:
        total = sum(1 for line in f if line.strip())
    indices = evenly(total, args.eval_items)
    n_seq = min(args.sequential_items, args.eval_items)
    sub = evenly(args.eval_items, n_seq)  # positions in ``indices``
    max_tokens = args.max_tokens or params["eval"]["max_tokens"]
    batch_size = params["eval"]["batch_size"]
    from toolcall.sharding import default_workers

    workers = args.workers or default_workers()
    spec = {"model": args.model, "adapter": args.adapter, "test": args.test, "max_tokens": max_tokens}
    runs = {"sharded": [], "batched": [], "sequential": []}
    for r in range(args.repeats):
        runs["sharded"].append(run_worker("eval", {**spec, "indices": indices, "arm": "sharded", "workers": workers,
                                                   "kwargs": {"batch_size": batch_size}}))
        runs["batched"].append(run_worker("eval", {**spec, "indices": indices, "arm": "batched",
                                                   "kwargs": {"batch_size": batch_size}}))
        msg = (f"eval {r + 1}/{args.repeats}: {workers} processes {args.eval_items} items "
               f"{runs['sharded'][-1]['seconds']:.1f}s, one process {runs['batched'][-1]['seconds']:.1f}s")
        if r < args.sequential_repeats:
            runs["sequential"].append(run_worker("eval", {**spec, "indices": [indices[i] for i in sub],
                                                          "arm": "sequential"}))
            msg += f", sequential {n_seq} items {runs['sequential'][-1]['seconds']:.1f}s"
        log(msg)
    first = runs["batched"][0]
    prompt_tokens, generated = first["prompt_tokens"], first["generated"]

    def sequential_seconds_all(run):
        """Seconds one-at-a-time generation takes for all items, from this subset run."""
        if n_seq == args.eval_items:
            return run["seconds"]
        per_prompt_token = run["split"]["prefill_s"] / sum(run["prompt_tokens"])
        per_generated = run["split"]["decode_s"] / max(sum(run["generated"]), 1)
        overhead = (run["seconds"] - run["split"]["prefill_s"] - run["split"]["decode_s"]) / n_seq
        return sum(prompt_tokens) * per_prompt_token + sum(generated) * per_generated + overhead * args.eval_items

    seq_ref = runs["sequential"][0]

    def differing(run):
        """Subset positions whose batched output differs from the sequential one: (token ids, parsed calls)."""
        from toolcall.parsing import parse_calls

        ids = texts = []
        if run.get("tokens") is not None:
            ids = [j for j, i in enumerate(sub) if run["tokens"][i] != seq_ref["tokens"][j]]
        texts = [j for j, i in enumerate(sub) if parse_calls(run["texts"][i]) != parse_calls(seq_ref["texts"][j])]
        return ids, texts

    def throughput(arm_runs):  # the rows every arm that runs all items reports
        return {
            "examples_per_s": rate_stats([args.eval_items / x["seconds"] for x in arm_runs]),
            "generated_tokens_per_s": rate_stats([sum(x["generated"]) / x["seconds"] for x in arm_runs]),
            "seconds": rate_stats([x["seconds"] for x in arm_runs]),
        }

    sharded = runs["sharded"]
    out = {
        "items": args.eval_items, "sequential_items": n_seq, "max_tokens": max_tokens, "batch_size": batch_size,
        "workers": workers, "adapter": args.adapter, "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens),
        "generated_tokens_mean": sum(generated) / len(generated),
        "hit_max_tokens": sum(g >= max_tokens for g in generated),
        "sharded": throughput(sharded),
        "batched": {
            **throughput(runs["batched"]),
            "prefill_s": rate_stats([x["split"]["prefill_s"] for x in runs["batched"] if "split" in x]),
            "decode_s": rate_stats([x["split"]["decode_s"] for x in runs["batched"] if "split" in x]),
            "decode_steps": first.get("split", {}).get("decode_steps"),
            "peak_memory_gb": max(x["peak_memory_gb"] for x in runs["batched"]),
        },
        "sequential": {
            "examples_per_s": rate_stats([args.eval_items / sequential_seconds_all(x) for x in runs["sequential"]]),
            "examples_per_s_on_subset": rate_stats([n_seq / x["seconds"] for x in runs["sequential"]]),
            "generated_tokens_per_s": rate_stats([sum(x["generated"]) / x["seconds"] for x in runs["sequential"]]),
            "prefill_tokens_per_s": rate_stats([sum(x["prompt_tokens"]) / x["split"]["prefill_s"]
                                                for x in runs["sequential"]]),
            "decode_tokens_per_s": rate_stats([sum(x["generated"]) / x["split"]["decode_s"]
                                               for x in runs["sequential"]]),
            "seconds_subset": rate_stats([x["seconds"] for x in runs["sequential"]]),
            "prefill_s": rate_stats([x["split"]["prefill_s"] for x in runs["sequential"]]),
            "decode_s": rate_stats([x["split"]["decode_s"] for x in runs["sequential"]]),
            "seconds_all_items": rate_stats([sequential_seconds_all(x) for x in runs["sequential"]]),
            "peak_memory_gb": max(x["peak_memory_gb"] for x in runs["sequential"]),
        },
        "sequential_runs_agree": all(x["tokens"] == seq_ref["tokens"] for x in runs["sequential"]),
        "batched_runs_agree": all(x["texts"] == first["texts"] for x in runs["batched"]),
        "sharded_equals_one_process": all(x["tokens"] == first["tokens"] for x in sharded),
    }
    ids, texts = differing(sharded[0])
    out["token_ids_differ"] = [indices[sub[j]] for j in ids]  # test-file rows
    out["parsed_calls_differ"] = [indices[sub[j]] for j in texts]
    out["compared"] = n_seq
    if args.leads:
        sweep = {}
        variants = {
            "batch8": dict(batch_size=8), "batch16": dict(batch_size=16),
            f"batch{batch_size}_prefill1": dict(batch_size=batch_size, prefill_batch_size=1),
            f"batch{batch_size}_prefill{batch_size}": dict(batch_size=batch_size, prefill_batch_size=batch_size),
            f"batch{batch_size}_input_order": dict(batch_size=batch_size, order="input"),
        }
        for name, kw in variants.items():
            res = run_worker("eval", {**spec, "indices": indices, "arm": "batched", "variant": True, "kwargs": kw})
            ids, texts = differing(res)
            sweep[name] = {"examples_per_s": args.eval_items / res["seconds"], "seconds": res["seconds"],
                           "differ_from_sequential": len(ids),
                           "differ_from_default_batched": sum(a != b for a, b in zip(res["texts"], first["texts"])),
                           **kw}
            log(f"eval lead {name}: {sweep[name]['examples_per_s']:.3f} ex/s")
        out["leads"] = sweep
    return out


def dvc_env(repo):
    bindir = str(Path(sys.executable).parent)
    return dict(os.environ, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", PYTHONPATH=str(repo))


def run_cmd(cmd, cwd, env, check=True):
    proc = subprocess.run(cmd, cwd=cwd, env=env, shell=True, capture_output=True, text=True)
    if check and proc.returncode:
        raise RuntimeError(f"{cmd} in {cwd} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout + proc.stderr


def pipeline_busy(repo):
    """A `dvc` process whose working directory is ``repo``?"""
    repo = Path(repo).resolve()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            is_dvc = any(Path(a).name == "dvc" for a in argv[:2]) and "repro" in argv
            if is_dvc and Path(os.readlink(f"/proc/{pid}/cwd")).resolve() == repo:
                return True
        except OSError:
            continue
    return False


def build_tiny_repo(where):
    """The end-to-end test's recipe (tests/test_pipeline.py): the DAG on a tiny model and fixture data."""
    import yaml

    repo = where / "repo"
    repo.mkdir(parents=True)
    for item in ("stages", "toolcall", "dvc.yaml", "params.yaml"):
        src = ROOT / item
        (shutil.copytree if src.is_dir() else shutil.copy)(src, repo / item)
    for cache in repo.rglob("__pycache__"):
        shutil.rmtree(cache)
    tiny = run_worker("tiny_model", {"out": str(where / "tiny")})["path"]
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import test_pipeline as tp  # its TINY_OVERRIDES keep every later stage tiny
        overrides, fixture = tp.TINY_OVERRIDES, tp.FIXTURE
    finally:
        sys.path.remove(str(ROOT / "tests"))
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"].update(source="local", local_dir=str(fixture))
    params["model"] = {"source": "local", "path": tiny}
    params["split"].update(test_per_category=3)
    params["validate"].update(max_seq_len=4096)
    params["sft"].update(iters=3, batch_size=2, warmup=0, steps_per_report=1, max_seq_len=4096, lora_layers=2)
    params["eval"].update(max_tokens=8, batch_size=4)
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dvc_env(repo)
    run_cmd("git init -q && git config user.email b@b && git config user.name bench && dvc init -q"
            " && git add -A && git commit -qm init", repo, env)
    t = time.perf_counter()
    run_cmd("dvc repro", repo, env)
    full = time.perf_counter() - t
    run_cmd("git add -A && git commit -qm repro", repo, env)
    return repo, full


def bench_noop_repro(args):
    target = Path(args.repro_dir).resolve()
    where, full, note = None, None, None
    if (target / "dvc.lock").exists() and not pipeline_busy(target):
        status = run_cmd("dvc status", target, dvc_env(target), check=False)
        if "up to date" in status:
            where, note = target, "the real pipeline (everything cached)"
        else:
            note = f"{shown(target)}: dvc status is not clean, so a repro there would run stages"
    elif (target / "dvc.lock").exists():
        note = f"{shown(target)}: a dvc repro is running there"
    else:
        note = f"{shown(target)}: no dvc.lock (pipeline never run there)"
    tmp = None
    if where is None:
        tmp = Path(tempfile.mkdtemp(prefix="bench-repro-"))
        log(f"no-op repro: {note}; building the tiny-model copy of the DAG in {tmp}")
        where, full = build_tiny_repo(tmp)
        note = f"tiny-model copy of the DAG (tests/test_pipeline.py recipe) after one full repro; {note}"
    try:
        env, times = dvc_env(where), []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = run_cmd("dvc repro", where, env)
            times.append(time.perf_counter() - t)
            if "Running stage" in out:
                raise RuntimeError(f"dvc repro in {where} was not a no-op:\n{out[-2000:]}")
        t = time.perf_counter()
        run_cmd("dvc --version", where, env)
        startup = time.perf_counter() - t
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return {"where": note, "seconds": rate_stats(times), "dvc_startup_s": startup, "full_repro_s": full}


def main():
    ap = argparse.ArgumentParser(description="Benchmark the pipeline against plain mlx-lm (see module doc).")
    ap.add_argument("--model", default=str(ROOT / "models" / "base"))
    ap.add_argument("--adapter", default=None, help="eval with this adapter (default: the base model)")
    ap.add_argument("--train", default=str(ROOT / "data" / "validated" / "train.jsonl"))
    ap.add_argument("--test", default=str(ROOT / "data" / "validated" / "test.jsonl"))
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--train-steps", type=int, default=6, help="steps of sft.batch_size rows: one epoch of the slice")
    ap.add_argument("--eval-items", type=int, default=64, help="batched eval rows (evenly spread over --test)")
    ap.add_argument("--sequential-items", type=int, default=6,
                    help="of those, the rows also run one at a time (see bench_eval)")
    ap.add_argument("--workers", type=int, default=None, help="eval stage processes (default: cores)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sequential-repeats", type=int, default=None,
                    help="repeats of the slow one-at-a-time eval arm (default: --repeats)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: params eval.max_tokens")
    ap.add_argument("--profile-batches", type=int, default=1)
    ap.add_argument("--repro-dir", default=str(ROOT),
                    help="time the no-op repro here if its pipeline is finished and clean; else in a tiny copy")
    ap.add_argument("--only", default="matmul,ops,train,eval,repro", help="comma-separated sections")
    ap.add_argument("--no-profile", action="store_true", help="skip the training step profile")
    ap.add_argument("--leads", action="store_true",
                    help="also measure the issue's leads: BLAS thread settings, eval batch/prefill/order sweep")
    ap.add_argument("--out", default=str(ROOT / "metrics" / "bench.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench: terminated"))  # run the cleanups
    args.sequential_repeats = min(args.sequential_repeats or args.repeats, args.repeats)
    sections = set(args.only.split(","))
    import yaml

    params = yaml.safe_load(Path(args.params).read_text())
    start = time.perf_counter()
    result = {"machine": machine_info(),
              "config": {k: shown(getattr(args, k)) for k in ("model", "adapter", "train", "test", "train_steps",
                                                        "eval_items", "repeats", "sequential_repeats")}}
    if "matmul" in sections:
        result["matmul"] = bench_matmul(args)
        m = result["matmul"]
        result["matmul_gflops"] = {"openblas": m["openblas"]["square_1024"]["median"],
                                   "no_openblas": m["no_openblas"]["square_1024"]["median"],
                                   "openblas_1_thread": m["openblas_1_thread"]["square_1024"]["median"]}
        result["matmul_speedup"] = result["matmul_gflops"]["openblas"] / result["matmul_gflops"]["no_openblas"]
    if "ops" in sections:
        result["ops"] = bench_ops(args)
    if "train" in sections:
        t = result["train"] = bench_train(args, params)
        result["train_speedup_vs_mlx_lm"] = t["ours"]["tokens_per_s"]["median"] / t["mlx_lm"]["tokens_per_s"]["median"]
        if "matmul_gflops" in result:
            ceiling = result["matmul_gflops"]["openblas"]
            result["train_fraction_of_matmul_ceiling"] = {
                arm: t[arm]["achieved_gflops"] / ceiling for arm in ("ours", "mlx_lm")}
    if "eval" in sections:
        e = result["eval"] = bench_eval(args, params)
        result["eval_speedup_vs_sequential"] = (e["sharded"]["examples_per_s"]["median"]
                                                / e["sequential"]["examples_per_s"]["median"])
        result["eval_one_process_speedup_vs_sequential"] = (e["batched"]["examples_per_s"]["median"]
                                                            / e["sequential"]["examples_per_s"]["median"])
    if "repro" in sections:
        try:
            result["noop_repro"] = bench_noop_repro(args)
            result["noop_repro_s"] = result["noop_repro"]["seconds"]["median"]
        except (RuntimeError, subprocess.SubprocessError, OSError) as e:  # report, keep the other rows
            result["noop_repro"] = {"error": str(e)[-3000:]}
            log(f"no-op repro failed: {str(e)[-500:]}")
    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result["bench_seconds"] = round(time.perf_counter() - start, 1)
    result["targets"] = targets(result)
    from toolcall.io import write_json

    write_json(args.out, result)
    print(table(result))
    print(f"\nwrote {args.out} ({result['bench_seconds']:.0f}s)")


def targets(r):
    t = {}
    if "train_speedup_vs_mlx_lm" in r:
        t["train_speedup_ge_1.5"] = r["train_speedup_vs_mlx_lm"] >= 1.5
    if "eval_speedup_vs_sequential" in r:
        t["eval_speedup_ge_5"] = r["eval_speedup_vs_sequential"] >= 5
        t["eval_outputs_identical"] = not r["eval"]["parsed_calls_differ"] and r["eval"]["sharded_equals_one_process"]
    if "noop_repro_s" in r:
        t["noop_repro_lt_5s"] = r["noop_repro_s"] < 5
    return t


def table(r):
    rows = [("measurement", "ours", "baseline", "ratio", "")]

    def f(x, nd=1):
        return "-" if x is None else f"{x:,.{nd}f}"

    def ratio(a, b, nd=2):
        return f"{a / b:.{nd}f}x" if a is not None and b else "-"

    if "matmul" in r:
        m, mm = r["matmul_gflops"], r["matmul"]
        rows.append(("float32 matmul 1024^3 GFLOP/s: OpenBLAS loaded vs MLX's bundled BLAS",
                     f(m["openblas"]), f(m["no_openblas"]), ratio(m["openblas"], m["no_openblas"], 1), ""))
        shape = "model_mlp_1664x576x1536"
        rows.append(("  model-shaped 1664x576x1536", f(mm["openblas"][shape]["median"]),
                     f(mm["no_openblas"][shape]["median"]),
                     ratio(mm["openblas"][shape]["median"], mm["no_openblas"][shape]["median"], 1), ""))
        rows.append(("  OpenBLAS 2 threads (default) vs OPENBLAS_NUM_THREADS=1, 1024^3", f(m["openblas"]),
                     f(m["openblas_1_thread"]), ratio(m["openblas"], m["openblas_1_thread"]), ""))
    if "ops" in r:
        o = r["ops"]
        for phase in ("prefill", "decode"):
            shape = (f"1 x {o['shape']['L']} tokens" if phase == "prefill"
                     else f"{o['shape']['B']} x 1 token over {o['shape']['L']} cached")
            rows.append((f"one block, {phase} ({shape}): ms per op, share", "", "", "", ""))
            for op, x in o[phase].items():
                rows.append((f"  {op}", f(x["ms"], 2), "", "", f"{100 * x['share']:.0f}%"))
        rows.append(("  MLX exp on CPU, ns per float32 element", f(o["exp_ns_per_element"], 2), "", "", ""))
    if "train" in r:
        t = r["train"]
        ok = "met" if r["targets"]["train_speedup_ge_1.5"] else "NOT met"
        o, b = t["ours"], t["mlx_lm"]
        rows.append((f"SFT tokens/s (prompt+completion), train_lora vs mlx_lm lora, {t['steps']} steps x {t['batch_size']}",
                     f(o["tokens_per_s"]["median"]), f(b["tokens_per_s"]["median"]),
                     ratio(o["tokens_per_s"]["median"], b["tokens_per_s"]["median"]), f"target >=1.5x: {ok}"))
        rows.append(("  same, steps after the first (compile excluded)", f(o["tokens_per_s_after_first_step"]["median"]),
                     f(b["tokens_per_s_after_first_step"]["median"]),
                     ratio(o["tokens_per_s_after_first_step"]["median"], b["tokens_per_s_after_first_step"]["median"]), ""))
        rows.append(("  peak MLX memory GB", f(o["peak_memory_gb"], 2), f(b["peak_memory_gb"], 2),
                     ratio(o["peak_memory_gb"], b["peak_memory_gb"]), ""))
        pw = t["padding_whole_train_file"]
        rows.append(("  padded positions: this slice | whole train file",
                     f"{100 * o['padding_fraction']:.0f}% | {100 * pw['ours']:.0f}%",
                     f"{100 * b['padding_fraction']:.0f}% | {100 * pw['mlx_lm']:.0f}%", "", ""))
        if "train_fraction_of_matmul_ceiling" in r:
            c = r["train_fraction_of_matmul_ceiling"]
            rows.append((f"  achieved GFLOP/s, % of matmul ceiling ({t['flops_per_token'] / 1e6:.0f} MFLOP/token)",
                         f"{o['achieved_gflops']:.0f} ({100 * c['ours']:.0f}%)",
                         f"{b['achieved_gflops']:.0f} ({100 * c['mlx_lm']:.0f}%)", "", ""))
        rows.append(("  system share of process CPU time (BLAS threads spinning in sched_yield)",
                     f"{100 * o['system_cpu_fraction']:.0f}%", f"{100 * b['system_cpu_fraction']:.0f}%", "", ""))
        if "plain_loss" in t:
            pl = t["plain_loss"]["tokens_per_s"]["median"]
            rows.append(("  our trainer+batches: completion-only head vs mlx-lm's full-vocab loss",
                         f(o["tokens_per_s"]["median"]), f(pl), ratio(o["tokens_per_s"]["median"], pl),
                         f"step losses max rel diff {t['loss_check']['max_rel_diff']:.1e}"))
        for name, label in (("ours_1_blas_thread", "OPENBLAS_NUM_THREADS=1"),
                            ("ours_blas_thread_timeout_4", "OPENBLAS_THREAD_TIMEOUT=4")):
            if name in t:
                x = t[name]["tokens_per_s"]["median"]
                rows.append((f"  lead: our trainer, default BLAS threads vs {label} (1 run)",
                             f(o["tokens_per_s"]["median"]), f(x), ratio(o["tokens_per_s"]["median"], x), ""))
        rows.append(("  mean step loss (mlx-lm: other batch order, +1 padding target per row)",
                     f(o["mean_loss"], 4), f(b["mean_loss"], 4), "", ""))
    if "eval" in r:
        e = r["eval"]
        ok = "met" if r["targets"]["eval_speedup_ge_5"] else "NOT met"
        rows.append((f"eval examples/s: eval stage ({e['workers']} processes x batch {e['batch_size']}) vs one at a"
                     f" time, {e['items']} items ({e['sequential_items']} run one at a time)",
                     f(e["sharded"]["examples_per_s"]["median"], 3), f(e["sequential"]["examples_per_s"]["median"], 3),
                     f"{r['eval_speedup_vs_sequential']:.2f}x", f"target >=5x: {ok}"))
        rows.append((f"  one process (batch {e['batch_size']}) vs one at a time",
                     f(e["batched"]["examples_per_s"]["median"], 3), f(e["sequential"]["examples_per_s"]["median"], 3),
                     f"{r['eval_one_process_speedup_vs_sequential']:.2f}x", ""))
        n = e["compared"]
        ident = "met" if r["targets"]["eval_outputs_identical"] else "NOT met"
        same = "all" if e["sharded_equals_one_process"] else "NOT all"
        rows.append(("  greedy outputs identical to one at a time: token ids | parsed calls",
                     f"{n - len(e['token_ids_differ'])}/{n} | {n - len(e['parsed_calls_differ'])}/{n}", "", "",
                     f"identical: {ident} ({same} {e['items']} equal to one process)"))
        bt, sq = e["batched"], e["sequential"]
        rows.append(("  prefill | decode seconds (batched: all items; sequential: subset)",
                     f"{f(bt['prefill_s']['median'])} | {f(bt['decode_s']['median'])}",
                     f"{f(sq['prefill_s']['median'])} | {f(sq['decode_s']['median'])}", "", ""))
        rows.append(("  generated tokens/s", f(bt["generated_tokens_per_s"]["median"]),
                     f(sq["generated_tokens_per_s"]["median"]),
                     ratio(bt["generated_tokens_per_s"]["median"], sq["generated_tokens_per_s"]["median"]),
                     f"mean {e['generated_tokens_mean']:.0f} tokens/item, {e['hit_max_tokens']} hit max_tokens"))
        for name, x in e.get("leads", {}).items():
            rows.append((f"  lead: {name}", f(x["examples_per_s"], 3), "", "",
                         f"{x['differ_from_default_batched']} differ from default, "
                         f"{x['differ_from_sequential']}/{n} from one at a time"))
    if "noop_repro_s" in r:
        ok = "met" if r["targets"]["noop_repro_lt_5s"] else "NOT met"
        rows.append(("no-op dvc repro seconds vs the 5 s target", f(r["noop_repro_s"], 2), "5.00",
                     ratio(r["noop_repro_s"], 5), f"target <5s: {ok}"))
        rows.append((f"  where: {r['noop_repro']['where'][:70]}", "", "", "",
                     f"dvc startup alone {r['noop_repro']['dvc_startup_s']:.2f}s"))
    if "profile" in r.get("train", {}):
        p = r["train"]["profile"]
        rows.append((f"training step profile, s per batch ({p['positions_per_batch']:.0f} positions,"
                     f" {p['completion_tokens_per_batch']:.0f} completion tokens)", "", "", "", ""))
        for k in ("body_forward", "head_loss_forward_completion", "head_loss_forward_all_positions",
                  "backward_ours", "forward_backward_ours", "forward_backward_plain",
                  "forward_backward_ours_stop_gradient", "optimizer_update", "step_uncompiled", "step_compiled",
                  "step_compiled_first_call"):
            rows.append((f"  {k}", f(p[k], 3), "", "", ""))
    widths = [max(len(str(row[i])) for row in rows) for i in range(5)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2], sys.argv[3])
    else:
        main()
