"""Same params, same bytes: two fresh processes of each training stage write identical outputs.

MLX seeds its global RNG from the clock, so anything drawn before a stage
seeds it (LoRA's init, sampling) would differ run to run; the second run of
each stage here has two busy-looping processes beside it, as on a loaded
machine. The stages run as two data-parallel ranks, as on a CPU by default.
"""

import hashlib
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from test_dpo import fixture_split
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
    # ranks=2: two data-parallel processes, as the stages run on a CPU (toolcall/train/launch.py).
    params["sft"].update(iters=4, epochs=None, batch_size=2, warmup=0, steps_per_report=1, steps_per_eval=2,
                         max_seq_len=4096, lora_layers=2, ranks=2)
    params["dpo"].update(prompts=4, samples_per_prompt=2, epochs=1.0, batch_size=2, max_tokens=8, valid_prompts=2,
                         steps_per_eval=2, ranks=2)
    params["rl"].update(rounds=2, prompts=4, samples_per_prompt=2, iters=2, batch_size=2, max_tokens=8,
                        min_reward=0.0, ranks=2)
    params["eval"].update(max_tokens=16, batch_size=4)  # the greedy validation decoding that chooses each adapter
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    train, valid = fixture_split()
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "valid.jsonl", valid)
    make_tiny_model(work / "base")
    return work


def test_train_sft_twice_writes_identical_adapters(work):
    stage(work, "train_sft.py", "base", "train.jsonl", "sft_a", "--seed", 0, "--metrics", "a.json", "--live", "live_a",
          "--valid", "valid.jsonl")
    with busy_cores():
        stage(work, "train_sft.py", "base", "train.jsonl", "sft_b", "--seed", 0, "--metrics", "b.json",
              "--live", "live_b", "--valid", "valid.jsonl")
    assert digests(work / "sft_a") == digests(work / "sft_b")
    assert (work / "a.json").read_bytes() == (work / "b.json").read_bytes()
    # Another seed is another replicate: LoRA's init, the batch order and the samples follow the seed.
    stage(work, "train_sft.py", "base", "train.jsonl", "sft_c", "--seed", 1, "--metrics", "c.json", "--live", "live_c",
          "--valid", "valid.jsonl")
    assert digests(work / "sft_c") != digests(work / "sft_a")


@pytest.mark.parametrize("script", ["train_dpo.py", "train_rl.py"])
def test_dpo_and_rl_twice_write_identical_adapters_pairs_and_samples(work, script):
    if not (work / "sft").exists():
        stage(work, "train_sft.py", "base", "train.jsonl", "sft", "--seed", 0, "--metrics", "sft.json",
              "--live", "live_sft")
    for name in ("x", "y"):
        args = ["base", "sft", "train.jsonl", f"{script}_{name}", "--seed", 1, "--metrics", f"{script}_{name}.json",
                "--live", f"live_{script}_{name}", "--valid", "valid.jsonl"]
        with busy_cores(2 if name == "y" else 0):
            stage(work, script, *args)
    assert digests(work / f"{script}_x") == digests(work / f"{script}_y")
    # The metrics (DPO: pairs by source, sample pass rate, last steps' loss and margins, held-out scores;
    # RL: per round rewards, pass rate, samples kept; both: the selection's evaluations) hold no timings, so they
    # too are equal byte for byte.
    assert (work / f"{script}_x.json").read_bytes() == (work / f"{script}_y.json").read_bytes()
