"""The adapter kept is chosen on greedy validation accuracy (toolcall/train/selection.py), in SFT, DPO and RL.

The tiny random model never writes a tool call, so its accuracy is 0 at every
step: a tie, which must keep step 0. For an accuracy that moves, the tiny
tool caller (tests/tiny_adapter.py, which answers WEATHER right) gets a LoRA
of random weights that breaks it, and SFT on WEATHER mends it within a few
steps: 0 until step 4, 1/2 from step 6 on (ROME it never answers right).
"""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_unflatten
from configs import config
from test_dpo import fixture_rows, fixture_split, tiny  # noqa: F401  (module fixture: tiny model + SFT-shaped adapter)
from tiny_adapter import CALLS, FUNCTIONS, MESSAGES, train_tool_caller
from tiny_model import make_tiny_model
from toolcall.calls.prompts import PromptFormat
from toolcall.config import DpoConfig, RlConfig, SftConfig
from toolcall.io import write_jsonl
from toolcall.model import lora
from toolcall.train import checkpoint, dpo, rl, selection, trainer
from toolcall.train.trainer import StepLog

ROOT = Path(__file__).resolve().parents[1]
WEATHER = {"id": "weather", "category": "parallel", "messages": MESSAGES, "functions": FUNCTIONS,
           "ground_truth": [{"get_weather": {"city": ["Paris"], "unit": ["celsius", ""]}},
                            {"get_weather": {"city": ["Rome"], "unit": ["celsius", ""]}}]}
ROME = {"id": "rome", "category": "simple", "messages": [{"role": "user", "content": "And in Rome?"}],
        "functions": FUNCTIONS, "ground_truth": [{"get_weather": {"city": ["Rome"], "unit": ["celsius", ""]}}]}
# 16 steps, evaluated every 2; 3 evaluations without a new best (8, 10, 12 after step 6's) stop it at 12.
MENDING = dict(iters=16, epochs=None, batch_size=2, warmup=0, steps_per_report=1, learning_rate=3e-3,
               max_seq_len=4096)
EVERY, PATIENCE = 2, 3


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    work = tmp_path_factory.mktemp("caller")
    return train_tool_caller(make_tiny_model(work / "base"), work / "caller")[0]


def broken(caller_dir):
    """The tool caller with a LoRA of seeded random weights, which make its answers unparseable."""
    model, tokenizer = lora.load_model(caller_dir)
    lora.add_lora(model, lora.adapter_config(config(SftConfig, "sft", lora_layers=2)), seed=0)
    mx.random.seed(0)
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.1) for k, v in lora.snapshot(model)]))
    return model, PromptFormat(tokenizer)


def mend(caller_dir, **kwargs):
    """SFT of the broken caller on WEATHER, chosen on [WEATHER, ROME]: ``(model, selection, train_lora's result)``."""
    model, fmt = broken(caller_dir)
    chooser = selection.Selection(model, selection.ValidationSet([WEATHER, ROME], fmt, 256, 4), PATIENCE)
    example = fmt.example(WEATHER, CALLS)
    result = trainer.train_lora(model, [example] * 4, config(SftConfig, "sft", **MENDING).train(4),
                                selection=chooser, valid=[example], steps_per_eval=EVERY, **kwargs)
    return model, chooser, result


def weights(model):
    return {k: np.array(v) for k, v in lora.snapshot(model)}


