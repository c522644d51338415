"""The one way params.yaml is read: ``load("sft", seed=0)`` is section [sft] as a checked, frozen dataclass.

What each section holds, and the range of each key, is declared once in
toolcall/sections.py (importable from here too); this module reads a section
and checks it, the same way for every one, [model] included:

1. no unknown key and no missing one: params.yaml is the only place a default
   lives, so a key it lacks is an error naming it, never a second, silently
   different default;
2. each value of its field's type (``Optional[...]``: null too; an int is
   taken where a float is expected);
3. each value in its field's declared range or choices (``between``,
   ``at_least``, ``above``, ``one_of``);
4. the section's own ``check()``, for rules that tie keys together.

The first problem stops it with a ``ConfigError`` that names the section and
the key: ``params.yaml [sft]: learning_rate=2.0 must be in (0, 1)``.
"""

import dataclasses
import typing

from toolcall.errors import ConfigError
from toolcall.sections import (LOSSES, AblationSplitConfig, ComposeConfig, DataConfig, DiversityConfig, DpoConfig,
                               EvalConfig, ExtraDataConfig, ModelConfig, ReportConfig, RlConfig, ScaffoldConfig, SftConfig,
                               SplitConfig, StudyConfig, TrainConfig, ValidateConfig, epoch_steps)

# The loader, and (re-exported from toolcall.sections) what it builds.
__all__ = ["load", "from_params", "seeded", "read_section", "check_live_test", "ConfigError", "SECTIONS", "SEEDED", "LOSSES",
           "epoch_steps", "AblationSplitConfig", "ComposeConfig", "DataConfig", "DiversityConfig", "DpoConfig",
           "EvalConfig", "ExtraDataConfig", "ModelConfig", "ReportConfig", "RlConfig", "ScaffoldConfig", "SftConfig",
           "SplitConfig", "StudyConfig", "TrainConfig", "ValidateConfig"]

# Every section ``load`` reads, by its (dotted) name in params.yaml. Not in it: [ablations.sft] and
# [ablations.format.*], which only override [sft]'s keys (``load("sft", overrides=...)``).
SECTIONS = {"data": DataConfig, "model": ModelConfig, "split": SplitConfig, "validate": ValidateConfig,
            "compose": ComposeConfig, "study": StudyConfig, "sft": SftConfig, "dpo": DpoConfig, "rl": RlConfig,
            "eval": EvalConfig, "report": ReportConfig, "ablations.scaffold": ScaffoldConfig,
            "ablations.unseen_tools": AblationSplitConfig, "ablations.unseen_patterns": AblationSplitConfig,
            "ablations.diversity": DiversityConfig, "ablations.extra": ExtraDataConfig}
# The training sections, whose seed is the stage's --seed (one of study.seeds), never a params.yaml key.
SEEDED = ("sft", "dpo", "rl")


def load(name, *, seed=None, overrides=(), path="params.yaml"):
    """params.yaml's section ``name`` (dotted if nested: ``ablations.scaffold``) as its checked ``SECTIONS`` class.

    ``seed``: the run's seed, which the training sections ([sft], [dpo], [rl])
    take from the stage's ``--seed`` (see ``seeded``) and no other section has.
    ``overrides``: further sections whose keys replace the section's, later
    ones winning (train_sft's ``--overrides ablations.sft``); messages then
    name them all, ``[sft + ablations.sft]``.
    """
    if name not in SECTIONS:
        raise KeyError(f"no params.yaml section {name!r} is read; known: {sorted(SECTIONS)}")
    if (seed is None) == (name in SEEDED):
        raise TypeError(f"load({name!r}): a seed is given for, and only for, the training sections {SEEDED}")
    values = read_section(name, path)
    for section in overrides:
        values.update(read_section(section, path))
    label = " + ".join([name, *overrides])
    if seed is not None:
        values = seeded(values, seed, label)
    return from_params(SECTIONS[name], values, label)


def read_section(name, path="params.yaml"):
    """Section ``name`` of the params file ``path``, as written (a dict); ``load`` is what checks it."""
    import yaml

    with open(path) as f:
        params = yaml.safe_load(f) or {}
    for key in name.split("."):
        if not isinstance(params, dict) or key not in params:
            raise ConfigError(f"{path} has no [{name}] section")
        params = params[key]
    if not isinstance(params, dict):
        raise ConfigError(f"{path} [{name}] must be a mapping of keys to values, not {params!r}")
    return dict(params)


