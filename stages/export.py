"""Export a tuned variant: its adapter fused into the base weights, and a GGUF of the result.

    python -m stages.export sft --model models/base --adapter models/sft/s0 --out models/export/sft

Writes models/export/<variant>/: an MLX model directory that ``mlx_lm.load`` and
``mlx_lm.server`` take with no adapter (same chat template and tool_parser_type
as the base directory), and model.gguf (``--gguf-dtype``) for llama.cpp, Ollama
and LM Studio, with the byte-level BPE tokenizer and the chat template in its
metadata. No params: `make export` runs the three variants, each from the first
seed's run of study.seeds (models/<variant>/s<first seed>).
"""

import argparse
import time

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
from toolcall.errors import run_stage
from toolcall.model.export import GGUF_FILE, export_variant
from toolcall.model.gguf import GGUF_DTYPES


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("variant")
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--gguf-dtype", choices=GGUF_DTYPES, default="float16")
    args = ap.parse_args()
    start = time.time()
    out = export_variant(args.model, args.adapter, args.out, args.gguf_dtype, name=f"toolcall-{args.variant}")
    size = (out / GGUF_FILE).stat().st_size
    print(f"{args.variant}: fused -> {out}, {GGUF_FILE} {args.gguf_dtype} {size / 1e6:.0f} MB, {time.time() - start:.1f}s")


if __name__ == "__main__":
    run_stage(main)
