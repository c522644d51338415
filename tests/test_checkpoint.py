"""A killed training stage resumes from its last checkpoint and ends with the bytes of an uninterrupted run."""

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
from configs import config, section
from mlx.utils import tree_flatten
from test_dpo import fixture_split, tiny  # noqa: F401  (module fixture: tiny model + SFT-shaped adapter)
from tiny_model import make_tiny_model
from toolcall.calls.prompts import PromptFormat
from toolcall.config import DpoConfig
from toolcall.io import write_jsonl
from toolcall.model import lora
from toolcall.train import checkpoint, dpo, selection
from toolcall.train.trainer import DivergedError, StepLog, optimize

ROOT = Path(__file__).resolve().parents[1]
ITERS = 12


@pytest.fixture(scope="module")
def sft_setup(tmp_path_factory):
    """A directory laid out for stages/train_sft.py: params.yaml, the tiny model, training and validation rows."""
    work = tmp_path_factory.mktemp("sft")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # Validation every 2 steps: the selection's evaluations and best weights so far must survive the kill too.
    # ranks=2: the kill -9 hits the launcher, whose ranks must die with it (toolcall/train/launch.py).
    params["sft"].update(iters=ITERS, epochs=None, batch_size=2, warmup=0, steps_per_report=1, checkpoint_every=2,
                         steps_per_eval=2, patience=0, max_seq_len=4096, lora_layers=2, ranks=2)
    params["eval"].update(max_tokens=16, batch_size=4)  # the selection's greedy decoding: short, it is a tiny model
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    train, valid = fixture_split()
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "valid.jsonl", valid)
    return work, make_tiny_model(work / "model")