def test_sft_keeps_the_earliest_best_accuracy_not_the_lowest_loss(tmp_path, caller):
    ckpt = checkpoint.Checkpoint(tmp_path / "sft", "k", every=EVERY)  # its last save holds the last step's weights
    model, chooser, result = mend(caller, checkpoint=ckpt)
    curve = chooser.curve
    steps, accuracy = [r["step"] for r in curve], [r["valid_accuracy"] for r in curve]
    assert steps == [0, 2, 4, 6, 8, 10, 12] and result["stopped_early"] and result["last_step"] == 12
    assert accuracy[0] == 0 and max(accuracy) == 0.5 == accuracy[-1]  # mended; ROME stays wrong
    best = accuracy.index(0.5)
    assert result["chosen_step"] == steps[best] == 6  # the earliest of the four tied best
    assert accuracy[:best] == [0] * best and curve[0]["malformed_rate"] == 1 > curve[best]["malformed_rate"]
    # The validation loss, logged at the same steps, falls to the end: it would have kept step 12.
    val_loss = [h["val_loss"] for h in result["history"] if "val_loss" in h]
    assert len(val_loss) == len(steps) and val_loss == sorted(val_loss, reverse=True)
    # The model ends with step 6's weights: not the last ones (the checkpoint of step 12), and as accurate.
    last = dict(mx.load(str(ckpt.dir / checkpoint.WEIGHTS)).items())
    assert any(not np.array_equal(v, np.array(last[k])) for k, v in weights(model).items())
    assert chooser.valid.measure(model)[0]["valid_accuracy"] == 0.5
    block = chooser.summary()
    assert (block["metric"], block["steps"], block["valid_accuracy"], block["chosen_step"],
            block["chosen_valid_accuracy"], block["start_valid_accuracy"], block["valid_examples"]) == (
        "valid_accuracy", steps, accuracy, 6, 0.5, 0.0, 2)
    assert all(len(block[k]) == len(steps) for k in selection.FORMAT) and block["gold_mean_calls"][0] == 1.5
    assert block["mean_calls"][best] == 1  # WEATHER's two calls, ROME's none
    # which of the 2 rows step 6 got right: one, as its accuracy says, and the same one again on re-measuring
    assert block["chosen_correct"] == chooser.valid.measure(model)[1] and sorted(block["chosen_correct"]) == ["0", "1"]
    by_category = {r["category"]: float(c == "1") for r, c in zip(chooser.valid.rows, block["chosen_correct"])}
    assert block["chosen_by_category"] == by_category  # one row each here
    assert 0 <= min(block["share_at_max_tokens"]) and max(block["mean_answer_tokens"]) <= 256


class Interrupt(Exception):
    pass


def test_sft_resumed_between_the_best_and_the_stop_keeps_the_best_from_the_checkpoint(tmp_path, caller):
    """Killed at step 9 (after the best, step 6; the last save at 8): the rerun has step 6's weights only from
    the checkpoint, stops where the straight run did; a rerun after the stop trains no more."""
    model, _, straight = mend(caller)
    expected = weights(model)

    class Dies(StepLog):
        def __call__(self, step, metrics, shown=None):
            if step == 9:
                raise Interrupt
            super().__call__(step, metrics, shown)

    ckpt = checkpoint.Checkpoint(tmp_path / "sft", "k", every=EVERY)
    with pytest.raises(Interrupt):
        mend(caller, checkpoint=ckpt, log=Dies(None, "sft", 16))
    assert json.loads((ckpt.dir / checkpoint.META).read_text())["step"] == 8
    for _ in range(2):  # resumed after step 8; then again from the checkpoint the stop left at step 12
        model, chooser, resumed = mend(caller, checkpoint=ckpt)
        keys = ("chosen_step", "stopped_early", "last_step", "history")
        assert {k: resumed[k] for k in keys} == {k: straight[k] for k in keys}
        assert [r["step"] for r in chooser.curve] == [0, 2, 4, 6, 8, 10, 12]
        got = weights(model)
        assert all(np.array_equal(expected[k], got[k]) for k in expected)


DPO_PAIRS = [{"id": str(i), "source": "on_policy", "prompt_len": 10, "chosen": list(range(3, 30 + i)),
              "rejected": list(range(3, 20 + i)) + [40, 41]} for i in range(4)]


