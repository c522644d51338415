"""transformers' view of a GGUF file, computed in a process of its own.

transformers imports torch wherever torch is installed, and torch doubles the
import time of every process that loads mlx-lm (mlx_lm -> transformers ->
``modeling_rope_utils``). So torch is not installed beside the project: ``make
test`` puts it (and accelerate) in a directory of its own (``TORCH_DIR``,
``requirements-torch.txt``), and only this module, run as a child process by
``gguf_check.compare_gguf``, adds that directory to its path:

    python -m toolcall.serve.hf_reference model.gguf prompts.json out.npz

``prompts.json`` holds ``[{"messages", "functions", "template", "mlx_text", "ids"}]``;
``out.npz`` gets, per prompt ``i``: ``text_i`` (``template``, the file's chat
template, rendered by transformers' tokenizer), ``ids_i`` (that tokenizer's ids
of ``mlx_text``, the MLX side's rendering) and ``logits_i`` (the model's logits
at ``ids``).
"""

import json
import os
import sys
import tempfile
from pathlib import Path

# Where `make test` installs torch and accelerate (appended: the venv's own packages win any overlap).
TORCH_DIR = Path(os.environ.get("TOOLCALL_TORCH_DIR", Path(sys.prefix) / "torch-site"))


def main():
    gguf_path, prompts_path, out_path = (Path(p) for p in sys.argv[1:4])
    sys.path.append(str(TORCH_DIR))
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from toolcall.calls.prompts import tool_specs

    gguf_path = gguf_path.resolve()
    with tempfile.TemporaryDirectory() as d:  # so no tokenizer_config.json beside it can leak in
        os.symlink(gguf_path, Path(d) / gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf_path.name, dtype=torch.float32).eval()
    out = {}
    for i, p in enumerate(json.loads(prompts_path.read_text())):
        out[f"text_{i}"] = np.array(tokenizer.apply_chat_template(
            p["messages"], tools=tool_specs(p["functions"]), chat_template=p["template"],
            tokenize=False, add_generation_prompt=True))
        out[f"ids_{i}"] = np.array(tokenizer.encode(p["mlx_text"], add_special_tokens=False), dtype=np.int64)
        with torch.no_grad():
            out[f"logits_{i}"] = model(torch.tensor([p["ids"]])).logits[0].numpy()
    np.savez(out_path, **out)


if __name__ == "__main__":
    main()
