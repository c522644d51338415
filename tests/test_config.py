"""params.yaml is the one source of defaults: every section builds, and bad values are refused by key."""

import re
from pathlib import Path

import pytest
import yaml
from configs import PARAMS, config, section

from toolcall import config as toolcall_config
from toolcall.config import (ConfigError, DataConfig, DiversityConfig, DpoConfig, EvalConfig, ExtraDataConfig,
                             ModelConfig, ReportConfig, RlConfig, ScaffoldConfig, SftConfig, SplitConfig, StudyConfig,
                             ValidateConfig, from_params, seeded)

SECTIONS = [(cls, name) for name, cls in toolcall_config.SECTIONS.items()]  # every section load() reads


@pytest.mark.parametrize("cls, name", SECTIONS)
def test_every_section_of_params_yaml_builds_as_is(cls, name):
    config(cls, name)


@pytest.mark.parametrize("cls, name", SECTIONS)
def test_an_unknown_key_is_refused_in_every_section(cls, name):
    with pytest.raises(ConfigError, match=rf"\[{name}\]: unknown keys \['typo_key'\]"):
        config(cls, name, typo_key=1)


def test_an_epochs_budget_must_be_positive():
    with pytest.raises(ConfigError, match=r"\[sft\]: epochs=0.0 must be > 0"):
        config(SftConfig, "sft", iters=None, epochs=0)


def test_training_configs_share_the_loop_settings():
    sft = config(SftConfig, "sft")
    # The study's budget: at least half a pass over the default training split (1,718 rows).
    assert sft.train(1718).iters == sft.steps(1718) >= 1718 / 2 / sft.batch_size
    # The ablation arms replace [sft] keys with their own sections, as stage ablation_train does.
    arms = section("ablations.format")
    for arm in arms.values():
        config(SftConfig, "sft", **{**section("ablations.sft"), **arm})


def smoke_params():
    """params.yaml with the Makefile's ``make smoke`` overrides (``-S key=value``, values read as YAML)."""
    make = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    block = re.search(r"^SMOKE := (.*?)\n(?=\S)", make, re.S | re.M).group(1)
    params = yaml.safe_load(PARAMS.read_text())
    for key, value in re.findall(r'-S "?([\w.]+)=([^" \\]+)"?', block):
        *parents, leaf = key.split(".")
        node = params
        for name in parents:
            node = node[name]
        assert leaf in node, f"make smoke sets {key}, which params.yaml does not have"
        node[leaf] = yaml.safe_load(value)
    return params


def test_make_smoke_overrides_give_valid_tiny_budgets():
    """`make smoke` runs every stage in a temporary copy: its -S overrides must build every training config."""
    params = smoke_params()
    assert params["study"]["seeds"] == [0] and params["split"]["test_per_category"] == 5
    for cls, name in ((SftConfig, "sft"), (DpoConfig, "dpo"), (RlConfig, "rl"), (SplitConfig, "split")):
        values = params[name] if cls is SplitConfig else seeded(params[name], 0, name)
        from_params(cls, values, name)
    assert from_params(SftConfig, seeded(params["sft"], 0, "sft"), "sft").steps(1718) <= 30  # tiny, not the study's


def test_an_iters_budget_checks_warmup_against_it():
    with pytest.raises(ConfigError, match=r"warmup=10000 must be in \[0, iters\)"):
        config(SftConfig, "sft", iters=20, epochs=None, warmup=10_000)


def test_dpo_epochs_are_passes_over_the_pairs():
    dpo = config(DpoConfig, "dpo", epochs=1.0, batch_size=4)
    assert dpo.train(256).iters == 64 and dpo.train(258).iters == 65  # the last, smaller batch counts
    assert config(DpoConfig, "dpo", epochs=2.0, batch_size=4).train(10).iters == 6


