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
    # No native kernel in this branch: the fast and the reference path are one path.
    assert r["greedy_agreement_fast_vs_reference"] == 1.0 and r["eval"]["fast_vs_reference"]["items"] == 4
    assert "train_ceiling_fraction" not in r  # needs the matmul section
    assert "data parallel: 2 ranks vs one process" in table

    bench(work, "-m", "bench.matmul")  # alone: merged into the same file
    merged = json.loads((work / "bench.json").read_text())
    assert merged["train"] == r["train"] and merged["eval"] == r["eval"]  # the other sections are kept
    assert 0 < merged["train_ceiling_fraction"] == merged["train_fraction_of_matmul_ceiling"]["ours"]
    assert merged["sections"]["matmul"]["command"].startswith("python -m bench.matmul")
    assert set(merged["targets"]) >= {"train_speedup_ge_3", "train_ceiling_fraction_ge_0.5",
                                      "dp_loss_max_abs_diff_le_1e-3", "eval_speedup_ge_8", "greedy_agreement_ge_0.98"}
