"""Data-parallel ranks (toolcall/train/launch.py): the same losses as one process, and a launcher that fails loudly.

Two ranks on loopback (MLX's ring backend), as the training stages run on a
CPU with ``ranks: 2``. Byte-identical reruns with two ranks are
tests/test_determinism.py's, resuming after ``kill -9`` tests/test_checkpoint.py's
(both run the stages with ``ranks: 2``).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from test_dpo import fixture_rows
from tiny_model import make_tiny_model
from toolcall.io import write_jsonl
from toolcall.train import launch

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "tests" / "rank_jobs.py"
# Two ranks sum gradients and token counts in another order than one process: float32 rounding only.
LOSS_TOLERANCE = 1e-4


def job(name, out, ranks):
    """Run a rank_jobs.py job as ``ranks`` ranks; its exit status and each rank's result (None where none)."""
    out.mkdir(exist_ok=True)
    cmd = [sys.executable, str(JOBS), name, str(out)]
    code = launch.run_ranks(ranks, cmd) if ranks > 1 else subprocess.run(cmd).returncode
    results = [out / f"{name}.rank{r}.json" for r in range(ranks)]
    return code, [json.loads(p.read_text()) if p.exists() else None for p in results]


def losses(history):
    """Each step's logged values, by name; DPO's accuracy of step 1 as 0.

    At step 1 the policy still is the reference: every implicit reward is 0 up
    to rounding, so ``chosen > rejected`` compares float noise, which two ranks
    round otherwise than one process.
    """
    return np.array([[0.0 if (k, row["step"]) == ("accuracy", 1) else row[k] for k in sorted(row) if k != "step"]
                     for row in history])


def test_dpo_and_grpo_steps_on_two_ranks_equal_one_process(tmp_path):
    code, (one,) = job("optimize", tmp_path / "one", 1)
    assert code == 0
    code, (r0, r1) = job("optimize", tmp_path / "two", 2)
    assert code == 0
    for algo in ("dpo", "grpo"):
        # Loss and every logged metric (reward margin, accuracy; KL, clip fraction) of each step.
        # Relative to the size of values above 1 (the gradient norm: a sum over every LoRA weight).
        two_ranks, one_process = losses(r0[algo]), losses(one[algo])
        assert (np.abs(two_ranks - one_process) / np.maximum(1, np.abs(one_process))).max() < LOSS_TOLERANCE, algo
        assert r0[algo] == r1[algo]  # every rank logs the same averaged values
    # The ranks hold the same adapter bit for bit (rank 0 alone saves it). Against one process
    # the weights are compared through the losses: Adam divides by sqrt(v), so entries whose
    # gradients are ~0 move by float noise amplified up to the learning rate.
    assert r0["weights"] == r1["weights"]


def test_sampling_and_reference_scoring_shared_by_two_ranks_give_one_process_results(tmp_path):
    code, (one,) = job("shared_rollouts", tmp_path / "one", 1)
    assert code == 0
    code, (r0, r1) = job("shared_rollouts", tmp_path / "two", 2)
    assert code == 0
    assert len(one["samples"]) == 69 and all(len(group) == 2 for group in one["samples"])
    # Each chunk of prompts seeds itself: the same samples whichever rank drew them, gathered in order.
    assert r0["samples"] == r1["samples"] == one["samples"]
    assert r0["ref"] == r1["ref"]
    assert np.allclose(r0["ref"], one["ref"], atol=1e-4)


def test_the_selections_greedy_answers_shared_by_two_ranks_are_one_process_answers(tmp_path):
    """Each rank decodes its share of the validation prompts (toolcall/train/selection.py); every rank gets all
    the answers, the same as one process decoding them all in other batches, so the choice is the same."""
    code, (one,) = job("selection_answers", tmp_path / "one", 1)
    assert code == 0
    code, (r0, r1) = job("selection_answers", tmp_path / "two", 2)
    assert code == 0
    assert len(one["answers"]) == 8 and len({text for text, _ in one["answers"]}) > 1
    assert r0 == r1 == one


