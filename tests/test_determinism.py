"""Same params, same bytes: two fresh processes of each training stage write identical outputs.

MLX seeds its global RNG from the clock, so anything drawn before a stage
seeds it (LoRA's init, sampling) would differ run to run; the second run of
each stage here has two busy-looping processes beside it, as on a loaded
machine.
"""

import hashlib
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from test_dpo import fixture_rows
from tiny_model import make_tiny_model
from toolcall.io import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def stage(work, script, *args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / script), *map(str, args)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]


@contextmanager
def busy_cores(n=2):
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield
    finally:
        for p in spinners:
            p.kill()
            p.wait()


def digests(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("det")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"].update(iters=4, batch_size=2, warmup=0, steps_per_report=1, max_seq_len=4096, lora_layers=2)
    params["dpo"].update(prompts=4, samples_per_prompt=2, iters=2, batch_size=2, max_tokens=8)
    params["rl"].update(rounds=2, prompts=4, samples_per_prompt=2, iters=2, batch_size=2, max_tokens=8,
                        min_reward=0.0)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    write_jsonl(work / "train.jsonl", fixture_rows())
    make_tiny_model(work / "base")
    return work


def test_train_sft_twice_writes_identical_adapters(work):
    stage(work, "train_sft.py", "base", "train.jsonl", "sft_a", "--metrics", "a.json", "--live", "live_a")
    with busy_cores():
        stage(work, "train_sft.py", "base", "train.jsonl", "sft_b", "--metrics", "b.json", "--live", "live_b")
    assert digests(work / "sft_a") == digests(work / "sft_b")


@pytest.mark.parametrize("script, metrics_key", [("train_dpo.py", "pairs_by_source"), ("train_rl.py", "rounds")])
def test_dpo_and_rl_twice_write_identical_adapters_pairs_and_samples(work, script, metrics_key):
    if not (work / "sft").exists():
        stage(work, "train_sft.py", "base", "train.jsonl", "sft", "--metrics", "sft.json", "--live", "live_sft")
    runs = []
    for name in ("x", "y"):
        args = ["base", "sft", "train.jsonl", f"{script}_{name}", "--metrics", f"{script}_{name}.json",
                "--live", f"live_{script}_{name}"]
        if name == "y":
            with busy_cores():
                stage(work, script, *args)
        else:
            stage(work, script, *args)
        metrics = json.loads((work / f"{script}_{name}.json").read_text())
        runs.append((digests(work / f"{script}_{name}"), json.dumps(metrics[metrics_key], sort_keys=True,
                                                                        default=str)))
    (adapters_x, kept_x), (adapters_y, kept_y) = runs
    assert adapters_x == adapters_y
    # Pair sources (DPO) and per-round pass rates and kept samples (RL); seconds aside.
    strip = lambda s: {k: {kk: vv for kk, vv in v.items() if "seconds" not in kk} if isinstance(v, dict) else v  # noqa: E731
                       for k, v in json.loads(s).items()}
    assert strip(kept_x) == strip(kept_y)
