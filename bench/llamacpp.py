"""llama.cpp section: the exported GGUF through llama.cpp vs the eval stage's path, on the same items.

    pip install llama-cpp-python   # optional: no stage or test needs it (~17 min to build on 2 cores)
    python -m bench.llamacpp --adapter models/sft/s0 [--gguf models/export/sft/model.gguf] [--eval-items 64]

Both decode greedily the same prompt token ids (ours: llama.cpp's tokenizer
gives the same ids on these prompts) up to ``eval.max_tokens``, stopping at
the same end-of-turn tokens. llama.cpp runs one prompt at a time through
llama-cpp-python's ``Llama.generate`` (which keeps the KV cache of the
prefix a prompt shares with the one before), on every core; ours is what the
eval stage runs (``generate_sharded``, as ``bench.eval``'s sharded arm), the
adapter fused into float32 weights, where the GGUF holds float16 ones (the
export's): a few outputs may differ, counted. ``llamacpp_ratio`` = llama.cpp's
seconds / ours (≥ 1: ours is the faster way to score); medians of
``--repeats``, the arms interleaved. The GGUF must be the export of
``--adapter``'s model (``make export`` writes models/export/sft/ from
models/sft/s0), or of ``--model`` itself when no adapter is given: the section
refuses a GGUF whose last block does not match (``holds_base_weights``).
"""

import json
import os
import statistics
import sys
import time
from pathlib import Path

if not __package__:  # python bench/llamacpp.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import ROOT, count_rows, evenly, f, log, run_worker, section_main

# Beside another process, llama.cpp's OpenMP threads spin-wait for each other (2 tok/s instead of ~40).
LLAMA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def worker(spec):
    """Greedy token ids and the seconds of llama.cpp over the spec's rows, one prompt at a time."""
    from llama_cpp import Llama
    from mlx_lm.utils import load_tokenizer

    from bench.common import load_rows
    from toolcall.calls.prompts import PromptFormat

    tokenizer = load_tokenizer(Path(spec["model"]))
    fmt = PromptFormat(tokenizer)
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"]))
               for r in load_rows(spec["test"], spec["indices"])]
    stop, max_tokens = set(tokenizer.eos_token_ids), spec["max_tokens"]
    llm = Llama(model_path=spec["gguf"], n_ctx=max(map(len, prompts)) + max_tokens, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], verbose=False)

    def one(prompt, n):
        out = []
        for token in llm.generate(prompt, temp=0.0, repeat_penalty=1.0):
            if token in stop:
                break
            out.append(int(token))
            if len(out) == n:
                break
        return out

    one(prompts[0], 4)  # warm-up
    t0 = time.perf_counter()
    tokens = [one(p, max_tokens) for p in prompts]
    return {"seconds": time.perf_counter() - t0, "tokens": tokens, "generated": [len(t) for t in tokens],
            "prompt_tokens": [len(p) for p in prompts]}


def holds_base_weights(gguf, model_dir):
    """Whether ``gguf`` holds ``model_dir``'s own weights (to float16): its last block's value projection,
    which LoRA tunes (the last ``sft.lora_layers`` blocks, q and v at least), is compared."""
    import mlx.core as mx

    last = json.loads((Path(model_dir) / "config.json").read_text())["num_hidden_layers"] - 1
    ours = mx.load(str(gguf))[f"blk.{last}.attn_v.weight"]
    name = f"model.layers.{last}.self_attn.v_proj.weight"
    for shard in sorted(Path(model_dir).glob("*.safetensors")):
        weights = mx.load(str(shard))
        if name in weights:
            base = weights[name].astype(ours.dtype)
            return base.shape == ours.shape and mx.array_equal(base, ours).item()
    raise SystemExit(f"bench.llamacpp: {model_dir} has no {name}")


def run(args, params):
    if not Path(args.gguf).exists():
        raise SystemExit(f"bench.llamacpp: no GGUF at {args.gguf}: run the export stage (make export)")
    if holds_base_weights(args.gguf, args.model) != (args.adapter is None):
        held = "--model's own weights" if args.adapter else "tuned weights, not --model's"
        raise SystemExit(f"bench.llamacpp: {args.gguf} holds {held}, but --adapter is {args.adapter or 'not given'}: "
                         "the GGUF must be the export of the model eval runs (e.g. --adapter models/sft/s0 "
                         "with models/export/sft/model.gguf)")
    try:
        import llama_cpp
    except ImportError:
        raise SystemExit("bench.llamacpp: llama-cpp-python is not installed (pip install llama-cpp-python)")
    from bench.eval import longest_prompt
    from toolcall.evaluate.sharding import resolve_workers

    ev = params("eval")
    indices = evenly(count_rows(args.test), args.eval_items)
    threads = len(os.sched_getaffinity(0))
    spec = {"model": args.model, "test": args.test, "indices": indices, "max_tokens": ev.max_tokens}
    workers = resolve_workers(ev.workers, args.model, ev.batch_size, ev.max_tokens + longest_prompt(args))
    runs = {"llamacpp": [], "ours": []}
    for r in range(args.repeats):
        runs["llamacpp"].append(run_worker("llamacpp", "llamacpp", {**spec, "gguf": args.gguf, "threads": threads},
                                           env=LLAMA_ENV))
        runs["ours"].append(run_worker("eval", "eval", {**spec, "adapter": args.adapter, "arm": "sharded",
                                                        "workers": workers, "kwargs": {"batch_size": ev.batch_size}}))
        log(f"llamacpp {r + 1}/{args.repeats}: {len(indices)} items, llama.cpp {runs['llamacpp'][-1]['seconds']:.1f}s, "
            f"ours {runs['ours'][-1]['seconds']:.1f}s")
    seconds = {arm: statistics.median(x["seconds"] for x in runs[arm]) for arm in runs}
    same = [a == b for a, b in zip(runs["llamacpp"][0]["tokens"], runs["ours"][0]["tokens"])]
    return {"llamacpp": {"items": len(indices), "test": Path(args.test).name, "gguf": Path(args.gguf).name,
                         "llama_cpp_python": llama_cpp.__version__, "threads": threads, "workers": workers,
                         "max_tokens": ev.max_tokens, "seconds_llamacpp": round(seconds["llamacpp"], 1),
                         "seconds_ours": round(seconds["ours"], 1), "identical": sum(same),
                         "generated_llamacpp": sum(runs["llamacpp"][0]["generated"]),
                         "generated_ours": sum(runs["ours"][0]["generated"]), "repeats": args.repeats},
            "llamacpp_ratio": round(seconds["llamacpp"] / seconds["ours"], 3)}


WORKERS = {"llamacpp": worker}


def add_args(ap):
    ap.add_argument("--gguf", default=str(ROOT / "models" / "export" / "sft" / "model.gguf"))
    ap.add_argument("--eval-items", type=int, default=64, help="test rows (evenly spread over --test)")


def rows(r):
    if "llamacpp" not in r:
        return []
    x = r["llamacpp"]
    return [(f"eval seconds, the eval stage's path vs llama.cpp ({x['gguf']}, one prompt at a time, "
             f"{x['threads']} threads): {x['items']} test items",
             f(x["seconds_ours"], 1), f(x["seconds_llamacpp"], 1), f"{r['llamacpp_ratio']:.2f}x",
             f"identical {x['identical']}/{x['items']}")]


if __name__ == "__main__":
    section_main(sys.modules[__name__])
