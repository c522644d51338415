"""Read an exported GGUF with loaders that share no code with the exporter, and compare.

transformers' GGUF loader (llama.cpp's ``gguf`` reader underneath, its own
tokenizer conversion and its own un-permutation of q/k) rebuilds the tokenizer
and the model from the file alone, in a child process (``hf_reference``); the chat template comes from the file's
``tokenizer.chat_template``. Each prompt is compared with the MLX model
directory the GGUF was made from: the rendered text, the token ids, the
next-token argmax and the logits at every position. For a float16 file the
MLX reference gets its matrices rounded to float16 too, so what remains is the
two frameworks' arithmetic; the distance to the float32 model is reported apart.
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

from toolcall.calls.prompts import PromptFormat


def gguf_fields(gguf_path):
    from gguf import GGUFReader

    return {k: f.contents() for k, f in GGUFReader(str(gguf_path)).fields.items()}


def transformers_view(gguf_path, prompts):
    """``[(text, ids, logits)]``: what transformers makes of ``gguf_path`` for each prompt, from a child process
    (``hf_reference``: torch stays out of this one)."""
    with tempfile.TemporaryDirectory() as d:
        src, out = Path(d) / "prompts.json", Path(d) / "out.npz"
        src.write_text(json.dumps(prompts))
        proc = subprocess.run([sys.executable, "-m", "toolcall.serve.hf_reference", str(gguf_path), str(src), str(out)],
                              capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"transformers could not read {gguf_path}:\n{proc.stderr[-3000:]}")
        with np.load(out) as z:
            return [(str(z[f"text_{i}"]), z[f"ids_{i}"].tolist(), z[f"logits_{i}"]) for i in range(len(prompts))]


def compare_gguf(model_dir, gguf_path, rows):
    """One record per row (``messages``, ``functions``): does the GGUF agree with ``model_dir``?"""
    from mlx_lm import load

    import gguf
    from mlx.utils import tree_map

    fields = gguf_fields(gguf_path)
    template = fields.get("tokenizer.chat_template")
    model, tokenizer = load(str(model_dir))
    reference, _ = load(str(model_dir))
    if fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16:  # 1-D tensors stay float32 in the file
        reference.update(tree_map(lambda w: w.astype(mx.float16).astype(w.dtype) if w.ndim > 1 else w,
                                  reference.parameters()))
    fmt = PromptFormat(tokenizer)
    prompts = []
    for row in rows:
        text = fmt.prompt(row["messages"], row["functions"])
        prompts.append({"messages": row["messages"], "functions": row["functions"], "template": template,
                        "mlx_text": text, "ids": fmt.encode(text)})
    records = []
    for row, p, (gguf_text, gguf_ids, gguf_logits) in zip(rows, prompts, transformers_view(gguf_path, prompts)):
        ids = p["ids"]
        float32_logits = np.array(model(mx.array([ids]))[0])
        mlx_logits = np.array(reference(mx.array([ids]))[0])
        records.append({
            "id": row.get("id"),
            "n_tokens": len(ids),
            "template_equal": gguf_text == p["mlx_text"],
            "tokens_equal": gguf_ids == ids,
            "argmax_equal": int(mlx_logits[-1].argmax()) == int(gguf_logits[-1].argmax()),
            "argmax_equal_all_positions": float((mlx_logits.argmax(-1) == gguf_logits.argmax(-1)).mean()),
            "max_abs_logit_diff": float(np.abs(mlx_logits - gguf_logits).max()),
            "max_abs_logit": float(np.abs(mlx_logits).max()),
            "max_abs_logit_diff_vs_float32": float(np.abs(float32_logits - gguf_logits).max()),
            "argmax_equal_vs_float32": int(float32_logits[-1].argmax()) == int(gguf_logits[-1].argmax()),
        })
    return {"gguf_file_type": int(fields["general.file_type"]),
            "template_in_file_equals_model_dir": template == tokenizer.chat_template, "prompts": records}
