"""Eval section: examples/s of the eval stage vs one prompt at a time and vs its floor; fast vs reference outputs.

    python -m bench.eval [--eval-items 64] [--sequential-items 6] [--agreement-items N] [--adapter models/sft/s0]

* Examples/s of what the eval stage runs (``toolcall.evaluate.sharding.generate_sharded``:
  batched ``toolcall.evaluate.generation.generate`` in one process per core, model
  loading included), and of batched ``generate`` in one process, vs one prompt
  at a time through ``mlx_lm.stream_generate`` (the engine of
  ``mlx_lm.generate``), greedy, same max_tokens and stop tokens; token ids
  compared item by item.
* The work the eval stage's items need (``bench/floor.py``: FLOPs, and bytes
  over the decode steps its processes ran), which ``common.derive`` prices at
  the matmul and memory sections' ceilings: ``eval_floor_seconds`` and
  ``eval_fraction_of_floor`` (floor / ``eval_seconds``).
* ``greedy_agreement_fast_vs_reference``: the eval stage's path run twice on
  ``--agreement-items`` test rows (default: all), as it runs (the adapter
  fused, greedy's decode step, the native kernels) and as the reference (the
  adapter unfused, mlx-lm's decode step with its log-softmax,
  ``TOOLCALL_NATIVE=0``: MLX's own ops): the fraction of items whose greedy
  output is identical, and each arm's correct count.
"""

import sys
import time
from pathlib import Path

if not __package__:  # python bench/eval.py
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import (count_rows, evenly, f, load_rows, log, met, rate_stats, ratio, run_worker,
                          section_main)
from bench.floor import counted_generate, eval_work

# The switch to MLX's own ops (the reference path) where native kernels would run.
REFERENCE_ENV = {"TOOLCALL_NATIVE": "0"}


def worker(spec):
    """Greedy outputs and timings of one eval arm: ``batched`` (the pipeline's
    ``generate``) or ``sequential`` (``mlx_lm.stream_generate``, one prompt at a time)."""
    import inspect

    import toolcall  # noqa: F401
    import mlx.core as mx

    from toolcall.calls.prompts import PromptFormat
    from toolcall.evaluate import generation
    from toolcall.model.lora import load_model

    # One process batched is the eval stage's path (the adapter fused); one at a time, plain mlx-lm's.
    model, tokenizer = load_model(spec["model"], spec.get("adapter"), fused=spec["arm"] == "batched")
    fmt = PromptFormat(tokenizer)
    rows = load_rows(spec["test"], spec["indices"])
    prompts = [fmt.encode(fmt.prompt(r["messages"], r["functions"])) for r in rows]
    max_tokens = spec["max_tokens"]
    out = {"prompt_tokens": [len(p) for p in prompts]}
    if spec["arm"] == "sharded":  # what the eval stage runs: one process per core
        from toolcall.evaluate.sharding import generate_sharded

        generate_sharded(spec["model"], spec.get("adapter"), prompts[:2], workers=spec["workers"], max_tokens=4,
                         **spec.get("kwargs", {}))
        t0 = time.perf_counter()  # timed from here: the workers' model loading is part of the eval's cost
        res = generate_sharded(spec["model"], spec.get("adapter"), prompts, workers=spec["workers"],
                               max_tokens=max_tokens, return_tokens=True, generator=counted_generate,
                               **spec.get("kwargs", {}))
        out["seconds"] = time.perf_counter() - t0
        out["decode_steps"] = sum(dict(r[3] for r in res).values())  # each process's, once
        out["tokens"] = [list(map(int, r[2])) for r in res]
        out["texts"] = [r[0] for r in res]
        out["generated"] = [r[1] for r in res]
    elif spec["arm"] == "batched":
        kwargs = dict(spec.get("kwargs", {}))
        counters = []

        def observed(real):
            class Observed(real):  # keeps the prefill/decode split mlx-lm already counts
                def close(self):
                    counters.append(self._counters)
                    super().close()

            return Observed

        for name in ("BatchGenerator", "GreedyBatchGenerator"):  # whichever generate picks
            setattr(generation, name, observed(getattr(generation, name)))
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


def _generate_variant(model, tokenizer, prompts, max_tokens=256, batch_size=32, prefill_batch_size=8,
                      order="longest", return_tokens=True):
    """``toolcall.evaluate.generation.generate`` with its fixed choices as knobs, for the eval sweep."""
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


