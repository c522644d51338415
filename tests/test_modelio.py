"""Fast offline tests of toolcall.model.fetch and toolcall.model.gguf on a tiny random llama (no network, no real model)."""

import json
import re
import shutil
import sys
import zipfile
from pathlib import Path

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load
from mlx_lm.utils import quantize_model, save_config, save_model

from toolcall.calls.prompts import PromptFormat, TOOL_TEMPLATE
from toolcall.config import ConfigError, ModelConfig, from_params
from toolcall.errors import ModelError
from toolcall.model.fetch import fetch_model
from toolcall.model.gguf import convert_gguf, gguf_to_hf, llama_config, unpermute_qk
from toolcall.wheels import sha256_file

sys.path.insert(0, str(Path(__file__).parent))
from configs import config  # noqa: E402
from tiny_model import SPECIAL_TOKENS, make_tiny_model  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
IDS = mx.array([[1, 40, 41, 300, 7, 2, 99, 150]])
TEXTS = ["Hello, world! 123", "  two spaces\n\ttab", "ünïcode 🙂", "<|im_start|>user\nhi<|im_end|>"]


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py ``LlamaModel.permute``, copied as the reference."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# HF -> GGUF names, written out independently of the module under test.
GGUF_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
GGUF_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def gguf_name(hf):
    module, part = hf.rsplit(".", 1)
    if module in GGUF_TOP:
        return f"{GGUF_TOP[module]}.{part}"
    _, _, n, rest = module.split(".", 3)
    return f"blk.{n}.{GGUF_BLOCK[rest]}.{part}"


def gguf_tensors(model_dir):
    """The tiny model's weights under GGUF names, q/k permuted the llama.cpp way."""
    config = json.loads((model_dir / "config.json").read_text())
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    out = {}
    for hf, w in mx.load(str(model_dir / "model.safetensors")).items():
        name = gguf_name(hf)
        n_head = heads.get(name.split(".")[2]) if name.startswith("blk.") else None
        out[name] = llama_cpp_permute(w, n_head) if n_head else w
    return out


def gguf_metadata(model_dir, **overrides):
    config = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = [t for t, _ in sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])]
    u32 = lambda x: mx.array(x, dtype=mx.uint32)  # noqa: E731
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": u32(config["hidden_size"]),
        "llama.block_count": u32(config["num_hidden_layers"]),
        "llama.feed_forward_length": u32(config["intermediate_size"]),
        "llama.attention.head_count": u32(config["num_attention_heads"]),
        "llama.attention.head_count_kv": u32(config["num_key_value_heads"]),
        "llama.attention.layer_norm_rms_epsilon": mx.array(config["rms_norm_eps"], dtype=mx.float32),
        "llama.rope.freq_base": mx.array(config["rope_theta"], dtype=mx.float32),
        "llama.context_length": u32(config["max_position_embeddings"]),
        "llama.vocab_size": u32(config["vocab_size"]),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": mx.array([3 if t in SPECIAL_TOKENS else 1 for t in tokens], dtype=mx.int32),
        "tokenizer.ggml.merges": [" ".join(m) for m in tok["model"]["merges"]],
        "tokenizer.ggml.bos_token_id": u32(1),
        "tokenizer.ggml.eos_token_id": u32(2),
        "tokenizer.ggml.padding_token_id": u32(2),
        "tokenizer.ggml.unknown_token_id": u32(0),
        "tokenizer.ggml.add_bos_token": mx.array(False),
        "tokenizer.chat_template": json.loads((model_dir / "tokenizer_config.json").read_text())["chat_template"],
    }
    return {**meta, **overrides}


def write_gguf(path, model_dir, **overrides):
    mx.save_gguf(str(path), gguf_tensors(model_dir), gguf_metadata(model_dir, **overrides))
    return path


def write_wheel(cache, gguf):
    """A wheel holding ``gguf``, placed in the fetch cache so pip_wheel needs no network."""
    wheel = cache / "wheels" / "tiny_gguf-0.1-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.write(gguf, "tiny_gguf/tiny.gguf")
    return model_config(source="gguf_wheel", wheel="tiny-gguf==0.1", sha256=sha256_file(wheel), member="tiny_gguf/tiny.gguf")


def model_config(dtype="float32", **keys):
    """params.yaml's [model] with ``keys`` (and float32) in place of its own: checked as the stage checks it."""
    return config(ModelConfig, "model", dtype=dtype, **keys)


def logits(model_dir):
    model, _ = load(str(model_dir))
    return model(IDS)


@pytest.fixture
def tiny(tmp_path):
    return make_tiny_model(tmp_path / "tiny")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLCALL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_unpermute_inverts_llama_cpp_permute():
    for n_head, head_dim, cols in [(4, 16, 64), (2, 16, 64), (9, 64, 3)]:
        w = mx.random.normal((n_head * head_dim, cols))
        assert mx.array_equal(unpermute_qk(llama_cpp_permute(w, n_head), n_head), w)
        assert not mx.array_equal(llama_cpp_permute(w, n_head), w)


