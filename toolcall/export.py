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

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten
from tokenizers import Tokenizer, models, pre_tokenizers

from .io import atomic_path
from .modelio import (
    CONTROL,
    NORMAL,
    PRE_TOKENIZERS,
    USER_DEFINED,
    ModelError,
    gguf_module_name,
    permute_qk,
    save_tokenizer,
    staging_dir,
)

GGUF_DTYPES = ("float32", "float16")


GGUF_FILE = "model.gguf"


def export_variant(model_dir, adapter_dir, out_dir, gguf_dtype="float16", name=None):
    """Write ``out_dir``: the fused MLX model directory with ``model.gguf`` beside its files.

    Built beside ``out_dir`` and moved into place only when both are written.
    """
    out_dir = Path(out_dir)
    with staging_dir(out_dir) as tmp:
        fuse_adapter(model_dir, adapter_dir, tmp)
        write_gguf(tmp, tmp / GGUF_FILE, gguf_dtype, name=name)
    return out_dir


def fuse_adapter(model_dir, adapter_dir, out_dir):
    """Write into ``out_dir`` ``model_dir``'s weights with the adapter fused in, same config and tokenizer."""
    from mlx_lm.utils import load, save_config, save_model

    model, tokenizer, config = load(str(model_dir), adapter_path=str(adapter_dir), return_config=True)
    fused = [(name, module.fuse()) for name, module in model.named_modules() if hasattr(module, "fuse")]
    if not fused:
        raise ModelError(f"{adapter_dir}: no adapter layer to fuse")
    model.update_modules(tree_unflatten(fused))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(out_dir, model)
    save_config(config, out_dir / "config.json")
    save_tokenizer(tokenizer._tokenizer, out_dir)
    if (Path(model_dir) / "generation_config.json").exists():  # mlx_lm reads extra eos ids from it
        shutil.copy(Path(model_dir) / "generation_config.json", out_dir)
    return out_dir


# --- GGUF ---------------------------------------------------------------------


def _pre_signature(pre):
    """What decides a byte-level split: the pre-tokenizer steps and their flags."""
    steps = pre["pretokenizers"] if pre and pre["type"] == "Sequence" else [pre] if pre else []
    return tuple((s["type"], s.get("individual_digits"), s.get("add_prefix_space"), s.get("use_regex")) for s in steps)


def _known_pre_signatures():
    out = {}
    for name, make in PRE_TOKENIZERS.items():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.Sequence(make())
        out[_pre_signature(json.loads(tok.to_str())["pre_tokenizer"])] = name
    return out


def gguf_tokenizer_metadata(model_dir):
    """``tokenizer.ggml.*`` values for the byte-level BPE tokenizer of ``model_dir`` (inverse of gguf_tokenizer)."""
    model_dir = Path(model_dir)
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    bpe = spec["model"]
    if bpe.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise ModelError(f"{model_dir}: only byte-level BPE tokenizers can be written as GGUF gpt2 tokenizers")
    pre = _known_pre_signatures().get(_pre_signature(spec.get("pre_tokenizer")))
    if pre is None:
        raise ModelError(f"{model_dir}: pre-tokenizer {spec.get('pre_tokenizer')} has no llama.cpp name we know "
                         f"({', '.join(PRE_TOKENIZERS)})")
    vocab = dict(bpe["vocab"])
    types = {}
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        types[added["id"]] = CONTROL if added["special"] else USER_DEFINED
    tokens = [None] * len(vocab)
    for token, i in vocab.items():
        if i >= len(tokens) or tokens[i] is not None:
            raise ModelError(f"{model_dir}: token ids are not 0..{len(vocab) - 1} without gaps")
        tokens[i] = token
    merges = [m if isinstance(m, str) else " ".join(m) for m in bpe["merges"]]

    def token_id(key):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        return vocab.get(token) if token else None

    bos = token_id("bos_token")
    # What the tokenizer does, not how its post-processor is spelled: does encoding prepend BOS?
    add_bos = bos is not None and Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode("a").ids[:1] == [bos]
    return {
        "model": "gpt2",
        "pre": pre,
        "tokens": tokens,
        "token_type": [types.get(i, NORMAL) for i in range(len(tokens))],
        "merges": merges,
        "bos_token_id": bos,
        "eos_token_id": token_id("eos_token"),
        "unknown_token_id": token_id("unk_token"),
        "padding_token_id": token_id("pad_token"),
        "add_bos_token": add_bos,
        "chat_template": config.get("chat_template"),
    }


