"""RL: the reward on crafted outputs, GRPO advantages and loss, RFT's examples."""

import json

import numpy as np
import pytest

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_flatten
from test_dpo import tiny  # noqa: F401  (module fixture: tiny model + SFT-shaped adapter)
from configs import config
from toolcall import lora, rl
from toolcall.batches import collate
from toolcall.config import RlConfig
from toolcall.loss import token_logps
from toolcall.trainer import StepLog

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
    loss, metrics = rl.grpo_loss(model, tokens, positions, weights, adv, logp, logp, 0.2, 0.04)
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