def test_dpo_evaluates_the_sft_model_at_step_0_and_a_tie_keeps_it(tiny):  # noqa: F811
    model, tokenizer, _ = tiny
    start = weights(model)
    chooser = selection.Selection(model, selection.ValidationSet(fixture_split()[1], PromptFormat(tokenizer), 12, 8), 0)
    cfg = config(DpoConfig, "dpo", epochs=3.0, batch_size=2, learning_rate=1e-2, steps_per_eval=2, warmup=0)
    ref = dpo.reference_logps(model, DPO_PAIRS, "sigmoid")
    log = StepLog(None, "dpo", 6)
    dpo.train(model, DPO_PAIRS, ref, cfg, log, heldout=(DPO_PAIRS, ref), selection=chooser)
    assert log.history[0] == {"step": 0, **chooser.curve[0]}  # the SFT model's row, before any step
    assert [r["step"] for r in chooser.curve] == [0, 2, 4, 6]
    assert [h["step"] for h in log.history if "heldout_accuracy" in h] == [2, 4, 6]  # as before
    assert log.history[-1]["loss"] != log.history[1]["loss"]  # DPO did move the model
    # The tiny random model writes no call at any step: every accuracy ties at 0, so step 0 is kept.
    assert [r["valid_accuracy"] for r in chooser.curve] == [0.0] * 4 and chooser.chosen_step == 0
    got = weights(model)
    assert all(np.array_equal(start[k], got[k]) for k in start)
    assert set(log.last(10)) >= {"loss", "accuracy"}  # the last steps' means skip step 0's evaluation-only row


def test_rl_evaluates_before_round_1_and_after_each_round(tmp_path, tiny):  # noqa: F811
    from dvclive import Live

    model, tokenizer, _ = tiny
    start = weights(model)
    fmt = PromptFormat(tokenizer)
    chooser = selection.Selection(model, selection.ValidationSet(fixture_split()[1], fmt, 12, 8), 0)
    cfg = config(RlConfig, "rl", rounds=2, prompts=2, samples_per_prompt=2, iters=2, batch_size=2, max_tokens=8,
                 min_reward=0.0, learning_rate=1e-2)
    with Live(str(tmp_path / "live"), dvcyaml=None, save_dvc_exp=False) as live:
        rounds = rl.run(model, tokenizer, fmt, fixture_rows(), cfg, live, selection=chooser)
    assert all(r["updated"] for r in rounds)
    assert [r["step"] for r in chooser.curve] == [0, 2, 4]  # update steps done: before round 1, after each
    assert [r["valid_accuracy"] for r in rounds] == [r["valid_accuracy"] for r in chooser.curve[1:]]
    with open(tmp_path / "live" / "plots" / "metrics" / "rl" / "valid_accuracy.tsv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")] == [0, 2, 4]
    assert chooser.chosen_step == 0  # all tied at 0: the SFT model is kept
    got = weights(model)
    assert all(np.array_equal(start[k], got[k]) for k in start)


def test_rl_resumed_after_a_round_keeps_the_evaluations_so_far(tmp_path, tiny):  # noqa: F811
    """A run stopped after round 1 (its checkpoint: round 1's weights, the evaluations before and after it)
    resumed for round 2 ends as a straight two-round run: same evaluations, same kept weights."""
    model, tokenizer, _ = tiny
    start = lora.snapshot(model)
    fmt = PromptFormat(tokenizer)
    valid = selection.ValidationSet(fixture_split()[1], fmt, 12, 8)
    cfg = dict(prompts=2, samples_per_prompt=2, iters=2, batch_size=2, max_tokens=8, min_reward=0.0, learning_rate=1e-2)
    straight = selection.Selection(model, valid, 0)
    rounds = rl.run(model, tokenizer, fmt, fixture_rows(), config(RlConfig, "rl", rounds=2, **cfg), selection=straight)
    expected = weights(model)

    ckpt = checkpoint.Checkpoint(tmp_path / "rl", "k", every=1)
    lora.restore(model, start)
    rl.run(model, tokenizer, fmt, fixture_rows(), config(RlConfig, "rl", rounds=1, **cfg), checkpoint=ckpt,
           selection=selection.Selection(model, valid, 0))
    lora.restore(model, start)  # a new process starts from the SFT adapter again
    resumed = selection.Selection(model, valid, 0)
    again = rl.run(model, tokenizer, fmt, fixture_rows(), config(RlConfig, "rl", rounds=2, **cfg), checkpoint=ckpt,
                   selection=resumed)
    timed = ("sample_seconds", "train_seconds")
    assert [{k: v for k, v in r.items() if k not in timed} for r in again] == [
        {k: v for k, v in r.items() if k not in timed} for r in rounds]
    assert resumed.curve == straight.curve and [r["step"] for r in resumed.curve] == [0, 2, 4]
    got = weights(model)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    lora.restore(model, start)  # the module fixture is shared