def train_sft(work, model, out, **popen):
    cmd = [sys.executable, str(ROOT / "stages" / "train_sft.py"), str(model), "train.jsonl", out, "--seed", "0",
           "--metrics", f"{out}.json", "--live", f"{out}.live", "--valid", "valid.jsonl"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen(cmd, cwd=work, env=env, text=True, **popen)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_sigkill_then_rerun_gives_the_uninterrupted_adapter(sft_setup):
    work, model = sft_setup
    assert train_sft(work, model, "straight").wait(timeout=300) == 0
    kill_at = random.Random().randint(3, ITERS - 2)  # random on purpose: any step must be safe
    proc = train_sft(work, model, "resumed", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    for line in proc.stdout:
        if line.startswith(f"[sft] {kill_at}/{ITERS} "):
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"the run ended before step {kill_at}"
    assert not (work / "resumed").exists()  # nothing half-written where the adapter goes
    # the last save, or the one before if the kill hit while a save swapped it in (Checkpoint.location)
    saved = json.loads((checkpoint.Checkpoint(work / "resumed", None, 2).location() / "meta.json").read_text())["step"]
    assert 2 <= saved <= kill_at and saved % 2 == 0

    rerun = train_sft(work, model, "resumed", stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, out[-2000:]
    assert f"resuming after step {saved}" in out
    for name in ("adapters.safetensors", "adapter_config.json"):
        assert digest(work / "resumed" / name) == digest(work / "straight" / name), f"kill at {kill_at}"
    metrics = [json.loads((work / f"{run}.json").read_text()) for run in ("straight", "resumed")]
    assert metrics[0] == metrics[1]  # the chosen step and the selection's evaluations too
    assert metrics[0]["steps_trained"] == ITERS and 0 <= metrics[0]["chosen_step"] <= ITERS
    assert metrics[0]["selection"]["steps"] == list(range(0, ITERS + 1, 2))
    assert metrics[0]["selection"]["chosen_step"] == metrics[0]["chosen_step"]
    assert not (work / "resumed.checkpoint").exists()  # a finished stage leaves no checkpoint behind


def test_a_checkpoint_of_other_inputs_is_not_resumed(tmp_path, tiny):  # noqa: F811
    model, _, _ = tiny
    mine = checkpoint.Checkpoint(tmp_path / "out", "key-a", every=1)
    mine.save(3, model, None, [])
    other = checkpoint.Checkpoint(tmp_path / "out", "key-b", every=1)
    assert other.resume(model, None) is None and mine.resume(model, None)["step"] == 3


def test_a_kill_between_the_fallbacks_two_renames_resumes_the_previous_checkpoint(tmp_path, tiny):  # noqa: F811
    # Where the system cannot exchange two paths, io.atomic_dir moves the old checkpoint
    # aside before moving the new one in; a kill between the two leaves only the old one.
    model, _, _ = tiny
    ckpt = checkpoint.Checkpoint(tmp_path / "out", "key", every=1)
    ckpt.save(3, model, None, [])
    ckpt.dir.rename(tmp_path / ".out.checkpoint.x1y2.old")
    assert ckpt.resume(model, None)["step"] == 3
    ckpt.clear()
    assert list(tmp_path.iterdir()) == []


def pairs():
    return [{"id": str(i), "source": "on_policy", "prompt_len": 10, "chosen": list(range(3, 30 + i)),
             "rejected": list(range(3, 20 + i))} for i in range(4)]


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}


class Interrupt(Exception):
    pass


class Dies(StepLog):
    """A run's log that stops the run at step 5, as a kill would (after step 4's checkpoint)."""

    def __call__(self, step, metrics):
        if step == 5:
            raise Interrupt
        super().__call__(step, metrics)


def test_dpo_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path, tiny):  # noqa: F811
    model, _, sft = tiny
    start = lora.snapshot(model)
    cfg = config(DpoConfig, "dpo", epochs=3.0, batch_size=2, learning_rate=1e-2, checkpoint_every=2)  # 6 steps
    ref = dpo.reference_logps(model, pairs(), "sigmoid")

    dpo.train(model, pairs(), ref, cfg, StepLog(None, "dpo", 6))
    straight = weights(model)

    lora.restore(model, start)
    ckpt = checkpoint.Checkpoint(tmp_path / "dpo", "k", cfg.checkpoint_every)

    with pytest.raises(Interrupt):
        dpo.train(model, pairs(), ref, cfg, Dies(None, "dpo", 6), ckpt)
    lora.restore(model, start)  # a new process starts from the SFT adapter again
    log = StepLog(None, "dpo", 6)
    dpo.train(model, pairs(), ref, cfg, log, ckpt)
    assert [h["step"] for h in log.history] == list(range(1, 7))  # steps 1-4 from the checkpoint
    resumed = weights(model)
    assert all(np.array_equal(straight[k], resumed[k]) for k in straight)
    lora.restore(model, start)  # the module fixture is shared


def test_dpo_resumed_keeps_the_selections_evaluations_and_best_from_the_checkpoint(tmp_path, tiny):  # noqa: F811
    """The evaluations at steps 0, 2 and 4 come back from the checkpoint of step 4 (killed at 5); the best, step
    0's (the tiny model's accuracy ties at 0), comes back with them and is the adapter the resumed run ends with."""
    model, tokenizer, _ = tiny
    start = lora.snapshot(model)
    cfg = config(DpoConfig, "dpo", epochs=3.0, batch_size=2, learning_rate=1e-2, checkpoint_every=2, steps_per_eval=2)
    ref = dpo.reference_logps(model, pairs(), "sigmoid")
    valid = selection.ValidationSet(fixture_split()[1], PromptFormat(tokenizer), 8, 8)
    straight = selection.Selection(model, valid, 0)
    dpo.train(model, pairs(), ref, cfg, StepLog(None, "dpo", 6), selection=straight)
    assert [r["step"] for r in straight.curve] == [0, 2, 4, 6] and straight.chosen_step == 0

    lora.restore(model, start)
    ckpt = checkpoint.Checkpoint(tmp_path / "dpo", "k", cfg.checkpoint_every)

    with pytest.raises(Interrupt):
        dpo.train(model, pairs(), ref, cfg, Dies(None, "dpo", 6), ckpt, selection=selection.Selection(model, valid, 0))
    lora.restore(model, start)  # a new process starts from the SFT adapter again
    resumed = selection.Selection(model, valid, 0)
    log = StepLog(None, "dpo", 6)
    dpo.train(model, pairs(), ref, cfg, log, ckpt, selection=resumed)
    assert [h["step"] for h in log.history] == list(range(0, 7))  # steps 0-4 from the checkpoint
    assert resumed.curve == straight.curve and resumed.chosen_step == 0
    got, expected = weights(model), dict(start)
    assert all(np.array_equal(np.array(expected[k]), got[k]) for k in got)  # not the weights trained to step 6


def test_a_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(tmp_path, tiny):  # noqa: F811
    model, _, _ = tiny
    start = lora.snapshot(model)
    train_cfg = config(DpoConfig, "dpo", epochs=5.0, batch_size=4, learning_rate=1e-3).train(4)  # 5 steps
    ckpt = checkpoint.Checkpoint(tmp_path / "run", "k", every=1)

    def loss(model, scale):  # finite until the batch whose scale is NaN
        total = sum(v.sum() for _, v in tree_flatten(model.trainable_parameters()))
        return total * scale, {}

    batches = iter([(mx.array(1.0),), (mx.array(1.0),), (mx.array(float("nan")),), (mx.array(1.0),)] * 2)
    with pytest.raises(DivergedError, match="nan at step 3"):
        optimize(model, train_cfg, loss, batches, StepLog(None, "dpo", 5), ckpt)
    assert json.loads((ckpt.dir / "meta.json").read_text())["step"] == 2
    lora.restore(model, start)  # the module fixture is shared


def test_the_fingerprint_changes_with_any_input():
    base = checkpoint.fingerprint("train_sft", {"iters": 3}, checkpoint.examples_digest([([1, 2, 3], 1)]))
    assert base == checkpoint.fingerprint("train_sft", {"iters": 3}, checkpoint.examples_digest([([1, 2, 3], 1)]))
    assert base != checkpoint.fingerprint("train_sft", {"iters": 4}, checkpoint.examples_digest([([1, 2, 3], 1)]))
    assert base != checkpoint.fingerprint("train_sft", {"iters": 3}, checkpoint.examples_digest([([1, 2, 3], 2)]))
    assert section("sft")["checkpoint_every"] % section("sft")["steps_per_report"] == 0