def _gguf_tensors(model_dir, config, dtype):
    """HF-named MLX weights as GGUF-named numpy arrays, q/k rows permuted the llama.cpp way."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for f in sorted(Path(model_dir).glob("model*.safetensors")):
        weights.update(mx.load(str(f)))
    for name in sorted(weights):
        module, _, part = name.rpartition(".")
        gguf = gguf_module_name(module)
        if gguf is None or part != "weight":
            raise ModelError(f"{model_dir}: tensor {name} has no llama GGUF name (quantized or not a llama?)")
        w = weights[name].astype(mx.float32)
        n_head = heads.get(gguf.rpartition(".")[2])
        if n_head:
            w = permute_qk(w, n_head)
        array = np.array(w)
        # llama.cpp keeps 1-D tensors (norms) in float32 whatever the file type.
        yield f"{gguf}.weight", array.astype(np.float16) if dtype == "float16" and array.ndim > 1 else array


def write_gguf(model_dir, path, dtype="float16", name=None):
    """Write the llama MLX model directory ``model_dir`` as a GGUF file at ``path``."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ValueError(f"GGUF dtype must be one of {', '.join(GGUF_DTYPES)}, not {dtype!r}")
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "llama" or config.get("rope_scaling") or "quantization" in config:
        raise ModelError(f"{model_dir}: only unquantized llama models without rope scaling are supported")
    tok = gguf_tokenizer_metadata(model_dir)
    if len(tok["tokens"]) != config["vocab_size"]:
        raise ModelError(f"{model_dir}: {len(tok['tokens'])} tokens but vocab_size {config['vocab_size']}")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    with atomic_path(path) as tmp:
        w = gguf.GGUFWriter(str(tmp), "llama")
        w.add_name(name or model_dir.name)
        w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "float16" else gguf.LlamaFileType.ALL_F32)
        w.add_context_length(config["max_position_embeddings"])
        w.add_embedding_length(hidden)
        w.add_block_count(config["num_hidden_layers"])
        w.add_feed_forward_length(config["intermediate_size"])
        w.add_head_count(heads)
        w.add_head_count_kv(config.get("num_key_value_heads", heads))
        w.add_layer_norm_rms_eps(config["rms_norm_eps"])
        w.add_rope_freq_base(config.get("rope_theta", 10000.0))
        w.add_rope_dimension_count(head_dim)
        if head_dim != hidden // heads:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_vocab_size(config["vocab_size"])
        w.add_tokenizer_model(tok["model"])
        w.add_tokenizer_pre(tok["pre"])
        w.add_token_list(tok["tokens"])
        w.add_token_types(tok["token_type"])
        w.add_token_merges(tok["merges"])
        for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id),
                         ("unknown", w.add_unk_token_id), ("padding", w.add_pad_token_id)):
            if tok[f"{key}_token_id"] is not None:
                add(tok[f"{key}_token_id"])
        w.add_add_bos_token(tok["add_bos_token"])
        w.add_add_space_prefix(False)  # byte-level BPE encodes the leading space itself
        if tok["chat_template"]:
            w.add_chat_template(tok["chat_template"])
        for tensor_name, array in _gguf_tensors(model_dir, config, dtype):
            w.add_tensor(tensor_name, array)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return Path(path)