# ---------------------------------------------------------------- the stages write the selection block


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The tiny model, an SFT adapter, and stages train_dpo and train_rl run on them with --valid (2 ranks)."""
    work = tmp_path_factory.mktemp("stages")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["dpo"].update(prompts=4, samples_per_prompt=2, epochs=1.0, batch_size=2, max_tokens=8, valid_prompts=2,
                         steps_per_eval=1, warmup=0, ranks=2)
    params["rl"].update(rounds=2, prompts=4, samples_per_prompt=2, iters=2, batch_size=2, max_tokens=8,
                        min_reward=0.0, ranks=2)
    params["eval"].update(max_tokens=16, batch_size=4)
    (work / "params.yaml").write_text(yaml.safe_dump(params))
    train, valid = fixture_split()
    write_jsonl(work / "train.jsonl", train)
    write_jsonl(work / "valid.jsonl", valid)
    base = make_tiny_model(work / "base")
    model, _ = lora.load_model(base)
    adapter = lora.adapter_config(config(SftConfig, "sft", lora_layers=2))
    lora.add_lora(model, adapter, seed=0)
    lora.save_adapters(model, adapter, work / "sft")
    for script in ("train_dpo", "train_rl"):
        proc = subprocess.run([sys.executable, "-m", f"stages.{script}", "base", "sft", "train.jsonl", script,
                               "--seed", "0", "--metrics", f"{script}.json", "--live", f"{script}.live",
                               "--valid", "valid.jsonl"], cwd=work, capture_output=True, text=True,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return work, len(valid)


@pytest.mark.parametrize("script", ["train_dpo", "train_rl"])
def test_the_stages_write_the_selection_block(stages, script):
    work, n_valid = stages
    metrics = json.loads((work / f"{script}.json").read_text())
    block = metrics["selection"]
    steps = {"train_dpo": list(range(metrics.get("steps", 0) + 1)), "train_rl": [0, 2, 4]}[script]
    assert block["steps"] == steps and block["metric"] == "valid_accuracy" and block["valid_examples"] == n_valid
    assert all(len(block[k]) == len(steps) for k in ("valid_accuracy", *selection.FORMAT))
    assert block["start_valid_accuracy"] == block["valid_accuracy"][0]
    assert block["chosen_valid_accuracy"] == max(block["valid_accuracy"])
    assert block["chosen_step"] == steps[block["valid_accuracy"].index(max(block["valid_accuracy"]))]
    if script == "train_rl":
        assert metrics["chosen_round"] == block["steps"].index(block["chosen_step"])
        assert [r["valid_accuracy"] for r in metrics["rounds"].values()] == block["valid_accuracy"][1:]
    assert len(json.loads((work / f"{script}.timings.json").read_text())["valid_eval_seconds" if script == "train_rl"
                                                                           else "valid_eval"]) == len(steps)
    prefix = script.removeprefix("train_")
    with open(work / f"{script}.live" / "plots" / "metrics" / prefix / "valid_accuracy.tsv") as f:
        assert [int(r["step"]) for r in csv.DictReader(f, delimiter="\t")] == steps