@pytest.fixture(scope="module")
def sft_work(tmp_path_factory):
    work = tmp_path_factory.mktemp("dp_sft")
    write_jsonl(work / "train.jsonl", fixture_rows())
    make_tiny_model(work / "base")
    return work


def train_sft(work, ranks, out):
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["sft"].update(iters=4, epochs=None, batch_size=2, warmup=0, steps_per_report=1, max_seq_len=4096,
                         lora_layers=2, ranks=ranks)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, "-m", "stages.train_sft", "base", "train.jsonl", out, "--seed", "0",
                           "--metrics", f"{out}.json", "--live", f"{out}.live"], cwd=work, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def step_losses(work, out):
    rows = (work / f"{out}.live" / "plots" / "metrics" / "sft" / "loss.tsv").read_text().split("\n")[1:]
    return np.array([float(r.split("\t")[1]) for r in rows if r])


def test_sft_on_two_ranks_gives_the_losses_of_one_process_on_the_same_global_batch(sft_work):
    train_sft(sft_work, 1, "one")
    shown = train_sft(sft_work, 2, "two")
    one, two = step_losses(sft_work, "one"), step_losses(sft_work, "two")
    assert len(one) == len(two) == 4
    assert np.abs(one - two).max() < LOSS_TOLERANCE
    assert not np.array_equal(one, two)  # two ranks did run: the sums' order differs in the last bits
    assert shown.count("[sft] 4/4 step") == 1  # rank 0 alone prints (and writes)
    assert sorted(p.name for p in sft_work.iterdir() if p.name.startswith("two")) == ["two", "two.json", "two.live",
                                                                                      "two.timings.json"]


def test_a_failing_rank_fails_the_run_with_its_message_at_once(tmp_path, capfd):
    start = time.monotonic()
    code, _ = job("rank1_fails", tmp_path, 2)
    assert code == 1 and time.monotonic() - start < 60  # rank 0 was stopped, not waited for
    assert "rank 1: something went wrong" in capfd.readouterr().err


@pytest.mark.parametrize("name, message", [
    ("wrong_ranks", r"params.yaml [sft].ranks=3 but this run has 2 ranks"),
    ("disagree", "the 2 ranks disagree on the samples; every host must run the same mlx"),
])
def test_ranks_that_do_not_match_the_params_or_each_other_are_an_error(tmp_path, capfd, name, message):
    code, _ = job(name, tmp_path, 2)
    assert code == 1
    assert message in capfd.readouterr().err


def test_killing_the_launcher_kills_its_ranks(tmp_path):
    if sys.platform != "linux":
        pytest.skip("ranks follow their launcher through Linux's PR_SET_PDEATHSIG")
    code = ("import sys; from toolcall.train import launch; "
            f"sys.exit(launch.run_ranks(2, [sys.executable, {str(JOBS)!r}, 'pid_then_sleep', {str(tmp_path)!r}]))")
    launcher = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    pidfiles = [tmp_path / "pid0", tmp_path / "pid1"]
    deadline = time.monotonic() + 120
    while not all(p.exists() and p.read_text() for p in pidfiles):
        assert time.monotonic() < deadline and launcher.poll() is None
        time.sleep(0.2)
    launcher.send_signal(signal.SIGKILL)  # what a kill -9 of the stage (or of DVC's child) does
    launcher.wait()
    pids = [int(p.read_text()) for p in pidfiles]
    deadline = time.monotonic() + 20
    while any(alive(pid) for pid in pids):
        assert time.monotonic() < deadline, "a rank outlived its launcher"
        time.sleep(0.2)


def alive(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited; only its parent's wait is missing


def test_on_a_gpu_the_stage_stays_one_process(monkeypatch, capsys):
    monkeypatch.delenv(launch.RANK_ENV, raising=False)
    monkeypatch.setattr(launch.resources, "gpu_default", lambda: True)  # no GPU here; the decision is what counts
    launch.ensure_ranks(2, "sft")  # returns instead of starting ranks and exiting
    assert "one process trains" in capsys.readouterr().out
