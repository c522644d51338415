"""Read an exported GGUF with loaders that share no code with the exporter, and compare.

transformers' GGUF loader (llama.cpp's ``gguf`` reader underneath, its own
tokenizer conversion and its own un-permutation of q/k) rebuilds the tokenizer
and the model from the file alone; the chat template comes from the file's
``tokenizer.chat_template``. Each prompt is compared with the MLX model
directory the GGUF was made from: the rendered text, the token ids, the
next-token argmax and the logits at every position. For a float16 file the
MLX reference gets its matrices rounded to float16 too, so what remains is the
two frameworks' arithmetic; the distance to the float32 model is reported apart.
"""

import os
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from toolcall.calls.prompts import PromptFormat, tool_specs


def gguf_fields(gguf_path):
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(gguf_path)).fields.items()}


def load_gguf_with_transformers(gguf_path):
    """(tokenizer, float32 torch model) from the GGUF file alone (a directory holding only it)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    with tempfile.TemporaryDirectory() as d:  # so no tokenizer_config.json beside it can leak in
        os.symlink(gguf_path, Path(d) / gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf_path.name, dtype=torch.float32)
    return tokenizer, model.eval()


def compare_gguf(model_dir, gguf_path, rows):
    """One record per row (``messages``, ``functions``): does the GGUF agree with ``model_dir``?"""
    import torch
    from mlx_lm import load

    import gguf
    from mlx.utils import tree_map

    fields = gguf_fields(gguf_path)
    template = fields.get("tokenizer.chat_template")
    hf_tokenizer, hf_model = load_gguf_with_transformers(gguf_path)
    model, tokenizer = load(str(model_dir))
    reference, _ = load(str(model_dir))
    if fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16:  # 1-D tensors stay float32 in the file
        reference.update(tree_map(lambda w: w.astype(mx.float16).astype(w.dtype) if w.ndim > 1 else w,
                                  reference.parameters()))
    fmt = PromptFormat(tokenizer)
    records = []
    for row in rows:
        text = fmt.prompt(row["messages"], row["functions"])
        gguf_text = hf_tokenizer.apply_chat_template(
            row["messages"], tools=tool_specs(row["functions"]), chat_template=template,
            tokenize=False, add_generation_prompt=True,
        )
        ids = fmt.encode(text)
        float32_logits = np.array(model(mx.array([ids]))[0])
        mlx_logits = np.array(reference(mx.array([ids]))[0])
        with torch.no_grad():
            gguf_logits = hf_model(torch.tensor([ids])).logits[0].numpy()
        records.append({
            "id": row.get("id"),
            "n_tokens": len(ids),
            "template_equal": gguf_text == text,
            "tokens_equal": hf_tokenizer.encode(text, add_special_tokens=False) == ids,
            "argmax_equal": int(mlx_logits[-1].argmax()) == int(gguf_logits[-1].argmax()),
            "argmax_equal_all_positions": float((mlx_logits.argmax(-1) == gguf_logits.argmax(-1)).mean()),
            "max_abs_logit_diff": float(np.abs(mlx_logits - gguf_logits).max()),
            "max_abs_logit": float(np.abs(mlx_logits).max()),
            "max_abs_logit_diff_vs_float32": float(np.abs(float32_logits - gguf_logits).max()),
            "argmax_equal_vs_float32": int(float32_logits[-1].argmax()) == int(gguf_logits[-1].argmax()),
        })
    return {"gguf_file_type": int(fields["general.file_type"]),
            "template_in_file_equals_model_dir": template == tokenizer.chat_template, "prompts": records}