def test_dpo_and_grpo_pass_warmup_and_clipping_to_their_training_loop():
    dpo = config(DpoConfig, "dpo", epochs=1.0, batch_size=4, warmup=3, max_grad_norm=0.5).train(40)
    assert (dpo.warmup, dpo.max_grad_norm, dpo.iters) == (3, 0.5, 10)
    assert config(DpoConfig, "dpo", max_grad_norm=None).train(40).max_grad_norm is None
    assert config(RlConfig, "rl", max_grad_norm=2.0).train(0).max_grad_norm == 2.0
    with pytest.raises(ConfigError, match=r"\[dpo\]: warmup=10 must be below the 10 steps of epochs=1.0 over 40 pairs"):
        config(DpoConfig, "dpo", epochs=1.0, batch_size=4, warmup=10).train(40)


def test_a_missing_key_is_an_error_not_a_hidden_default():
    params = section("sft")
    del params["warmup"]
    with pytest.raises(ConfigError, match=r"\[sft\]: missing keys \['warmup'\]"):
        from_params(SftConfig, seeded(params, 0, "sft"), "sft")
    with pytest.raises(ConfigError, match=r"\[sft\]: missing keys \['seed', 'warmup'\]"):  # no --seed given
        from_params(SftConfig, params, "sft")


