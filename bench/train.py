"""Train section: SFT tokens/s of the train_sft stage's trainer vs ``python -m mlx_lm lora``, and data parallelism.

    python -m bench.train [--train-steps 6] [--dp-steps 20] [--repeats 3] [--out metrics/bench.json]

* SFT training tokens/s (prompt + completion tokens) of ``toolcall.train.trainer.train_lora``
  as the stage runs it (params ``sft.ranks`` data-parallel processes on a CPU)
  vs ``python -m mlx_lm lora`` (its own ``main()``, one process; with OpenBLAS
  loaded the same way, so the row measures the training code, not the BLAS)
  on the same rows, tokens, LoRA settings and iterations. Both run exactly
  one epoch of the slice, so both train on the same examples. Time = the
  trainer's own step time (batch building excluded on both sides), from its
  per-step report. Beside it: the same trainer with mlx-lm's full-vocabulary
  loss, a step profile, the padding of the whole training file.
* Data parallelism (``dp``): the first ``--dp-steps`` steps in one process and
  as ``--dp-ranks`` ranks on the same global batches: each step's loss (max
  abs difference) and the tokens/s ratio.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # python bench/train.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (ROOT, count_rows, evenly, f, load_rows, log, median, met, model_shape, rate_stats, ratio,
                          run_worker, rusage, section_main)
from bench.common import examples as sft_examples

# Renders [prompt, completion] as prompt + completion: mlx-lm's completions
# dataset then yields exactly our PromptFormat tokens (checked in the worker).
IDENTITY_TEMPLATE = (
    "{{ messages[0]['content'] }}{% if messages|length > 1 %}{{ messages[1]['content'] }}{% endif %}"
)


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


def worker_train(spec):
    """Our trainer (``arm=ours``) or the same trainer with mlx-lm's full-vocabulary loss (``plain``).

    ``ranks`` > 1: as that many data-parallel processes, as the train_sft stage
    runs (``launch.ensure_ranks``); rank 0 reports.
    """
    import toolcall  # noqa: F401
    import mlx.core as mx  # noqa: F401

    from toolcall.config import SftConfig
    from toolcall.model import lora
    from toolcall.train import launch, loss, trainer

    launch.ensure_ranks(spec["ranks"], "bench")

    rows = load_rows(spec["train"], spec["indices"])
    model, tokenizer = lora.load_model(spec["model"])
    examples = sft_examples(tokenizer, rows)
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
    u0, s0 = rusage()
    t0 = time.perf_counter()
    trainer.train_lora(model, examples, cfg.train(len(examples)))
    wall = time.perf_counter() - t0
    u1, s1 = rusage()
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
    ours = sft_examples(load_tokenizer(Path(spec["model"])), load_rows(spec["train"], spec["indices"]))
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
        timing["u0"], timing["s0"] = rusage()
        t0 = time.perf_counter()
        real_train(*args, **kwargs)
        timing["wall"] = time.perf_counter() - t0
        timing["u1"], timing["s1"] = rusage()

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

    from toolcall.config import SftConfig
    from toolcall.model import lora
    from toolcall.train import batches as batching, loss, trainer

    rows = load_rows(spec["train"], spec["indices"])
    model, tokenizer = lora.load_model(spec["model"])
    examples = sft_examples(tokenizer, rows)
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


def worker_padding(spec):
    """Padding over the whole training file: our length buckets vs mlx-lm's batches (file order:
    its length sort is a no-op, CacheDataset.itemlen counts dict keys, ml-explore/mlx-lm#596)."""
    from mlx_lm.utils import load_tokenizer

    from toolcall.io import read_jsonl

    rows = read_jsonl(spec["train"])
    lengths = [len(t) for t, _ in sft_examples(load_tokenizer(Path(spec["model"])), rows)]
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