def test_gguf_wheel_converts_to_same_model(tiny, cache, tmp_path):
    cfg = write_wheel(cache, write_gguf(tmp_path / "tiny.gguf", tiny))
    out = fetch_model(cfg, tmp_path / "out")

    assert mx.allclose(logits(out), logits(tiny), atol=1e-5)
    _, ref_tok = load(str(tiny))
    _, tok = load(str(out))
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == ref_tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
    # The GGUF's ChatML ignores tools: the directory gets the template training renders with.
    messages, functions = [{"role": "user", "content": "hi"}], [{"name": "f", "parameters": {}}]
    assert PromptFormat(tok).native and tok.chat_template == TOOL_TEMPLATE
    assert PromptFormat(tok).prompt(messages, functions) == PromptFormat(ref_tok).prompt(messages, functions)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_ids == {2}
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["chat_template"] and tok_config["pad_token"] == "<|im_end|>"
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    record = json.loads((out / "toolcall_source.json").read_text())
    assert record["sha256"] == cfg.sha256 and record["dtype"] == "float32"
    assert record["parameters"] == sum(v.size for v in mx.load(str(tiny / "model.safetensors")).values())
    assert not (out / "source.gguf").exists()


def quantized_gguf_tensors(model_dir):
    """GGUF tensors with some stored as MLX-quantized triples, as mx.load returns Q4_1/Q8_0."""
    tensors = gguf_tensors(model_dir)
    for name, bits in [("blk.0.attn_q", 4), ("blk.1.attn_k", 4), ("blk.0.ffn_down", 4), ("token_embd", 8)]:
        w, s, b = mx.quantize(tensors.pop(f"{name}.weight"), group_size=32, bits=bits)
        tensors.update({f"{name}.weight": w, f"{name}.scales": s.astype(mx.float16), f"{name}.biases": b.astype(mx.float16)})
    return tensors


def test_gguf_quantized_triples_dequantize_and_unpermute(tiny):
    tensors = quantized_gguf_tensors(tiny)
    config = llama_config(gguf_metadata(tiny))
    hf = gguf_to_hf(dict(tensors), config, "float32")

    ref = mx.load(str(tiny / "model.safetensors"))
    assert set(hf) == set(ref)
    for name, n_head, hf_name in [
        ("blk.0.attn_q", 4, "model.layers.0.self_attn.q_proj.weight"),
        ("blk.1.attn_k", 2, "model.layers.1.self_attn.k_proj.weight"),
        ("blk.0.ffn_down", 0, "model.layers.0.mlp.down_proj.weight"),
        ("token_embd", 0, "model.embed_tokens.weight"),
    ]:
        w, s, b = (tensors[f"{name}.{p}"] for p in ("weight", "scales", "biases"))
        bits = 8 if name == "token_embd" else 4
        expected = mx.dequantize(w, s.astype(mx.float32), b.astype(mx.float32), 32, bits)
        expected = unpermute_qk(expected, n_head) if n_head else expected
        assert hf[hf_name].dtype == mx.float32
        assert mx.array_equal(hf[hf_name], expected), name
        assert mx.allclose(hf[hf_name], ref[hf_name], atol=0.1), name  # close to the original
    assert mx.array_equal(hf["model.layers.0.self_attn.v_proj.weight"], ref["model.layers.0.self_attn.v_proj.weight"])


def test_gguf_keep_stays_quantized_and_loads(tiny, tmp_path):
    tensors = quantized_gguf_tensors(tiny)
    dirs = {}
    for dtype in ("float32", "keep"):
        config = llama_config(gguf_metadata(tiny))
        d = dirs[dtype] = tmp_path / dtype
        d.mkdir()
        mx.save_safetensors(str(d / "model.safetensors"), gguf_to_hf(dict(tensors), config, dtype))
        save_config(config, d / "config.json")
        for name in TOKENIZER_FILES:
            shutil.copy(tiny / name, d)
    model, _ = load(str(dirs["keep"]))
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    assert model.model.embed_tokens.bits == 8
    # Quantized matmuls with float16 scales compute at half precision.
    assert mx.allclose(model(IDS), logits(dirs["float32"]), atol=1e-2)


def test_local_source_loads_and_records(tiny, tmp_path):
    out = fetch_model(model_config(source="local", path=str(tiny)), tmp_path / "out")
    assert mx.allclose(logits(out), logits(tiny), atol=1e-6)
    for name in ("config.json", "model.safetensors", *TOKENIZER_FILES):
        assert (out / name).exists(), name
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == TOOL_TEMPLATE
    record = json.loads((out / "toolcall_source.json").read_text())
    assert record["source"] == "local" and record["reference"] == str(tiny.resolve())
    assert record["sha256"] == {"model.safetensors": sha256_file(tiny / "model.safetensors")}
    assert record["parameters"] == sum(v.size for v in mx.load(str(tiny / "model.safetensors")).values())