@pytest.mark.parametrize("cls, name, key, value, message", [
    (SftConfig, "sft", "lora_rnk", 8, r"unknown keys \['lora_rnk'\]"),
    (SftConfig, "sft", "learning_rate", 3.0, "learning_rate=3.0 must be in"),
    (SftConfig, "sft", "iters", "many", r"sft\]\.iters='many': expected int"),
    (SftConfig, "sft", "iters", True, r"sft\]\.iters=True: expected int"),
    (SftConfig, "sft", "mask_prompt", "yes", r"mask_prompt='yes': expected bool"),
    (SftConfig, "sft", "warmup", -1, r"\[sft\]: warmup=-1 must be >= 0"),
    (SftConfig, "sft", "iters", 0, r"\[sft\]: iters=0 must be >= 1"),
    (SftConfig, "sft", "epochs", 3.0, r"\[sft\]: iters=600, epochs=3.0: set exactly one"),
    (SftConfig, "sft", "iters", None, r"\[sft\]: iters=None, epochs=None: set exactly one"),
    (SftConfig, "sft", "steps_per_eval", 15, r"steps_per_eval=15 must be 0 \(never\) or a multiple of 10"),
    (SftConfig, "sft", "patience", -1, r"patience=-1 must be >= 0"),
    (DpoConfig, "dpo", "loss_type", "hinge", r"\[dpo\].*loss_type"),
    (DpoConfig, "dpo", "beta", 0, r"\[dpo\].*beta"),
    (DpoConfig, "dpo", "lora_rank", 8, r"\[dpo\].*unknown keys \['lora_rank'\]"),  # the shape is the SFT adapter's
    (DpoConfig, "dpo", "epochs", 0, r"\[dpo\]: epochs=0.0 must be > 0"),
    (DpoConfig, "dpo", "valid_prompts", 0, r"\[dpo\]: valid_prompts=0 must be >= 1"),
    (DpoConfig, "dpo", "steps_per_eval", -2, r"\[dpo\]: steps_per_eval=-2 must be >= 0 \(0: at the end only\)"),
    (DpoConfig, "dpo", "chosen", "silver", r"\[dpo\]: chosen='silver' must be one of \('own', 'gold'\)"),
    (DpoConfig, "dpo", "eos_balance", "yes", r"\[dpo\]\.eos_balance='yes': expected bool"),
    (DpoConfig, "dpo", "rpo_alpha", -0.5, r"\[dpo\]: rpo_alpha=-0.5 must be >= 0 \(0: plain DPO\)"),
    (DpoConfig, "dpo", "warmup", -1, r"\[dpo\]: warmup=-1 must be >= 0"),
    (DpoConfig, "dpo", "max_grad_norm", 0, r"\[dpo\]: max_grad_norm=0.0 must be > 0"),
    (RlConfig, "rl", "max_grad_norm", -1.0, r"\[rl\]: max_grad_norm=-1.0 must be > 0"),
    (RlConfig, "rl", "algo", "ppo", r"\[rl\].*algo"),
    (RlConfig, "rl", "min_reward", 2.0, r"\[rl\].*min_reward"),
    (DataConfig, "data", "source", "ftp", r"\[data\]: source='ftp' must be one of"),
    (DataConfig, "data", "categories", ["simple", "exotic"], r"\[data\]: categories=.*must be a non-empty list"),
    (SplitConfig, "split", "test_per_category", 0, r"\[split\]: test_per_category=0 must be >= 1"),
    (SplitConfig, "split", "valid_per_category", 0, r"\[split\]: valid_per_category=0 must be >= 1"),
    (DataConfig, "data", "extra", ["live_simple", "live_complex"], r"\[data\]: extra=.*must name each source at most "
     r"once, from extra_files \['exec_multiple'"),
    (DataConfig, "data", "extra", ["live_simple", "live_simple"], r"\[data\]: extra=.*at most once"),
    (DataConfig, "data", "extra", "live_simple", r"\[data\]\.extra='live_simple': expected list"),
    (DataConfig, "data", "extra_files", {"live_simple": {"category": "live", "questions": "q.json", "answers": "a.json"}},
     r"\[data\]: extra_files\.live_simple=.*must be \{category: one of"),
    (DataConfig, "data", "extra_files", {"live_simple": {"category": "simple", "questions": "q.json"}},
     r"extra_files\.live_simple=.*must be"),
    (ExtraDataConfig, "ablations.extra", "sources", [1], r"\[ablations.extra\]: sources=\[1\] must be a list of distinct"),
    (ExtraDataConfig, "ablations.extra", "sources", ["exec_simple", "exec_simple"], r"sources=.*must be a list of distinct"),
    (SplitConfig, "split", "train_per_category", "all", r"train_per_category='all': expected int or null"),
    (SplitConfig, "split", "live_test", ["live_simple", "live_simple"], r"\[split\]: live_test=.*must be a list of "
     r"distinct extra source names"),
    (SplitConfig, "split", "live_test", "live_simple", r"\[split\]\.live_test='live_simple': expected list"),
    (ValidateConfig, "validate", "max_drop_fraction", 1.5, r"max_drop_fraction=1.5 must be in \[0, 1\]"),
    (EvalConfig, "eval", "batch_size", 0, r"\[eval\]: batch_size=0 must be >= 1"),
    (EvalConfig, "eval", "max_tokens", 1.5, r"\[eval\]\.max_tokens=1.5: expected int"),
    (EvalConfig, "eval", "workers", 0, r"\[eval\]: workers=0 must be 'auto' or a count >= 1"),
    (EvalConfig, "eval", "workers", "all", r"\[eval\]: workers='all' must be 'auto' or a count >= 1"),
    (EvalConfig, "eval", "workers", 2.0, r"\[eval\]\.workers=2.0: expected int or str"),
    (SftConfig, "sft", "ranks", 3, r"\[sft\]: batch_size=4 must be divisible by ranks=3"),
    (SftConfig, "sft", "ranks", 0, r"\[sft\]: ranks=0 must be >= 1"),
    (DpoConfig, "dpo", "ranks", 3, r"\[dpo\]: batch_size=16 must be divisible by ranks=3"),
    (RlConfig, "rl", "ranks", 8, r"\[rl\]: batch_size=4 must be divisible by ranks=8"),
    (ScaffoldConfig, "ablations.scaffold", "temperature", 0.0, r"temperature=0.0 must be > 0"),
    (DiversityConfig, "ablations.diversity", "budget", -3, r"budget=-3 must be >= 1"),
    (ReportConfig, "report", "equivalence_margin", 5, r"\[report\]: equivalence_margin=5.0 must be in \(0, 1\)"),
    (ReportConfig, "report", "alpha", 0.5, r"\[report\]: alpha=0.5 must be in"),
    (ReportConfig, "report", "power", 1.0, r"\[report\]: power=1.0 must be in"),
    (StudyConfig, "study", "seeds", [], r"\[study\]: seeds=\[\] must be a non-empty list of distinct integers"),
    (StudyConfig, "study", "seeds", [0, 1, 0], r"seeds=\[0, 1, 0\] must be a non-empty list of distinct"),
    (StudyConfig, "study", "seeds", [0, -1], r"seeds=\[0, -1\] must be"),
    (StudyConfig, "study", "seeds", [0, "1"], r"seeds=\[0, '1'\] must be"),
    (StudyConfig, "study", "seeds", 3, r"\[study\]\.seeds=3: expected list"),
    (SftConfig, "sft", "seed", -1, r"\[sft\]: seed=-1 must be >= 0"),
    (DpoConfig, "dpo", "seed", -2, r"\[dpo\]: seed=-2 must be >= 0"),
    (RlConfig, "rl", "seed", -3, r"\[rl\]: seed=-3 must be >= 0"),
    (SftConfig, "sft", "style", "json", r"\[sft\]: style='json' must be one of \('structured', 'content'\)"),
    (SftConfig, "sft", "lora_dropout", 1.0, r"\[sft\]: lora_dropout=1.0 must be in \[0, 1\)"),
    (RlConfig, "rl", "clip_eps", 0, r"\[rl\]: clip_eps=0.0 must be > 0"),
    (RlConfig, "rl", "temperature", 0, r"\[rl\]: temperature=0.0 must be > 0 \(0 is greedy"),
    (SplitConfig, "split", "train_per_category", 0, r"\[split\]: train_per_category=0 must be >= 1"),
    (ModelConfig, "model", "sourc", "local", r"\[model\]: unknown keys \['sourc'\]"),
    (ModelConfig, "model", "source", "ftp", r"\[model\]: source='ftp' must be one of \('gguf_wheel', 'hub', 'local'\)"),
    (ModelConfig, "model", "dtype", "int4", r"\[model\]: dtype='int4' must be one of"),
    (ModelConfig, "model", "source", "local", r"\[model\]: source 'local' needs \['path'\]"),
    (ModelConfig, "model", "source", "hub", r"\[model\]: source 'hub' needs \['repo'\]"),
    (ModelConfig, "model", "revision", 3, r"\[model\]\.revision=3: expected str or null"),
])
def test_impossible_params_are_refused_with_the_key(cls, name, key, value, message):
    with pytest.raises(ConfigError, match=message):
        config(cls, name, **{key: value})


