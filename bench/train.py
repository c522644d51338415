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
  loss, the padding of the whole training file.
* Data parallelism (``dp``): the first ``--dp-steps`` steps in one process and
  as ``--dp-ranks`` ranks on the same global batches: each step's loss (max
  abs difference) and the tokens/s ratio.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

if not __package__:  # python bench/train.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import mlxlm
from bench.common import (Recorder, batch_counter, count_rows, evenly, f, load_rows, log, median, met, model_shape,
                          rate_stats, ratio, run_worker, rusage, section_main)
from bench.common import examples as sft_examples


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
    rec = Recorder()

    class Callback(trainer._Reports):
        def on_train_loss_report(self, info):
            rec.on_train_loss_report(info)

    trainer._Reports = Callback
    counts = {"batches": 0, "padded_positions": 0, "real_tokens": 0}
    trainer.iterate_batches = batch_counter(trainer.iterate_batches, counts, per_row=1)
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
    import dataclasses

    # The main study's first seed, as the ablation arms train at.
    cfg = dataclasses.asdict(params("sft", seed=params("study").seeds[0]))
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
        work, argv = mlxlm.prepare(args, indices, cfg, tmp / "mlxlm")
        runs = {"ours": [], "mlx_lm": []}
        for r in range(args.repeats):
            runs["ours"].append(run_worker("train", "train", {**spec, "arm": "ours"}))
            shutil.rmtree(work / "adapters", ignore_errors=True)
            runs["mlx_lm"].append(run_worker("mlxlm", "lora", {**spec, "workdir": str(work), "argv": argv}))
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
        out[arm] = train_summary(rs, shape, cfg, flops)
    if "plain_loss" in extras:
        a, b = runs["ours"][0]["losses"], extras["plain_loss"][0]["losses"]
        out["loss_check"] = {
            "ours_step_losses": a, "plain_step_losses": b,
            "max_abs_diff": max(abs(x - y) for x, y in zip(a, b)),
            "max_rel_diff": max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)),
        }
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


WORKERS = {"train": worker_train, "padding": worker_padding}


def add_args(ap):
    ap.add_argument("--train-steps", type=int, default=6, help="steps of sft.batch_size rows: one epoch of the slice")
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
    return out


if __name__ == "__main__":
    section_main(sys.modules[__name__])
