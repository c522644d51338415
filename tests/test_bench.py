"""make bench on the tiny model: bench.py writes the headline keys; a section run alone merges into the file.

Sizes are the smallest that exercise every arm (2 steps, 4 items); the real
numbers come from `make bench` on the real model. The no-op repro section is
left out: it runs the whole tiny DAG once (tests/test_pipeline.py does that).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_dpo import fixture_rows
from tiny_model import make_tiny_model
from toolcall.io import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def bench(work, *args):
    proc = subprocess.run([sys.executable, *map(str, args), "--model", work / "tiny", "--train", work / "train.jsonl",
                           "--test", work / "test.jsonl", "--params", work / "params.yaml", "--repeats", "1",
                           "--out", work / "bench.json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("bench")
    make_tiny_model(work / "tiny")
    rows = sorted(fixture_rows(), key=lambda r: len(json.dumps(r)))  # the shortest: fast steps
    write_jsonl(work / "train.jsonl", rows[:16])
    write_jsonl(work / "test.jsonl", rows[:4])
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"].update(batch_size=2, ranks=2, lora_layers=2, max_seq_len=4096, warmup=0)
    params["eval"].update(max_tokens=8, batch_size=4)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    return work


def test_bench_writes_every_headline_key_and_a_section_alone_merges(work):
    table = bench(work, "bench/bench.py", "--only", "train,eval", "--train-steps", "2", "--dp-steps", "2",
                  "--eval-items", "4", "--sequential-items", "2", "--max-tokens", "8")
    r = json.loads((work / "bench.json").read_text())
    assert r["train_speedup_vs_mlx_lm"] > 0 and r["train"]["ranks"] == 2
    assert r["dp_ranks"] == 2 and r["dp_loss_max_abs_diff"] < 1e-3  # two ranks, the losses of one process
    assert len(r["train"]["dp"]["step_losses_ranks"]) == 2
    assert r["eval_speedup_vs_sequential"] > 0
    assert r["eval_seconds"] == r["eval"]["sharded"]["seconds"]["median"] > 0
    # Each of the 4 items took at least one decode step, and a step reads all the weights.
    w = r["eval"]["work"]
    assert w["decode_steps"] >= 2 and w["decode_bytes"] > w["decode_steps"] * w["weight_bytes"]
    # The fast path (fused adapter, greedy's step, native kernels) gives the reference's outputs on the tiny model.
    assert r["greedy_agreement_fast_vs_reference"] == 1.0 and r["eval"]["fast_vs_reference"]["items"] == 4
    assert "train_ceiling_fraction" not in r and "eval_floor_seconds" not in r  # need the matmul (and memory) section
    assert "data parallel: 2 ranks vs one process" in table

    bench(work, "-m", "bench.matmul")  # alone: merged into the same file
    merged = json.loads((work / "bench.json").read_text())
    assert merged["train"] == r["train"] and merged["eval"] == r["eval"]  # the other sections are kept
    assert 0 < merged["train_ceiling_fraction"] == merged["train_fraction_of_matmul_ceiling"]["ours"]
    assert merged["sections"]["matmul"]["command"].startswith("python -m bench.matmul")
    assert "eval_floor_seconds" not in merged  # needs the memory section too

    bench(work, "-m", "bench.memory")
    merged = json.loads((work / "bench.json").read_text())
    assert merged["memory_gbps"]["all_cores"] > 0 and merged["eval"] == r["eval"]
    floor = merged["eval_floor"]
    assert merged["eval_floor_seconds"] == floor["seconds"] == (
        floor["prefill_s"] + max(floor["decode_compute_s"], floor["decode_memory_s"])) > 0
    assert merged["eval_fraction_of_floor"] == merged["eval_floor_seconds"] / merged["eval_seconds"]
    assert set(merged["targets"]) >= {"train_speedup_ge_3", "train_ceiling_fraction_ge_0.5",
                                      "dp_loss_max_abs_diff_le_1e-3", "eval_speedup_ge_5.5",
                                      "eval_fraction_of_floor_ge_0.6", "greedy_agreement_ge_0.98"}


def test_the_llamacpp_section_times_llama_cpp_and_the_eval_stage_on_the_same_items(work):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is an optional install (docs/performance.md)")
    from toolcall.model.gguf import write_gguf

    write_gguf(work / "tiny", work / "tiny.gguf", dtype="float32")
    table = bench(work, "-m", "bench.llamacpp", "--gguf", work / "tiny.gguf", "--eval-items", "4")
    r = json.loads((work / "bench.json").read_text())
    x = r["llamacpp"]
    assert x["items"] == 4 and x["seconds_llamacpp"] > 0 and x["seconds_ours"] > 0
    assert x["generated_llamacpp"] >= 4 and x["generated_ours"] >= 4  # every item decoded at least a token
    # float32 weights on both sides: llama.cpp's greedy tokens are ours on most items
    assert x["identical"] >= 3
    assert r["targets"]["llamacpp_ratio_ge_1"] == (r["llamacpp_ratio"] >= 1) and "llama.cpp" in table


def test_the_llamacpp_section_refuses_a_gguf_of_another_model(work, tmp_path):
    """No adapter given, so the GGUF must hold --model's weights: one of another model is refused before
    anything runs (llama-cpp-python need not be installed), and --model's own passes the check."""
    from bench.llamacpp import holds_base_weights
    from toolcall.model.gguf import write_gguf

    write_gguf(make_tiny_model(tmp_path / "other", seed=1), tmp_path / "other.gguf", dtype="float16")
    write_gguf(work / "tiny", tmp_path / "tiny16.gguf", dtype="float16")
    assert holds_base_weights(tmp_path / "tiny16.gguf", work / "tiny")
    assert not holds_base_weights(tmp_path / "other.gguf", work / "tiny")
    proc = subprocess.run([sys.executable, "-m", "bench.llamacpp", "--model", work / "tiny", "--gguf",
                           tmp_path / "other.gguf", "--test", work / "test.jsonl", "--params", work / "params.yaml",
                           "--out", tmp_path / "bench.json"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "holds tuned weights, not --model's, but --adapter is not given" in proc.stderr
    assert not (tmp_path / "bench.json").exists()


def test_eval_work_counts_each_pass_and_key_as_the_module_doc_says(tmp_path):
    """``floor.eval_work`` against a count pass by pass: an item cut at max_tokens samples no end-of-turn token."""
    from bench.common import model_shape
    from bench.floor import eval_work, weights
    from toolcall.model import kernels

    model = make_tiny_model(tmp_path / "tiny")
    s = model_shape(model)
    weight_bytes, itemsize = weights(model)
    assert weight_bytes == (model / "model.safetensors").stat().st_size and itemsize == 4
    prompts, generated, max_tokens = [5, 9], [3, 4], 4  # the second is cut at max_tokens
    body, head = s["layers"] * s["block_params"], s["vocab"] * s["hidden"]
    pair = s["layers"] * 4 * s["heads"] * s["head_dim"]
    prefill = decode = keys = 0
    for p, n in zip(prompts, generated):
        prefill += 2 * body * (p - 1) + pair * sum(range(1, p))  # token t (1-based) attends t keys
        for k in range(n + (n < max_tokens)):  # pass k attends the prompt and the k tokens before it
            decode += 2 * (body + head) + pair * (p + k)
            keys += p + k
    w = eval_work(model, prompts, generated, max_tokens, decode_steps=7)
    assert (w["prefill_flops"], w["decode_flops"]) == (prefill, decode)
    kv = 2 if kernels.active() else 4  # the native path's KV cache holds float16
    assert w["decode_bytes"] == 7 * weight_bytes + keys * s["layers"] * 2 * s["kv_heads"] * s["head_dim"] * kv