def run(args, params):
    """Batched over ``--eval-items`` rows; sequential over an evenly spread subset of them.

    One-at-a-time generation of an item does not depend on the other items, so
    its cost on the subset gives its cost on every item: seconds per prompt
    token (prefill) and per generated token (decode), applied to the prompts and
    the (identical, checked on the subset) output lengths of all items. Batched
    throughput does depend on how many items share the batches, so that arm runs
    on all of them. With ``--sequential-items == --eval-items`` nothing is estimated.
    """
    total = count_rows(args.test)
    indices = evenly(total, args.eval_items)
    n_seq = min(args.sequential_items, args.eval_items)
    sub = evenly(args.eval_items, n_seq)  # positions in ``indices``
    ev = params("eval")
    max_tokens = args.max_tokens or ev.max_tokens
    batch_size = ev.batch_size
    from toolcall.evaluate.sharding import resolve_workers

    workers = args.workers or resolve_workers(ev.workers, args.model, batch_size,
                                              max_tokens + longest_prompt(args))
    spec = {"model": args.model, "adapter": args.adapter, "test": args.test, "max_tokens": max_tokens}
    runs = {"sharded": [], "batched": [], "sequential": []}
    for r in range(args.repeats):
        runs["sharded"].append(run_worker("eval", "eval", {**spec, "indices": indices, "arm": "sharded",
                                                           "workers": workers, "kwargs": {"batch_size": batch_size}}))
        runs["batched"].append(run_worker("eval", "eval", {**spec, "indices": indices, "arm": "batched",
                                                           "kwargs": {"batch_size": batch_size}}))
        msg = (f"eval {r + 1}/{args.repeats}: {workers} processes {args.eval_items} items "
               f"{runs['sharded'][-1]['seconds']:.1f}s, one process {runs['batched'][-1]['seconds']:.1f}s")
        if r < min(args.sequential_repeats or args.repeats, args.repeats):
            runs["sequential"].append(run_worker("eval", "eval", {**spec, "indices": [indices[i] for i in sub],
                                                                  "arm": "sequential"}))
            msg += f", sequential {n_seq} items {runs['sequential'][-1]['seconds']:.1f}s"
        log(msg)
    first = runs["batched"][0]
    prompt_tokens, generated = first["prompt_tokens"], first["generated"]
    sharded = runs["sharded"]

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
        from toolcall.calls.parsing import parse_calls

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

    out = {
        "items": args.eval_items, "sequential_items": n_seq, "max_tokens": max_tokens, "batch_size": batch_size,
        "workers": workers, "adapter": args.adapter, "prompt_tokens_mean": sum(prompt_tokens) / len(prompt_tokens),
        "generated_tokens_mean": sum(generated) / len(generated),
        "hit_max_tokens": sum(g >= max_tokens for g in generated),
        "sharded": {**throughput(sharded), "decode_steps": sharded[0]["decode_steps"]},
        "work": eval_work(args.model, sharded[0]["prompt_tokens"], sharded[0]["generated"], max_tokens,
                          sharded[0]["decode_steps"]),
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
            res = run_worker("eval", "eval", {**spec, "indices": indices, "arm": "batched", "variant": True,
                                              "kwargs": kw})
            ids, texts = differing(res)
            sweep[name] = {"examples_per_s": args.eval_items / res["seconds"], "seconds": res["seconds"],
                           "differ_from_sequential": len(ids),
                           "differ_from_default_batched": sum(a != b for a, b in zip(res["texts"], first["texts"])),
                           **kw}
            log(f"eval lead {name}: {sweep[name]['examples_per_s']:.3f} ex/s")
        out["leads"] = sweep
    out["fast_vs_reference"] = fast_vs_reference(args, spec, workers, batch_size, indices, sharded[0])
    return {"eval": out, "eval_seconds": out["sharded"]["seconds"]["median"],
            "eval_speedup_vs_sequential": out["sharded"]["examples_per_s"]["median"]
            / out["sequential"]["examples_per_s"]["median"],
            "eval_one_process_speedup_vs_sequential": out["batched"]["examples_per_s"]["median"]
            / out["sequential"]["examples_per_s"]["median"],
            "greedy_agreement_fast_vs_reference": out["fast_vs_reference"]["agreement"]}


WORKERS = {"eval": worker}


def add_args(ap):
    ap.add_argument("--eval-items", type=int, default=64, help="batched eval rows (evenly spread over --test)")
    ap.add_argument("--sequential-items", type=int, default=6,
                    help="of those, the rows also run one at a time (see run)")
    ap.add_argument("--workers", type=int, default=None, help="eval stage processes (default: params eval.workers)")
    ap.add_argument("--sequential-repeats", type=int, default=None,
                    help="repeats of the slow one-at-a-time eval arm (default: --repeats)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default: params eval.max_tokens")
    ap.add_argument("--agreement-items", type=int, default=None,
                    help="test rows run with the fast and the reference ops (default: all)")


def longest_prompt(args):
    """Tokens of the longest test prompt (sizes the memory cap of eval.workers: auto)."""
    from mlx_lm.utils import load_tokenizer

    from toolcall.calls.prompts import PromptFormat
    from toolcall.io import read_jsonl

    fmt = PromptFormat(load_tokenizer(Path(args.model)))
    return max(len(fmt.encode(fmt.prompt(r["messages"], r["functions"]))) for r in read_jsonl(args.test))


def fast_vs_reference(args, spec, workers, batch_size, indices, fast_run):
    """The eval stage's path as it runs and as the reference (module doc) on the same rows."""
    from toolcall.evaluate.score import score_output
    from toolcall.io import read_jsonl

    rows = read_jsonl(args.test)
    chosen = list(range(len(rows))) if args.agreement_items is None else evenly(len(rows), args.agreement_items)
    arm = {**spec, "indices": chosen, "arm": "sharded", "workers": workers, "kwargs": {"batch_size": batch_size}}
    fast = fast_run if chosen == indices else run_worker("eval", "eval", arm)
    reference = run_worker("eval", "eval", {**arm, "kwargs": {**arm["kwargs"], "reference": True}},
                           env=REFERENCE_ENV)
    same = [a == b for a, b in zip(fast["tokens"], reference["tokens"])]
    correct = {name: sum(score_output(rows[i], text)["valid"] for i, text in zip(chosen, run["texts"]))
               for name, run in (("fast", fast), ("reference", reference))}
    log(f"eval fast vs reference: {sum(same)}/{len(same)} identical, correct {correct['fast']} vs "
        f"{correct['reference']}")
    return {"items": len(chosen), "identical": sum(same), "agreement": sum(same) / len(same),
            "differ": [chosen[j] for j, s in enumerate(same) if not s],
            "correct_fast": correct["fast"], "correct_reference": correct["reference"],
            "seconds_fast": fast["seconds"], "seconds_reference": reference["seconds"]}


def rows(r):
    if "eval" not in r:
        return []
    e = r["eval"]
    out = [(f"eval examples/s: eval stage ({e['workers']} processes x batch {e['batch_size']}) vs one at a"
            f" time, {e['items']} items ({e['sequential_items']} run one at a time)",
            f(e["sharded"]["examples_per_s"]["median"], 3), f(e["sequential"]["examples_per_s"]["median"], 3),
            f"{r['eval_speedup_vs_sequential']:.2f}x", f"target >=5.5x: {met(r, 'eval_speedup_ge_5.5')}"),
           (f"  one process (batch {e['batch_size']}) vs one at a time",
            f(e["batched"]["examples_per_s"]["median"], 3), f(e["sequential"]["examples_per_s"]["median"], 3),
            f"{r['eval_one_process_speedup_vs_sequential']:.2f}x", "")]
    if "eval_floor_seconds" in r:
        fl = r["eval_floor"]
        out.append((f"  eval stage seconds vs its floor: prefill {fl['prefill_s']:.1f}s + decode max(compute "
                     f"{fl['decode_compute_s']:.1f}s, memory {fl['decode_memory_s']:.1f}s)",
                     f(r["eval_seconds"]), f(r["eval_floor_seconds"]), f"{r['eval_fraction_of_floor']:.2f}",
                     f"target >=0.6: {met(r, 'eval_fraction_of_floor_ge_0.6')}"))
    n = e["compared"]
    same = "all" if e["sharded_equals_one_process"] else "NOT all"
    out.append(("  greedy outputs identical to one at a time: token ids | parsed calls",
                f"{n - len(e['token_ids_differ'])}/{n} | {n - len(e['parsed_calls_differ'])}/{n}", "", "",
                f"identical: {met(r, 'eval_outputs_identical')} ({same} {e['items']} equal to one process)"))
    a = e["fast_vs_reference"]
    out.append((f"  greedy outputs identical, fast ops vs TOOLCALL_NATIVE=0, {a['items']} items",
                f"{a['identical']}/{a['items']}", "", f"{100 * a['agreement']:.1f}%",
                f"target >=98%: {met(r, 'greedy_agreement_ge_0.98')}; correct {a['correct_fast']} vs "
                f"{a['correct_reference']}"))
    bt, sq = e["batched"], e["sequential"]
    out.append(("  prefill | decode seconds (batched: all items; sequential: subset)",
                f"{f(bt['prefill_s']['median'])} | {f(bt['decode_s']['median'])}",
                f"{f(sq['prefill_s']['median'])} | {f(sq['decode_s']['median'])}", "", ""))
    out.append(("  generated tokens/s", f(bt["generated_tokens_per_s"]["median"]),
                f(sq["generated_tokens_per_s"]["median"]),
                ratio(bt["generated_tokens_per_s"]["median"], sq["generated_tokens_per_s"]["median"]),
                f"mean {e['generated_tokens_mean']:.0f} tokens/item, {e['hit_max_tokens']} hit max_tokens"))
    for name, x in e.get("leads", {}).items():
        out.append((f"  lead: {name}", f(x["examples_per_s"], 3), "", "",
                    f"{x['differ_from_default_batched']} differ from default, "
                    f"{x['differ_from_sequential']}/{n} from one at a time"))
    return out


if __name__ == "__main__":
    section_main(sys.modules[__name__])