def test_local_bfloat16(tiny, tmp_path):
    out = fetch_model(model_config(source="local", path=str(tiny), dtype="bfloat16"), tmp_path / "out")
    assert {v.dtype for v in mx.load(str(out / "model.safetensors")).values()} == {mx.bfloat16}


def test_local_quantized_source_is_dequantized_to_float32(tiny, tmp_path):
    model, tokenizer, config = load(str(tiny), return_config=True)
    model, config = quantize_model(model, config, group_size=32, bits=4)
    quantized = tmp_path / "q4"
    save_model(quantized, model)
    save_config(config, quantized / "config.json")
    for name in TOKENIZER_FILES:
        shutil.copy(tiny / name, quantized)

    out = fetch_model(model_config(source="local", path=str(quantized)), tmp_path / "out")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    weights = mx.load(str(out / "model.safetensors"))
    assert {v.dtype for v in weights.values()} == {mx.float32}
    assert not any(k.endswith(".scales") for k in weights)
    assert mx.allclose(logits(out), logits(quantized), atol=1e-4)
    assert json.loads((out / "toolcall_source.json").read_text())["parameters"] == sum(
        v.size for _, v in tree_flatten(load(str(tiny))[0].parameters())
    )


def test_unknown_key_rejected():
    with pytest.raises(ConfigError, match=r"unknown keys \['sourc'\]"):
        from_params(ModelConfig, {"sourc": "local"}, "model")
    with pytest.raises(ConfigError, match=r"needs \['path'\]"):
        model_config(source="local")


def test_corrupt_safetensors_named(tiny, tmp_path):
    (tiny / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelError, match=r"model\.safetensors.*not a readable safetensors"):
        fetch_model(model_config(source="local", path=str(tiny)), tmp_path / "out")


@pytest.mark.parametrize("missing", ["tokenizer.json", "config.json", "model.safetensors"])
def test_missing_file_named(tiny, tmp_path, missing):
    (tiny / missing).unlink()
    with pytest.raises(ModelError, match=rf"{re.escape(str(tiny))}: missing {missing.split('.')[0]}"):
        fetch_model(model_config(source="local", path=str(tiny)), tmp_path / "out")


def test_config_weight_shape_mismatch(tiny, tmp_path):
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelError, match=r"(?s)tiny.*shape.*mlp"):
        fetch_model(model_config(source="local", path=str(tiny)), tmp_path / "out")


def test_gguf_metadata_mismatch_named(tiny, tmp_path):
    gguf = write_gguf(tmp_path / "bad.gguf", tiny, **{"llama.attention.head_count_kv": mx.array(4, dtype=mx.uint32)})
    with pytest.raises(ModelError, match=r"bad\.gguf: tensor blk\.\d\.attn_k has 32 rows, metadata implies 64"):
        convert_gguf(gguf, tmp_path)


def test_truncated_gguf_named_and_out_dir_untouched(tiny, cache, tmp_path):
    gguf = write_gguf(tmp_path / "tiny.gguf", tiny)
    gguf.write_bytes(gguf.read_bytes()[: gguf.stat().st_size // 2])
    cfg = write_wheel(cache, gguf)
    out = tmp_path / "models" / "base"
    with pytest.raises(ModelError, match=r"tiny_gguf-0\.1-py3-none-any\.whl:tiny_gguf/tiny\.gguf: not a readable GGUF"):
        fetch_model(cfg, out)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []

    out.mkdir(parents=True)
    (out / "previous").write_text("kept")
    with pytest.raises(ModelError):
        fetch_model(cfg, out)
    assert [p.name for p in out.parent.iterdir()] == ["base"]
    assert (out / "previous").read_text() == "kept"


def test_existing_out_dir_replaced(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    fetch_model(model_config(source="local", path=str(tiny)), out)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_hub_source_uses_snapshot(tiny, tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshots" / "0123abc"
    shutil.copytree(tiny, snapshot)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    out = fetch_model(model_config(source="hub", repo="someone/tiny", revision="v1"), tmp_path / "out")
    assert calls[0][:2] == ("someone/tiny", "v1") and "model*.safetensors" in calls[0][2]
    assert json.loads((out / "toolcall_source.json").read_text())["reference"] == "someone/tiny@0123abc"
    assert mx.allclose(logits(out), logits(tiny), atol=1e-6)


def test_gguf_config_weight_mismatch_named(tiny, cache, tmp_path):
    bad = {"llama.feed_forward_length": mx.array(96, dtype=mx.uint32)}
    cfg = write_wheel(cache, write_gguf(tmp_path / "tiny.gguf", tiny, **bad))
    with pytest.raises(ModelError, match=r"(?s)tiny-gguf==0\.1:tiny_gguf/tiny\.gguf: .*shape.*mlp"):
        fetch_model(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
