"""Configs for tests: the repository's params.yaml section, with only what a test changes overridden."""

import dataclasses
from pathlib import Path

import yaml

from toolcall.config import from_params, seeded

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def section(name):
    params = yaml.safe_load(PARAMS.read_text())
    for key in name.split("."):
        params = params[key]
    return params


def config(cls, name, **overrides):
    """``cls`` from params.yaml's section ``name``; a training section gets the study's first seed, as the
    ablation arms do (params.yaml holds no [sft]/[dpo]/[rl] seed), unless ``seed`` is overridden."""
    values = {**section(name), **overrides}
    if "seed" in {f.name for f in dataclasses.fields(cls)} and "seed" not in section(name):
        values = seeded({k: v for k, v in values.items() if k != "seed"},
                        overrides.get("seed", section("study.seeds")[0]), name)
    return from_params(cls, values, name)
