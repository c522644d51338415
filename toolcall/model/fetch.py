"""Turn a model reference into an MLX model directory that ``mlx_lm.load`` accepts.

Three sources (params.yaml [model], ``toolcall.sections.ModelConfig``):

* ``gguf_wheel``: a llama GGUF shipped inside a pinned wheel on the
  package index, the one place these machines can reach. We convert it
  ourselves: dequantize, rename to Hugging Face llama names, undo llama.cpp's
  q/k row permutation, and rebuild the byte-level BPE tokenizer.
* ``hub``: a Hugging Face repo (``huggingface_hub.snapshot_download``).
* ``local``: a directory laid out like an HF/MLX snapshot.

The study writes weights as float32 (``model.dtype``) because on Linux CPU only
float32 matmuls hit OpenBLAS; 4-bit and bf16 kernels are many times slower there.
Everything is written into a temporary directory beside ``out_dir`` and renamed
into place at the end, after ``mlx_lm`` has loaded the result, so a failure
never leaves half a model behind.
"""

import shutil
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.utils import (
    dequantize_model,
    get_total_parameters,
    load,
    load_model,
    load_tokenizer,
    save_config,
    save_model,
)

from toolcall.errors import ModelError
from toolcall.io import atomic_dir, write_json
from toolcall.model.gguf import convert_gguf, save_tokenizer
from toolcall.wheels import FetchError, extract_member, pip_wheel, sha256_file

RECORD = "toolcall_source.json"
# What a snapshot needs; code files (*.py) are never fetched: no remote code.
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


def fetch_model(config, out_dir):
    """Build the MLX model directory ``out_dir`` from ``config``, a ``ModelConfig`` (``config.load("model")``).

    Return its path.
    """
    out_dir = Path(out_dir)
    build = {"gguf_wheel": _from_gguf_wheel, "hub": _from_hub, "local": _from_local}[config.source]
    with atomic_dir(out_dir) as tmp:
        record = build(config, tmp)
        record["parameters"] = _verify(tmp, record["reference"])
        write_json(tmp / RECORD, {"source": config.source, **record, "dtype": config.dtype})
    return out_dir


def _verify(model_dir, reference):
    """Load the finished directory the way consumers will; return its parameter count."""
    try:
        model, _ = load_model(model_dir, lazy=True)
        load_tokenizer(model_dir)
    except Exception as e:  # mlx_lm raises ValueError/KeyError/RuntimeError alike
        raise ModelError(f"{reference}: the converted model does not load with mlx_lm: {e}") from e
    return get_total_parameters(model)


# --- hub and local snapshots --------------------------------------------------


def _from_hub(config, out):
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(config.repo, revision=config.revision, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise ModelError(f"could not download {config.repo}@{config.revision or 'main'} from the hub: {e}") from e
    # The snapshot directory is named after the resolved commit.
    return {"reference": f"{config.repo}@{snapshot.name}", **_convert_snapshot(snapshot, out, config.dtype)}


def _from_local(config, out):
    path = Path(config.path).expanduser().resolve()
    return {"reference": str(path), **_convert_snapshot(path, out, config.dtype)}


def _convert_snapshot(src, out, dtype):
    """Load an HF/MLX snapshot with mlx_lm, dequantize/cast to ``dtype``, save it as MLX."""
    weight_files = _check_snapshot(src)
    try:
        model, tokenizer, config = load(str(src), lazy=True, return_config=True)
    except Exception as e:
        raise ModelError(f"{src}: cannot load the model with mlx_lm: {e}") from e
    if dtype != "keep":
        model, config = _to_float(model, config, getattr(mx, dtype))
    save_model(out, model)
    save_config(config, out / "config.json")
    save_tokenizer(tokenizer, out)
    if (src / "generation_config.json").exists():  # mlx_lm reads extra eos ids from it
        shutil.copy(src / "generation_config.json", out)
    return {"sha256": {f.name: sha256_file(f) for f in weight_files}}


def _check_snapshot(src):
    """Refuse a snapshot with missing or unreadable files, naming them; return the weight files."""
    if not src.is_dir():
        raise ModelError(f"{src}: model directory does not exist; fix model.path in params.yaml")
    weight_files = sorted(src.glob("model*.safetensors"))
    missing = [] if (src / "config.json").exists() else ["config.json"]
    if not weight_files:
        missing.append("model*.safetensors")
    if not any((src / name).exists() for name in ("tokenizer.json", "tokenizer.model")):
        missing.append("tokenizer.json (or tokenizer.model)")
    if missing:
        raise ModelError(f"{src}: missing {', '.join(missing)}; copy the whole model snapshot there")
    for f in weight_files:
        try:
            mx.load(str(f))  # parses the header and checks offsets against the file size
        except Exception as e:
            raise ModelError(f"{f}: not a readable safetensors file ({e}); the file is truncated or corrupt: "
                             "copy or download it again") from e
    return weight_files


def _to_float(model, config, dtype):
    """Dequantize quantized layers and cast floating parameters to ``dtype``."""
    if "quantization" in config:
        model = dequantize_model(model)
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    model.update(tree_map(lambda v: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters()))
    return model, config


# --- GGUF -------------------------------------------------------------------------


def _from_gguf_wheel(config, out):
    try:
        wheel = pip_wheel(config.wheel, config.sha256)
        gguf = extract_member(wheel, config.member, out / "source.gguf")
    except (FetchError, FileNotFoundError) as e:
        raise ModelError(str(e)) from e
    try:
        convert_gguf(gguf, out, config.dtype, name=f"{wheel.name}:{config.member}")
    finally:
        gguf.unlink()
    return {"reference": f"{config.wheel}:{config.member}", "sha256": config.sha256}


