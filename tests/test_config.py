"""params.yaml is the one source of defaults: every section builds, and bad values are refused by key."""

import pytest
from configs import config, section

from toolcall.config import ConfigError, DpoConfig, RlConfig, SftConfig, from_params


def test_every_training_section_of_params_yaml_builds_as_is():
    sft = config(SftConfig, "sft")
    assert sft.train().iters == section("sft")["iters"]
    config(DpoConfig, "dpo")
    config(RlConfig, "rl")
    # The ablation arms replace [sft] keys with their own sections, as stage ablation_train does.
    arms = section("ablations.format")
    for arm in arms.values():
        overrides = {**section("ablations.sft"), **{k: v for k, v in arm.items() if k != "style"}}
        config(SftConfig, "sft", **overrides)


def test_a_missing_key_is_an_error_not_a_hidden_default():
    params = section("sft")
    del params["warmup"]
    with pytest.raises(ConfigError, match=r"\[sft\]: missing keys \['warmup'\]"):
        from_params(SftConfig, params, "sft")


@pytest.mark.parametrize("cls, name, key, value, message", [
    (SftConfig, "sft", "lora_rnk", 8, r"unknown keys \['lora_rnk'\]"),
    (SftConfig, "sft", "learning_rate", 3.0, "learning_rate=3.0 must be in"),
    (SftConfig, "sft", "iters", "many", r"sft\]\.iters='many': expected int"),
    (SftConfig, "sft", "iters", True, r"sft\]\.iters=True: expected int"),
    (SftConfig, "sft", "mask_prompt", "yes", r"mask_prompt='yes': expected bool"),
    (SftConfig, "sft", "warmup", 10_000, r"warmup=10000 must be in \[0, iters\)"),
    (DpoConfig, "dpo", "loss_type", "hinge", r"\[dpo\].*loss_type"),
    (DpoConfig, "dpo", "beta", 0, r"\[dpo\].*beta"),
    (DpoConfig, "dpo", "lora_rank", 8, r"\[dpo\].*unknown keys \['lora_rank'\]"),  # the shape is the SFT adapter's
    (RlConfig, "rl", "algo", "ppo", r"\[rl\].*algo"),
    (RlConfig, "rl", "min_reward", 2.0, r"\[rl\].*min_reward"),
])
def test_impossible_params_are_refused_with_the_key(cls, name, key, value, message):
    with pytest.raises(ConfigError, match=message):
        config(cls, name, **{key: value})


def test_grpo_needs_groups():
    with pytest.raises(ConfigError, match=r"\[rl\].*samples_per_prompt"):
        config(RlConfig, "rl", algo="grpo", samples_per_prompt=1)


def test_an_int_is_accepted_where_a_float_is_expected():
    cfg = config(SftConfig, "sft", lora_scale=4)
    assert cfg.lora_scale == 4.0 and isinstance(cfg.lora_scale, float)
