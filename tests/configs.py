"""Configs for tests: the repository's params.yaml section, with only what a test changes overridden."""

from pathlib import Path

import yaml

from toolcall.config import from_params

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def section(name):
    params = yaml.safe_load(PARAMS.read_text())
    for key in name.split("."):
        params = params[key]
    return params


def config(cls, name, **overrides):
    return from_params(cls, {**section(name), **overrides}, name)