def test_grpo_needs_groups():
    with pytest.raises(ConfigError, match=r"\[rl\].*samples_per_prompt"):
        config(RlConfig, "rl", algo="grpo", samples_per_prompt=1)


def test_eval_workers_is_auto_or_a_count():
    assert config(EvalConfig, "eval", workers="auto").workers == "auto"
    assert config(EvalConfig, "eval", workers=3).workers == 3


def test_an_int_is_accepted_where_a_float_is_expected():
    cfg = config(SftConfig, "sft", lora_scale=4)
    assert cfg.lora_scale == 4.0 and isinstance(cfg.lora_scale, float)


def test_a_model_section_needs_every_key_even_those_of_other_sources():
    """No hidden defaults for [model] either: a source's unused keys are in params.yaml, null."""
    values = section("model")
    del values["revision"]
    with pytest.raises(ConfigError, match=r"\[model\]: missing keys \['revision'\]"):
        from_params(ModelConfig, values, "model")
    assert config(ModelConfig, "model", source="local", path="/some/dir").path == "/some/dir"


def test_load_reads_every_section_of_params_yaml():
    """One loader: every section's name gives its checked dataclass; the training ones take the run's seed."""
    top = set(yaml.safe_load(PARAMS.read_text())) - {"ablations", "grpo"}  # [grpo]: keys of [rl] (its own test)
    loaded = {name.split(".")[0] for name in toolcall_config.SECTIONS}
    assert top <= loaded, f"params.yaml sections no class reads: {sorted(top - loaded)}"
    for name, cls in toolcall_config.SECTIONS.items():
        seed = 5 if name in toolcall_config.SEEDED else None
        cfg = toolcall_config.load(name, seed=seed, path=PARAMS)
        assert isinstance(cfg, cls) and (seed is None or cfg.seed == seed)
    with pytest.raises(TypeError, match="seed"):
        toolcall_config.load("sft", path=PARAMS)  # a training section needs the stage's --seed
    with pytest.raises(TypeError, match="seed"):
        toolcall_config.load("eval", seed=0, path=PARAMS)