def from_params(cls, section, name):
    """Build ``cls`` from the dict ``section``, checked (see the module's docstring); ``name`` is for messages.

    ``load`` reads the dict from params.yaml; tests call this on a dict of their own.
    """
    section = dict(section or {})
    types = typing.get_type_hints(cls)
    unknown = sorted(set(section) - set(types))
    if unknown:
        raise ConfigError(f"params.yaml [{name}]: unknown keys {unknown}; known: {sorted(types)}")
    missing = sorted(set(types) - set(section))
    if missing:
        raise ConfigError(f"params.yaml [{name}]: missing keys {missing}")
    for key, value in section.items():
        want, optional = _unwrap(types[key])
        if value is None and optional:
            continue
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            section[key] = float(value)
        elif not isinstance(value, want) or (want is int and isinstance(value, bool)):
            expected = _type_name(want) + (" or null" if optional else "")
            raise ConfigError(f"params.yaml [{name}].{key}={value!r}: expected {expected}")
    for field in dataclasses.fields(cls):
        problem = _declared_problem(field, section[field.name])
        if problem:
            raise ConfigError(f"params.yaml [{name}]: {problem}")
    cfg = cls(**section)
    for problem in cfg.check() if hasattr(cfg, "check") else ():
        raise ConfigError(f"params.yaml [{name}]: {problem}")
    return cfg


def _declared_problem(field, value):
    """What is wrong with ``value`` by the range or choices its field declares (toolcall.sections), or None."""
    meta = field.metadata
    if value is None:
        return None
    if "choices" in meta and value not in meta["choices"]:
        return f"{field.name}={value!r} must be one of {meta['choices']}"
    if "range" not in meta:
        return None
    lo, hi, ends = meta["range"]
    too_low = value < lo if ends[0] == "[" else value <= lo
    too_high = hi is not None and (value > hi if ends[1] == "]" else value >= hi)
    if not (too_low or too_high):
        return None
    if hi is None:
        wanted = f">= {lo}" if ends[0] == "[" else f"> {lo}"
    else:
        wanted = f"in {ends[0]}{lo}, {hi}{ends[1]}"
    why = f" ({meta['why']})" if meta["why"] else ""
    return f"{field.name}={value} must be {wanted}{why}"


def _type_name(want):
    """``int``, or ``int or str`` for a union."""
    return " or ".join(t.__name__ for t in typing.get_args(want)) or want.__name__


def _unwrap(annotation):
    """``(type, optional)`` of a field annotation: ``Optional[int]`` is ``(int, True)``."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return args[0], True
    return annotation, False


def check_live_test(live_test, trained, sources=None):
    """Refuse, with a ``ConfigError`` naming the key, params that would train on the second test set.

    ``live_test`` is split.live_test (the test_live side's sources); ``trained``
    maps each key that picks training sources to its list (``{"data.extra":
    [...]}``, ``{"ablations.extra.sources": [...]}``): none may name a live test
    source, as a live test row must never be a training row. ``sources``, where
    given (data.extra_files), must hold every live test source. A rule across
    sections, so no section's ``check()`` can hold it: the stages that read
    both keys call this.
    """
    if sources is not None and (unknown := [name for name in live_test if name not in sources]):
        raise ConfigError(f"params.yaml [split].live_test={live_test}: {unknown} are not sources of data.extra_files "
                          f"{sorted(sources)}")
    for key, names in trained.items():
        if both := [name for name in names if name in live_test]:
            raise ConfigError(f"params.yaml {key}={names} trains on {both}, which split.live_test tests on: a live "
                              f"test row is never a training row; remove them from {key} (or from split.live_test)")


def seeded(section, seed, name):
    """A training section (params.yaml [sft], [dpo], [rl]) with the run's seed, which params.yaml never holds.

    One rule for every training stage: the seed comes from its command line
    (``--seed``). The main study runs each training stage once per seed of
    ``study.seeds`` (dvc.yaml foreach), every replicate's DPO and RL with its
    own SFT's seed; the ablation arms train at the first one.
    A ``seed`` key in the section would be a second, ignored source: refused.
    """
    section = dict(section or {})
    if "seed" in section:
        raise ConfigError(f"params.yaml [{name}].seed: seeds are not a [{name}] key; the main study runs once per "
                          "seed of [study].seeds, the ablation arms at its first: remove the key")
    return {**section, "seed": seed}
