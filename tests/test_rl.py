"""RL: the reward on crafted outputs, GRPO advantages and loss at the sampling temperature, RFT's examples."""

import csv
import json

import numpy as np
import pytest

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten
import mlx.nn as nn
from test_dpo import fixture_rows, tiny  # noqa: F401  (module fixture: tiny model + SFT-shaped adapter)
from configs import config
from toolcall.calls.prompts import PromptFormat
from toolcall.config import RlConfig
from toolcall.model import lora
from toolcall.train import rl
from toolcall.train.batches import collate
from toolcall.train.loss import token_logps
from toolcall.train.rollouts import completion_logps
from toolcall.train.trainer import StepLog

WEATHER = {"name": "get_weather", "description": "", "parameters": {
    "type": "dict", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"]}}
TIME = {"name": "get_time", "description": "", "parameters": {
    "type": "dict", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
SIMPLE = {"id": "s", "category": "simple", "messages": [{"role": "user", "content": "weather in Paris, 3 days"}],
          "functions": [WEATHER], "ground_truth": [{"get_weather": {"city": ["Paris"], "days": [3, ""]}}]}
PARALLEL = {"id": "p", "category": "parallel", "messages": [{"role": "user", "content": "Paris and Rome"}],
            "functions": [WEATHER], "ground_truth": [{"get_weather": {"city": ["Paris"], "days": [""]}},
                                                     {"get_weather": {"city": ["Rome"], "days": [""]}}]}


def call(name, **arguments):
    return "<tool_call>" + json.dumps({"name": name, "arguments": arguments}) + "</tool_call>"


@pytest.mark.parametrize("row, text, expected", [
    (SIMPLE, call("get_weather", city="Paris", days=3), (1.2, True, True)),               # correct
    (SIMPLE, call("get_weather", city="Paris"), (1.2, True, True)),                       # optional omitted
    (SIMPLE, call("get_weather", city="Berlin", days=3), (0.2, False, True)),             # wrong value
    (SIMPLE, '<tool_call>{"name": "get_weather", "arguments": {"city": }</tool_call>', (0.0, False, False)),
    (SIMPLE, "Sure! The weather in Paris is sunny.", (0.0, False, False)),                # no call
    (SIMPLE, call("get_forecast", city="Paris"), (0.0, False, False)),                    # unknown function
    (PARALLEL, call("get_weather", city="Paris") + call("get_weather", city="Rome"), (1.2, True, True)),
    (PARALLEL, call("get_weather", city="Rome") + call("get_weather", city="Paris"), (1.2, True, True)),
    (PARALLEL, call("get_weather", city="Paris"), (0.2, False, True)),                    # partial parallel
    (PARALLEL, call("get_weather", city="Paris") + call("get_time", city="Rome"), (0.0, False, False)),
])
def test_reward_on_crafted_outputs(row, text, expected):
    r = rl.reward(row, text, reward_ast=1.0, reward_format=0.2)
    assert (round(r["reward"], 6), r["valid"], r["well_formed"]) == expected


def test_grpo_advantages_standardize_within_the_group():
    adv = rl.group_advantages([1.0, 0.0, 0.0, 0.0])
    std = np.sqrt(0.1875)  # population std of (1, 0, 0, 0)
    assert np.allclose(adv, [0.75 / (std + rl.ADV_EPS)] + [-0.25 / (std + rl.ADV_EPS)] * 3)
    assert abs(adv.sum()) < 1e-9
    assert np.allclose(rl.group_advantages([1.2, 1.2, 1.2]), 0.0)  # no signal


def test_grpo_examples_drop_groups_without_signal_and_end_unfinished_samples_without_eos():
    cfg = config(RlConfig, "rl", algo="grpo", max_tokens=3)
    prompts = [[1, 2], [3]]
    samples = [[("a", [5]), ("b", [6, 7, 8])], [("c", [9]), ("d", [9])]]
    scores = [[{"reward": 1.2}, {"reward": 0.0}], [{"reward": 0.2}, {"reward": 0.2}]]
    examples, adv = rl.grpo_examples(prompts, samples, scores, cfg, eos=[0])
    assert examples == [([1, 2, 5, 0], 2), ([1, 2, 6, 7, 8], 2)]  # the second hit max_tokens: no eos
    assert adv[0] > 0 > adv[1]


def test_rft_keeps_distinct_rewarded_samples_with_eos():
    cfg = config(RlConfig, "rl", max_tokens=3, min_reward=1.0)
    prompts = [[1, 2], [3]]
    samples = [[("a", [5]), ("a", [5]), ("b", [6, 7, 8])], [("c", [9]), ("d", [4])]]
    scores = [[{"reward": 1.2}, {"reward": 1.2}, {"reward": 1.2}], [{"reward": 0.2}, {"reward": 1.0}]]
    assert rl.rft_examples(prompts, samples, scores, cfg, eos=[0]) == [
        ([1, 2, 5, 0], 2), ([1, 2, 6, 7, 8, 0], 2), ([3, 4, 0], 1)]


def test_grpo_loss_at_the_sampling_policy_is_minus_the_mean_advantage(tiny):  # noqa: F811
    """old == ref == policy: ratio 1, KL 0, so the loss is -(token-weighted mean advantage)."""
    model, _, _ = tiny
    examples = [(list(range(3, 30)), 20), (list(range(3, 25)), 20)]
    tokens, _, positions, weights = collate(examples)
    logp = token_logps(model, tokens, positions)
    adv = mx.array([1.5, -0.5])
    loss, metrics = rl.grpo_loss(model, tokens, positions, weights, adv, logp, logp, 0.2, 0.04, 1.0)
    n_tokens = [len(t) - p for t, p in examples]  # 7 and 2 completion tokens
    assert abs(loss.item() + (1.5 * n_tokens[0] - 0.5 * n_tokens[1]) / sum(n_tokens)) < 1e-5
    assert abs(metrics["kl"].item()) < 1e-6 and metrics["clip_fraction"].item() == 0


def test_grpo_update_moves_only_the_lora_weights(tiny):  # noqa: F811
    model, _, sft = tiny
    reference = lora.snapshot(model)
    before = dict(tree_flatten(model.parameters()))
    examples = [(list(range(3, 30)), 20), (list(range(3, 25)), 20), (list(range(4, 28)), 20), (list(range(4, 26)), 20)]
    cfg = config(RlConfig, "rl", algo="grpo", iters=2, batch_size=4, learning_rate=1e-2)
    log = StepLog(None, "rl", 2)
    rl.grpo_update(model, examples, np.array([1.0, -1.0, 1.0, -1.0], np.float32), reference, cfg, cfg.train(0), log)
    after = dict(tree_flatten(model.parameters()))
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    assert changed and all(k.endswith(("lora_a", "lora_b")) for k in changed)
    assert log.history[0]["kl"] < 1e-6 < log.history[1]["kl"]  # step 1 at the reference, then away from it
    lora.restore(model, reference)  # the module fixture is shared



# ---------------------------------------------------------------- log-probs at the sampling temperature

EXAMPLES = [(list(range(3, 30)), 20), (list(range(3, 25)), 20), (list(range(4, 28)), 20), (list(range(4, 26)), 20)]


def test_logps_at_a_temperature_are_those_of_the_distribution_sampled_from(tiny):  # noqa: F811
    """mlx-lm samples at T from softmax(logits / T); the log-probs GRPO uses are of that distribution."""
    model, _, _ = tiny
    tokens, prompt_len = EXAMPLES[0]
    logits = model(mx.array(tokens)[None, :-1])[0].astype(mx.float32)
    for t in (0.7, 1.0):
        expected = np.array(nn.log_softmax(logits / t, axis=-1))[np.arange(prompt_len - 1, len(tokens) - 1),
                                                                  tokens[prompt_len:]]
        assert np.allclose(completion_logps(model, [EXAMPLES[0]], t)[0], expected, atol=1e-4)
        batch, _, positions, weights = collate([EXAMPLES[0]])
        n = len(tokens) - prompt_len
        assert np.allclose(np.array(token_logps(model, batch, positions, t))[0, :n], expected, atol=1e-4)
    assert not np.allclose(completion_logps(model, [EXAMPLES[0]], 0.7)[0], completion_logps(model, [EXAMPLES[0]])[0])


def test_grpo_ratios_are_one_at_the_sampling_policy_only_at_its_temperature(tiny):  # noqa: F811
    """Old log-probs at T=1 against a policy scored at T=0.7 would give ratios != 1 before any update."""
    model, _, _ = tiny
    tokens, _, positions, weights = collate(EXAMPLES[:2])
    adv = mx.array([1.0, -1.0])
    width = positions.shape[1]
    for old_t, clipped in ((0.7, False), (1.0, True)):
        old = rl.pad(completion_logps(model, EXAMPLES[:2], old_t), width)
        _, metrics = rl.grpo_loss(model, tokens, positions, weights, adv, old, old, 0.2, 0.04, 0.7)
        assert (metrics["clip_fraction"].item() > 0) == clipped
        assert (metrics["kl"].item() > 1e-4) == clipped


def test_grpo_update_starts_at_the_sampling_policy(tiny):  # noqa: F811
    """Step 1 sees the policy that sampled at rl.temperature: its ratios are 1 and its KL 0."""
    model, _, _ = tiny
    reference = lora.snapshot(model)
    cfg = config(RlConfig, "rl", algo="grpo", iters=2, batch_size=4, learning_rate=1e-2, temperature=0.7)
    log = StepLog(None, "rl", 2)
    rl.grpo_update(model, EXAMPLES, np.array([1.0, -1.0, 1.0, -1.0], np.float32), reference, cfg, cfg.train(0), log)
    assert log.history[0]["kl"] < 1e-6 and log.history[0]["clip_fraction"] == 0
    lora.restore(model, reference)  # the module fixture is shared


def test_each_rounds_reward_and_kept_count_are_logged_at_the_step_it_was_sampled(tmp_path, tiny):  # noqa: F811
    from dvclive import Live

    model, tokenizer, _ = tiny
    start = lora.snapshot(model)
    cfg = config(RlConfig, "rl", rounds=3, prompts=2, samples_per_prompt=2, iters=2, batch_size=2, max_tokens=8,
                 min_reward=0.0)
    with Live(str(tmp_path / "live"), dvcyaml=None, save_dvc_exp=False) as live:
        rounds = rl.run(model, tokenizer, PromptFormat(tokenizer), fixture_rows(), cfg, live)
    curves = tmp_path / "live" / "plots" / "metrics" / "rl"

    def curve(name):
        with open(curves / f"{name}.tsv") as f:
            return [(int(r["step"]), float(r[name.split("/")[-1]])) for r in csv.DictReader(f, delimiter="\t")]

    assert curve("round/mean_reward") == [(2 * r, s["mean_reward"]) for r, s in enumerate(rounds)]
    assert curve("round/kept") == [(2 * r, s["kept"]) for r, s in enumerate(rounds)]
    assert [s for s, _ in curve("loss")] == [1, 2, 3, 4, 5, 6]  # one curve across the rounds
    lora.restore(model, start)  # the module fixture is shared