def test_load_applies_overrides_and_names_them(tmp_path):
    """train_sft's --overrides: later sections' keys replace [sft]'s; a bad one is named with them."""
    arm = toolcall_config.load("sft", seed=0, overrides=["ablations.sft", "ablations.format.content"], path=PARAMS)
    assert (arm.iters, arm.style, arm.mask_prompt) == (section("ablations.sft")["iters"], "content", False)
    params = yaml.safe_load(PARAMS.read_text())
    params["ablations"]["sft"]["learning_rate"] = 2
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"\[sft \+ ablations\.sft\]: learning_rate=2\.0 must be in \(0, 1\)"):
        toolcall_config.load("sft", seed=0, overrides=["ablations.sft"], path=tmp_path / "params.yaml")
    with pytest.raises(ConfigError, match=r"has no \[ablations\.nothing\] section"):
        toolcall_config.load("sft", seed=0, overrides=["ablations.nothing"], path=PARAMS)


@pytest.mark.parametrize("name", ["sft", "dpo", "rl"])
def test_a_training_seed_comes_from_the_command_line_only(name):
    """[sft], [dpo] and [rl] hold no seed: the stage's --seed (one of study.seeds) is the only one."""
    assert "seed" not in section(name)
    assert seeded(section(name), 7, name)["seed"] == 7
    with pytest.raises(ConfigError, match=rf"\[{name}\]\.seed: seeds are not a \[{name}\] key.*study"):
        seeded({**section(name), "seed": 0}, 7, name)


def test_rl_rounds_of_different_seeds_draw_different_streams():
    """Seed 0's round 2 must not replay seed 1's round 1 (as seed + round would)."""
    seeds = {(s, r): config(RlConfig, "rl", seed=s).round_seed(r) for s in range(4) for r in range(4)}
    assert len(set(seeds.values())) == len(seeds)
    assert config(RlConfig, "rl", seed=1).train(2).seed == seeds[(1, 2)]


def test_a_live_test_source_is_never_a_training_source():
    """split.live_test against the keys that pick training sources: the one rule across sections."""
    live, extra_files = section("split")["live_test"], section("data")["extra_files"]
    trained = {"data.extra": section("data")["extra"], "ablations.extra.sources": section("ablations.extra")["sources"]}
    assert live and toolcall_config.check_live_test(live, trained, sources=extra_files) is None  # params.yaml as is
    for key in trained:
        with pytest.raises(ConfigError, match=rf"^params.yaml {key}=\['exec_simple', 'live_multiple'\] trains on "
                                              rf"\['live_multiple'\], which split.live_test tests on: a live test row "
                                              rf"is never a training row; remove them from {key}"):
            toolcall_config.check_live_test(live, {key: ["exec_simple", "live_multiple"]})
    with pytest.raises(ConfigError, match=r"^params.yaml \[split\].live_test=.*: \['live_complex'\] are not sources "
                                          r"of data.extra_files"):
        toolcall_config.check_live_test(["live_simple", "live_complex"], {}, sources=extra_files)
    toolcall_config.check_live_test([], {"data.extra": ["live_simple"]}, sources=extra_files)  # no live test


def test_grpo_is_rl_with_the_grpo_sections_keys_in_place(tmp_path):
    rl = toolcall_config.load("rl", seed=0, path=PARAMS)
    grpo = toolcall_config.load("rl", seed=0, overrides=["grpo"], path=PARAMS)
    overridden = yaml.safe_load(PARAMS.read_text())["grpo"]
    assert grpo.algo == "grpo" and rl.algo == "rft"
    for key, value in vars(grpo).items():
        assert value == overridden.get(key, getattr(rl, key)), key
    params = yaml.safe_load(PARAMS.read_text())
    params["grpo"]["samples_per_prompt"] = 1  # a group of one has no advantage
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"\[rl \+ grpo\]: samples_per_prompt=1 must be >= 2 for grpo"):
        toolcall_config.load("rl", seed=0, overrides=["grpo"], path=tmp_path / "params.yaml")
