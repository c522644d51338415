"""The train section's baseline: ``python -m mlx_lm lora`` on our rows, tokens and LoRA settings.

``prepare`` lays out what mlx-lm reads: a model directory (the weights
symlinked, a chat template that renders [prompt, completion] as their
concatenation), completions JSONL whose text comes from our PromptFormat (the
``data`` worker), a config YAML; and its argv. The ``lora`` worker runs
mlx-lm's own ``main()`` on them, observed through its training callback. No
section of its own: ``python -m bench.train`` runs it beside our trainer.
"""

import json
import sys
import time
from pathlib import Path

if not __package__:  # python bench/mlxlm.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import Recorder, batch_counter, load_rows, run_worker, rusage, worker_main
from bench.common import examples as sft_examples

# Renders [prompt, completion] as prompt + completion: mlx-lm's completions
# dataset then yields exactly our PromptFormat tokens (checked in the worker).
IDENTITY_TEMPLATE = (
    "{{ messages[0]['content'] }}{% if messages|length > 1 %}{{ messages[1]['content'] }}{% endif %}"
)


def prepare(args, indices, cfg, workdir):
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
    run_worker("mlxlm", "data", {"model": args.model, "train": args.train, "indices": indices,
                                 "out": str(work / "data" / "train.jsonl")})
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


def worker_data(spec):
    """mlx-lm's completions JSONL: each row's prompt and completion text as our PromptFormat renders them."""
    import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
    from mlx_lm.utils import load_tokenizer

    from toolcall.bfcl.rows import gold_calls
    from toolcall.calls.prompts import PromptFormat

    fmt = PromptFormat(load_tokenizer(Path(spec["model"])))
    rows = load_rows(spec["train"], spec["indices"])
    with open(spec["out"], "w") as f:
        for r in rows:
            prompt = fmt.prompt(r["messages"], r["functions"])
            completion = fmt.completion(r["messages"], r["functions"], gold_calls(r["ground_truth"]))
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return {"rows": len(rows)}


def worker_lora(spec):
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

    rec = Recorder()
    lora.get_reporting_callbacks = lambda *a, **k: rec
    counts = {"batches": 0, "padded_positions": 0, "real_tokens": 0}
    timing = {}
    real_train = lora.train

    def timed_train(*args, **kwargs):
        kwargs["iterate_batches"] = batch_counter(trainer.iterate_batches, counts, per_row=0)
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


WORKERS = {"data": worker_data, "lora": worker_lora}

if __name__ == "__main__" and not worker_main(sys.modules[__name__]):
    sys.exit("bench/mlxlm.py holds the train section's baseline; run it with python -m bench.train")