def prepare_mlxlm(args, indices, cfg, workdir):
    """mlx-lm's inputs: model dir (symlinked weights, identity chat template), completions
    JSONL whose prompt/completion text comes from our PromptFormat, config YAML; and its argv."""
    import yaml

    work, model_dir = Path(workdir), args.model
    (work / "model").mkdir(parents=True)
    (work / "data").mkdir()
    for path in Path(model_dir).iterdir():
        if path.name != "tokenizer_config.json":
            (work / "model" / path.name).symlink_to(path.resolve())
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
        "from toolcall.calls.prompts import PromptFormat\n"
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


def run(args, params):
    from toolcall.config import SftConfig, from_params, seeded

    # The main study's first seed, as the ablation arms train at.
    sft = seeded(params["sft"], params["study"]["seeds"][0], "sft")
    cfg = dict(from_params(SftConfig, sft, "sft").__dict__)
    cfg.update(iters=args.train_steps, epochs=None, steps_per_report=1,
               warmup=min(cfg["warmup"], args.train_steps - 1))
    if cfg["grad_accumulation"] != 1:
        raise SystemExit("bench assumes sft.grad_accumulation == 1")
    n_rows = args.train_steps * cfg["batch_size"]
    indices = evenly(count_rows(args.train), n_rows)
    # "ours" is what the train_sft stage runs: params sft.ranks data-parallel processes on a CPU.
    spec = {"model": args.model, "train": args.train, "indices": indices, "cfg": cfg, "ranks": cfg["ranks"]}
    tmp = Path(tempfile.mkdtemp(prefix="bench-mlxlm-"))
    try:
        work, argv = prepare_mlxlm(args, indices, cfg, tmp / "mlxlm")
        runs = {"ours": [], "mlx_lm": []}
        for r in range(args.repeats):
            runs["ours"].append(run_worker("train", "train", {**spec, "arm": "ours"}))
            shutil.rmtree(work / "adapters", ignore_errors=True)
            runs["mlx_lm"].append(run_worker("train", "mlxlm", {**spec, "workdir": str(work), "argv": argv}))
            log(f"train {r + 1}/{args.repeats}: ours {runs['ours'][-1]['tokens'] / runs['ours'][-1]['train_seconds']:.1f}"
                f" tok/s, mlx-lm {runs['mlx_lm'][-1]['tokens'] / runs['mlx_lm'][-1]['train_seconds']:.1f} tok/s")
        extras = {}
        # Same trainer, same batches, mlx-lm's full-vocabulary loss: isolates our loss, checks its value.
        extras["plain_loss"] = [run_worker("train", "train", {**spec, "arm": "plain"})]
        log(f"train plain-loss arm: {extras['plain_loss'][0]['tokens'] / extras['plain_loss'][0]['train_seconds']:.1f} tok/s")
        if args.leads:
            for name, env in (("ours_1_blas_thread", {"OPENBLAS_NUM_THREADS": "1"}),
                              ("ours_blas_thread_timeout_4", {"OPENBLAS_THREAD_TIMEOUT": "4"})):
                extras[name] = [run_worker("train", "train", {**spec, "arm": "ours", "ranks": 1}, env)]
                log(f"train lead {name}: {extras[name][0]['tokens'] / extras[name][0]['train_seconds']:.1f} tok/s")
        if not args.no_profile:
            extras["profile"] = run_worker("train", "profile", {**spec, "batches": args.profile_batches, "reps": 2})
            log("train profile done")
        full = run_worker("train", "padding", {"model": args.model, "train": args.train, "batch_size": cfg["batch_size"],
                                      "max_seq_len": cfg["max_seq_len"]})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shape = model_shape(args.model)
    lengths = runs["ours"][0]["lengths"]
    flops, flops_2x = train_flops(shape, lengths, cfg["lora_layers"], runs["ours"][0]["lora_parameters"])
    out = {
        "rows": n_rows, "steps": args.train_steps, "batch_size": cfg["batch_size"], "max_seq_len": cfg["max_seq_len"],
        "ranks": cfg["ranks"],
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
    out["dp"] = data_parallel(args, params, cfg, shape)
    return {"train": out,
            "train_speedup_vs_mlx_lm": out["ours"]["tokens_per_s"]["median"] / out["mlx_lm"]["tokens_per_s"]["median"],
            "dp_ranks": out["dp"]["ranks"], "dp_loss_max_abs_diff": out["dp"]["loss_max_abs_diff"],
            "dp_tokens_per_s_ratio": out["dp"]["tokens_per_s_ratio"]}



def data_parallel(args, params, cfg, shape):
    """The first ``--dp-steps`` steps in one process and as ``--dp-ranks`` ranks, same global batches."""
    ranks = args.dp_ranks or cfg["ranks"]
    dp_cfg = {**cfg, "iters": args.dp_steps, "warmup": min(cfg["warmup"], args.dp_steps - 1)}
    indices = evenly(count_rows(args.train), args.dp_steps * cfg["batch_size"])
    spec = {"model": args.model, "train": args.train, "indices": indices, "cfg": dp_cfg, "arm": "ours"}
    runs = {"one_process": [], "ranks": []}
    for r in range(args.dp_repeats):
        runs["one_process"].append(run_worker("train", "train", {**spec, "ranks": 1}))
        runs["ranks"].append(run_worker("train", "train", {**spec, "ranks": ranks}))
        log(f"train dp {r + 1}/{args.dp_repeats}: one process "
            f"{runs['one_process'][-1]['tokens'] / runs['one_process'][-1]['train_seconds']:.1f} tok/s, {ranks} ranks "
            f"{runs['ranks'][-1]['tokens'] / runs['ranks'][-1]['train_seconds']:.1f} tok/s")
    one, many = runs["one_process"][0]["losses"], runs["ranks"][0]["losses"]
    tps = {arm: rate_stats([x["tokens"] / x["train_seconds"] for x in rs]) for arm, rs in runs.items()}
    return {
        "ranks": ranks, "steps": args.dp_steps, "rows": len(indices), "batch_size": cfg["batch_size"],
        "max_seq_len": cfg["max_seq_len"],
        "step_losses_one_process": one, "step_losses_ranks": many,
        "loss_max_abs_diff": max(abs(a - b) for a, b in zip(one, many)),
        "tokens_per_s_one_process": tps["one_process"], "tokens_per_s_ranks": tps["ranks"],
        "tokens_per_s_ratio": tps["ranks"]["median"] / tps["one_process"]["median"],
        "peak_memory_gb_per_rank": max(x["peak_memory_gb"] for x in runs["ranks"]),
    }


WORKERS = {"train": worker_train, "mlxlm": worker_mlxlm, "profile": worker_profile, "padding": worker_padding}


def add_args(ap):
    ap.add_argument("--train-steps", type=int, default=6, help="steps of sft.batch_size rows: one epoch of the slice")
    ap.add_argument("--profile-batches", type=int, default=1)
    ap.add_argument("--no-profile", action="store_true", help="skip the training step profile")
    ap.add_argument("--dp-steps", type=int, default=20, help="steps of the one process vs ranks loss check")
    ap.add_argument("--dp-ranks", type=int, default=None, help="default: params sft.ranks")
    ap.add_argument("--dp-repeats", type=int, default=1)


def rows(r):
    if "train" not in r:
        return []
    t = r["train"]
    o, b = t["ours"], t["mlx_lm"]
    out = [(f"SFT tokens/s (prompt+completion), train_lora ({t['ranks']} ranks) vs mlx_lm lora, "
            f"{t['steps']} steps x {t['batch_size']}",
            f(o["tokens_per_s"]["median"]), f(b["tokens_per_s"]["median"]),
            ratio(o["tokens_per_s"]["median"], b["tokens_per_s"]["median"]),
            f"target >=3x: {met(r, 'train_speedup_ge_3')}"),
           ("  same, steps after the first (compile excluded)", f(o["tokens_per_s_after_first_step"]["median"]),
            f(b["tokens_per_s_after_first_step"]["median"]),
            ratio(o["tokens_per_s_after_first_step"]["median"], b["tokens_per_s_after_first_step"]["median"]), ""),
           ("  peak MLX memory GB (per process)", f(o["peak_memory_gb"], 2), f(b["peak_memory_gb"], 2),
            ratio(o["peak_memory_gb"], b["peak_memory_gb"]), "")]
    pw = t["padding_whole_train_file"]
    out.append(("  padded positions: this slice (rank 0's share) | whole train file",
                f"{100 * o['padding_fraction']:.0f}% | {100 * pw['ours']:.0f}%",
                f"{100 * b['padding_fraction']:.0f}% | {100 * pw['mlx_lm']:.0f}%", "", ""))
    if "train_fraction_of_matmul_ceiling" in r:
        c = r["train_fraction_of_matmul_ceiling"]
        out.append((f"  achieved GFLOP/s, % of matmul ceiling ({t['flops_per_token'] / 1e6:.0f} MFLOP/token)",
                    f"{o['achieved_gflops']:.0f} ({100 * c['ours']:.0f}%)",
                    f"{b['achieved_gflops']:.0f} ({100 * c['mlx_lm']:.0f}%)", "",
                    f"target >=50%: {met(r, 'train_ceiling_fraction_ge_0.5')}"))
    out.append(("  system share of process CPU time (BLAS threads spinning in sched_yield)",
                f"{100 * o['system_cpu_fraction']:.0f}%", f"{100 * b['system_cpu_fraction']:.0f}%", "", ""))
    if "plain_loss" in t:
        pl = t["plain_loss"]["tokens_per_s"]["median"]
        out.append(("  our trainer+batches: completion-only head vs mlx-lm's full-vocab loss",
                    f(o["tokens_per_s"]["median"]), f(pl), ratio(o["tokens_per_s"]["median"], pl),
                    f"step losses max rel diff {t['loss_check']['max_rel_diff']:.1e}"))
    dp = t["dp"]
    one, many = dp["tokens_per_s_one_process"]["median"], dp["tokens_per_s_ranks"]["median"]
    out.append((f"  data parallel: {dp['ranks']} ranks vs one process, first {dp['steps']} steps, tokens/s",
                f(many), f(one), ratio(many, one),
                f"step losses max abs diff {dp['loss_max_abs_diff']:.1e}: "
                f"{met(r, 'dp_loss_max_abs_diff_le_1e-3')} (<=1e-3)"))
    for name, label in (("ours_1_blas_thread", "OPENBLAS_NUM_THREADS=1"),
                        ("ours_blas_thread_timeout_4", "OPENBLAS_THREAD_TIMEOUT=4")):
        if name in t:
            x = t[name]["tokens_per_s"]["median"]
            out.append((f"  lead: one process, default BLAS threads vs {label} (1 run)", f(one), f(x),
                        ratio(one, x), ""))
    out.append(("  mean step loss (mlx-lm: other batch order, +1 padding target per row)",
                f(o["mean_loss"], 4), f(b["mean_loss"], 4), "", ""))
    if "profile" in t:
        p = t["profile"]
        out.append((f"training step profile (one process), s per batch ({p['positions_per_batch']:.0f} positions,"
                    f" {p['completion_tokens_per_batch']:.0f} completion tokens)", "", "", "", ""))
        for k in ("body_forward", "head_loss_forward_completion", "head_loss_forward_all_positions",
                  "backward_ours", "forward_backward_ours", "forward_backward_plain",
                  "forward_backward_ours_stop_gradient", "optimizer_update", "step_uncompiled", "step_compiled",
                  "step_compiled_first_call"):
            out.append((f"  {k}", f(p[k], 3), "", "", ""))
    return out


if __name__ == "__main__":
    section_main(sys.modules[__name__])
