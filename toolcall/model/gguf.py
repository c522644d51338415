"""GGUF both ways: a llama GGUF into an MLX model directory (HF names, float weights, the
byte-level BPE tokenizer rebuilt), and an MLX model directory back into a llama GGUF.

Reading undoes what llama.cpp's converter did (q/k row permutation, GGUF tensor
names, quantization); writing redoes it, with the tokenizer metadata as the
inverse of ``gguf_tokenizer`` (a test checks the round trip on SmolLM2).
"""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx_lm.utils import save_config
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from toolcall.calls.prompts import install_tool_template
from toolcall.errors import ModelError
from toolcall.io import atomic_path, write_json


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


# ---------------------------------------------------------------- writing

GGUF_DTYPES = ("float32", "float16")


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
