"""Export a tuned model for use outside the pipeline: fused MLX directory and GGUF.

``fuse_adapter`` merges a LoRA adapter into the base weights with mlx-lm's own
``fuse()`` (what ``mlx_lm.fuse`` does) and writes an MLX model directory that
``mlx_lm.load`` / ``mlx_lm.server`` take with no adapter, with the base
directory's tokenizer config: the chat template the model was trained with and
``tool_parser_type``.

``write_gguf`` converts such a directory into a llama GGUF for llama.cpp,
Ollama and LM Studio, written with llama.cpp's own ``gguf`` package. Not
``mlx_lm.fuse --export-gguf``: on a byte-level BPE model it writes
``tokenizer.ggml.model = llama`` with no merges (llama.cpp would then split
text differently) and no chat template. Here the tokenizer metadata is the
inverse of what ``modelio.gguf_tokenizer`` reads (for SmolLM2 it reproduces the
``tokenizer.ggml.*`` keys of the base model's own GGUF; a test checks it), q/k
rows get llama.cpp's permutation back, and ``tokenizer.chat_template`` is the
template of the model directory, the one training rendered with.
"""

import shutil
from pathlib import Path

from toolcall.errors import ModelError
from toolcall.io import atomic_dir
from toolcall.model.fuse import fuse_lora
from toolcall.model.gguf import save_tokenizer, write_gguf



GGUF_FILE = "model.gguf"


def export_variant(model_dir, adapter_dir, out_dir, gguf_dtype="float16", name=None):
    """Write ``out_dir``: the fused MLX model directory with ``model.gguf`` beside its files.

    Built beside ``out_dir`` and moved into place only when both are written.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        fuse_adapter(model_dir, adapter_dir, tmp)
        write_gguf(tmp, tmp / GGUF_FILE, gguf_dtype, name=name)
    return out_dir


def fuse_adapter(model_dir, adapter_dir, out_dir):
    """Write into ``out_dir`` ``model_dir``'s weights with the adapter fused in, same config and tokenizer."""
    from mlx_lm.utils import load, save_config, save_model

    model, tokenizer, config = load(str(model_dir), adapter_path=str(adapter_dir), return_config=True)
    if not fuse_lora(model):
        raise ModelError(f"{adapter_dir}: no adapter layer to fuse")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    save_tokenizer(tokenizer._tokenizer, out_dir)
    if (Path(model_dir) / "generation_config.json").exists():  # mlx_lm reads extra eos ids from it
        shutil.copy(Path(model_dir) / "generation_config.json", out_dir)
    return out_dir


# --- GGUF ---------------------------------------------------------------------


